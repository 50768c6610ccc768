"""A stand-in for vLLM's HTTP surface, for router tests that need backends to die, refuse or restart on cue.

Only what the router calls: `/health`, `/v1/models`, runtime adapter (un)loading and
`/v1/completions`. Its answer text names the backend's port and the model it answered
as (`"8101:yesno-v1"`), so a test sees where each request went. Run in a thread
(`app(...)` with `serve_in_thread`) or as a process that a test can SIGKILL:

    python tests/fake_vllm.py PORT BASE [--max-rank R] [--delay S] [--chunk-delay S] [--events FILE]
                                        [--no-runtime-lora]

`--max-rank` refuses larger adapters as vLLM does (500 with its message); `--delay` holds each
non-streamed answer, `--chunk-delay` each stream chunk (default 0.05 s); `--events` appends one
JSON line per load and per completion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as Endpoint

CHUNKS = 20  # a stream: 20 chunks, 50 ms apart, then usage and [DONE]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "Error", "param": None, "code": status}}, status)


def app(base: str, port: int = 0, max_rank: int | None = None, delay_s: float = 0.0, events: Path | None = None,
        runtime_lora: bool = True, chunk_delay_s: float = 0.05, unload_delay_s: float = 0.0) -> Starlette:
    held: set[str] = set()
    leaving: set[str] = set()  # being unloaded (see unload)

    def note(what: str, model: str) -> None:
        if events is not None:
            with events.open("a") as handle:
                handle.write(json.dumps({"t": time.time(), "what": what, "model": model}) + "\n")

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({})

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": name} for name in (base, *sorted(held - leaving))]})

    async def load(request: Request) -> JSONResponse:
        body = await request.json()
        name = body["lora_name"]
        if name in held:
            return error(400, f"The lora adapter '{name}' has already been loaded.")
        rank = json.loads((Path(body["lora_path"]) / "adapter_config.json").read_text())["r"]
        if max_rank is not None and rank > max_rank:
            return error(500, f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.")
        held.add(name)
        note("load", name)
        return JSONResponse({})

    async def unload(request: Request) -> JSONResponse:
        name = (await request.json())["lora_name"]
        if name not in held:
            return error(404, f"The lora adapter '{name}' cannot be found.")
        # While vLLM frees the slot the adapter is no longer listed, yet a load of it is refused as
        # "already loaded" (seen with 500 adapters and few slots).
        leaving.add(name)
        await asyncio.sleep(unload_delay_s)
        held.discard(name)
        leaving.discard(name)
        return JSONResponse({})

    async def completions(request: Request):
        body = await request.json()
        if body["model"] != base and body["model"] not in held:
            return error(404, f"The model `{body['model']}` does not exist.")
        note("complete", body["model"])
        text = f"{port}:{body['model']}"
        usage = {"prompt_tokens": 3, "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 3}
        if not body.get("stream"):
            await asyncio.sleep(delay_s)
            return JSONResponse({"id": "cmpl-1", "model": body["model"], "usage": usage,
                                 "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})

        async def lines():
            for _ in range(CHUNKS):
                await asyncio.sleep(chunk_delay_s)
                chunk = {"id": "cmpl-1", "model": body["model"], "choices": [{"index": 0, "text": "x"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    routes = [Endpoint("/health", health), Endpoint("/v1/models", models),
              Endpoint("/v1/completions", completions, methods=["POST"])]
    if runtime_lora:
        routes += [Endpoint("/v1/load_lora_adapter", load, methods=["POST"]),
                   Endpoint("/v1/unload_lora_adapter", unload, methods=["POST"])]
    return Starlette(routes=routes)


@contextlib.contextmanager
def serve_in_thread(asgi_app, port: int) -> Iterator[None]:
    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield
    server.should_exit = True
    thread.join(10)


def publish_zero(registry, base_dir: Path, task: str = "yesno", rank: int = 8, base_fingerprint: str | None = None,
                 base_name: str = "tiny"):
    """Publish a zero-weight adapter on the base at `base_dir` (named `base_name`) as `task`: a fake
    backend reads only its rank, a real vLLM runs its LoRA path on it all the same."""
    from mtft.registry import AdapterRecord, BaseModelRef, PromptTemplate, fingerprint
    from mtft.serve import write_zero_adapter

    folder = write_zero_adapter(base_dir, ["q_proj"], rank, registry.root.parent / f"zero-{task}-{rank}")
    base = BaseModelRef(name=base_name, path=str(base_dir), fingerprint=base_fingerprint or fingerprint(base_dir))
    return registry.publish(folder, AdapterRecord(task=task, prefix=f"{task}: ", base_model=base, rank=rank,
                                                  alpha=rank, target_modules=["q_proj"], metric="accuracy",
                                                  max_new_tokens=4,
                                                  template=PromptTemplate(input="{text}", target="{label}")))


class FakeVLLM:
    """This module as a process on a fixed port, which a test can kill and start again (empty)."""

    def __init__(self, port: int, *flags: str, base: str = "tiny"):
        self.port, self.flags, self.base = port, flags, base
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, *more: str) -> FakeVLLM:
        self.process = subprocess.Popen([sys.executable, __file__, str(self.port), self.base, *self.flags, *more])
        wait_for(lambda: _answers(self.url + "/health"), 20)
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("base")
    parser.add_argument("--max-rank", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--events", type=Path)
    parser.add_argument("--no-runtime-lora", action="store_true")
    parser.add_argument("--chunk-delay", type=float, default=0.05)
    parser.add_argument("--unload-delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(app(args.base, args.port, args.max_rank, args.delay, args.events, not args.no_runtime_lora,
                    args.chunk_delay, args.unload_delay),
                host="127.0.0.1", port=args.port, log_level="warning")
