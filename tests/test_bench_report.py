"""`make bench`'s report: sections saved by benchmarks and a failed run, built into one report (no benchmark runs)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def report(tmp_path, monkeypatch):
    monkeypatch.setenv("MTFT_BENCH_OUT", str(tmp_path / "out"))
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_report", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_report_has_machine_versions_commands_and_sections_in_group_order(report, tmp_path):
    out = tmp_path / "out"
    plot = tmp_path / "elsewhere.png"
    plot.write_bytes(b"\x89PNG\r\n")
    # Saved out of order: the report orders by group, B1..B5, then the rest.
    report.save("learned-routing", "learned routing", "| a |\n|---|\n| 1 |", {"n": 1})
    report.save("B5-many-adapters", "many adapters", "| rps |\n|---|\n| 9.5 |", {"rps": 9.5}, ["a note"], [plot])
    report.save("B2-router-overhead", "router overhead", "| ms |\n|---|\n| 2 |", [{"ms": 2}])
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('working')\nsys.exit('boom: the benchmark broke')\n")
    record = report.run(report.Benchmark("broken", "B3-hot-add"), folder=tmp_path)
    assert record["status"] == 1 and "boom" in record["stderr_tail"]

    text = report.build(out)

    header = text.split("\n## ", 1)[0]
    for expected in ("cores", "GiB RAM", "avx2", "amx_bf16", "python", "torch", "transformers", "peft", "vllm",
                     "mtft", "broken.py", "load average"):
        assert expected in header, expected
    titles = [line.split(":")[0] for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## B2-router-overhead", "## B3-hot-add", "## B5-many-adapters", "## learned-routing"]
    failed = text.split("## B3-hot-add", 1)[1].split("\n## ", 1)[0]
    assert "**failed** (exit status 1)" in failed and "boom: the benchmark broke" in failed
    assert "| 9.5 |" in text and "- a note" in text
    copied = "plots/B5-many-adapters-elsewhere.png"
    assert f"]({copied})" in text and (out / copied).exists()
    data = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in data["sections"]] == ["B2-router-overhead", "B3-hot-add", "B5-many-adapters",
                                                    "learned-routing"]
    assert data["sections"][1]["status"] == "failed" and data["versions"]["python"] == sys.version.split()[0]


def test_only_names_keys_groups_or_scripts(report):
    assert [b.script for b in report.chosen("B4")] == ["one_pass", "train_speed", "processes", "eval_speed"]
    assert [b.key for b in report.chosen("many_adapters,B1-multi-adapter")] == ["B1-multi-adapter",
                                                                                  "B5-many-adapters"]
    with pytest.raises(SystemExit, match="--only B9: no such benchmark; choose from B1-multi-adapter"):
        report.chosen("B9")
