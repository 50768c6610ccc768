"""The demo's client half: query every served task through the official `openai` client and print a table.

    python -m mtft.serve.demo --url http://127.0.0.1:8000 --registry runs/registry --data train/demo/data \
        [--examples 2] [--wait-for TASK]

For each task the router serves (`GET /v1/models`) it takes held-out rows from
`<data>/<task>.eval.jsonl`, renders the client text and the expected answer
with the task's registry template, and asks three ways: by prefix
(completions), by model name (chat), and by prefix streamed (chat). With
`--wait-for TASK` it first waits until a task published while the server runs
(a hot-add) answers, and reports how long that took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mtft.registry import Registry, render_input, render_target


def wait_for(client, task: str, timeout_s: float) -> float:
    import openai

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            client.completions.create(model=task, prompt="x", max_tokens=1)
            return time.monotonic() - started
        except openai.NotFoundError:
            time.sleep(0.2)
    raise TimeoutError(f"task {task!r} was not served within {timeout_s:.0f} s")


def ask(client, task: str, prefix: str, text: str, how: str) -> tuple[str, str, str]:
    """(how the router matched it, adapter, answer) for one request asked `how`."""
    if how == "prefix":
        raw = client.completions.with_raw_response.create(model="mtft", prompt=prefix + text)
        answer = raw.parse().choices[0].text
    elif how == "model":
        raw = client.chat.completions.with_raw_response.create(model=task, messages=[{"role": "user", "content": text}])
        answer = raw.parse().choices[0].message.content
    else:
        raw = client.chat.completions.with_raw_response.create(
            model="mtft", messages=[{"role": "user", "content": prefix + text}], stream=True)
        answer = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return raw.headers["x-mtft-route"], raw.headers["x-mtft-adapter"], answer


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with <task>.eval.jsonl files")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--wait-for", default=None, help="a task hot-added while serving")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    key = (os.environ.get("MTFT_API_KEYS") or "-").split(",")[0].partition("=")[0]
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=key, max_retries=5)
    if args.wait_for:
        print(f"hot-added task {args.wait_for!r} answering {wait_for(client, args.wait_for, args.timeout):.1f} s "
              "after we started waiting")
    records = Registry(args.registry).served()
    served = [m.id for m in client.models.list().data if m.id in records]
    rows, correct = [], 0
    asked = {"prefix": "completion", "model": "chat", "stream": "chat, streamed"}
    for task in served:
        record = records[task]
        path = args.data / f"{task}.eval.jsonl"
        examples = [json.loads(line) for line in path.read_text().splitlines()[: args.examples]] if path.exists() else []
        for example, how in ((e, h) for e in examples for h in ("prefix", "model", "stream")):
            text = render_input(record.template, example)
            expected = render_target(record.template, example).strip()
            routed, adapter, answer = ask(client, task, record.prefix, text, how)
            ok = answer.strip() == expected
            correct += ok
            rows.append((task, asked[how], routed, adapter, answer.strip()[:40], expected[:40], "yes" if ok else "no"))
    header = ("task", "asked as", "routed by", "adapter", "answer", "expected", "correct?")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print(f"{correct}/{len(rows)} answers correct across {len(served)} tasks")
    sys.exit(0 if rows else 1)


if __name__ == "__main__":
    main()
