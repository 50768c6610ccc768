"""Evaluation through vLLM's offline engine: the same answers as HF `generate`, in every recipe.

`training.eval_engine` picks the engine: vllm, hf, or auto (vllm where installed and the run
evaluates enough examples to pay for the engine's start). Whichever runs, the predictions saved
beside each score are the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtft.train import RunOptions, load_spec, train_adapters
from mtft.train.cli import app
from mtft.train.scorer import AUTO_VLLM_EXAMPLES, choose_engine
from mtft.train.vllm_eval import EngineConfig, EngineError, VllmEvaluator, vllm_rank

from conftest import tiny_spec

pytestmark = pytest.mark.slow


def predictions(output: Path) -> dict[str, list[dict]]:
    """Every saved evaluation of a run: `<task>/<label>` -> its rows."""
    return {f"{p.parent.name}/{p.stem}": [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((output / "predictions").glob("*/*.jsonl"))}


def test_vllm_evaluation_saves_the_answers_hf_generate_gives(trained, tmp_path, caplog):
    spec, options, results = trained  # evaluated with hf: 12 eval examples per task, under auto's threshold
    again = RunOptions(output=tmp_path / "run", registry=tmp_path / "registry")
    with caplog.at_level(logging.INFO, logger="mtft"):
        vllm_results = train_adapters(spec.model_copy(update={"training": spec.training.model_copy(
            update={"eval_engine": "vllm"})}), again)
    assert "evaluation engine: vllm (training.eval_engine: vllm)" in caplog.text
    hf, vllm = predictions(options.output), predictions(again.output)
    # base, the evaluation during training (eval_every 6) and the final one, for both tasks
    assert set(vllm) == {f"{t}/{label}" for t in ("yesno", "echo") for label in ("base", "step-6", "adapter")}
    assert set(hf) == set(vllm)
    assert vllm == hf
    assert [(r.task, r.base, r.adapter) for r in vllm_results] == \
        [(r.task, r.base, r.adapter) for r in results]
    assert any(row["prediction"] for rows in vllm.values() for row in rows)  # answers, not empty strings


def test_vllm_evaluation_of_a_shared_run_scores_each_task_export(shared_trained, tiny_base, tmp_path):
    folder, _, _ = shared_trained  # the shared run, evaluated with hf (at step 8 and at the end)
    spec_path = tiny_spec(tmp_path, tiny_base, max_steps=12, learning_rate=1e-2, eval_every=8, eval_engine="vllm")
    result = CliRunner().invoke(app, ["shared", "--config", str(spec_path), "--registry", str(tmp_path / "registry"),
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    hf, vllm = predictions(folder / "run"), predictions(tmp_path / "run")
    assert {k for k in vllm if "step-8" in k} == {"yesno/step-8", "echo/step-8"}
    unplaced = lambda runs: {k: [{**r, "where": None} for r in rows] for k, rows in runs.items()}  # noqa: E731
    assert unplaced(vllm) == unplaced(hf)  # the same examples, written to two folders


@pytest.mark.parametrize("requested, installed, device, examples, engine, why", [
    ("auto", True, "cpu", AUTO_VLLM_EXAMPLES, "vllm", f"auto: {AUTO_VLLM_EXAMPLES} eval examples"),
    ("auto", True, "cpu", AUTO_VLLM_EXAMPLES - 1, "hf", f"vLLM's start pays off from about {AUTO_VLLM_EXAMPLES}"),
    ("auto", False, "cpu", 10_000, "hf", "auto: vLLM is not installed"),
    ("auto", True, "cuda", 10_000, "hf", "auto: vLLM beside training on one GPU is not set up"),
    ("hf", True, "cpu", 10_000, "hf", "training.eval_engine: hf"),
    ("vllm", True, "cpu", 1, "vllm", "training.eval_engine: vllm"),
])
def test_the_engine_choice_and_its_reason(requested, installed, device, examples, engine, why):
    chosen, reason = choose_engine(requested, installed, device, examples)
    assert chosen == engine and why in reason


@pytest.mark.parametrize("installed, device, why", [(False, "cpu", "vLLM is not installed"),
                                                    (True, "cuda", "beside training on one GPU")])
def test_forcing_vllm_where_it_cannot_run_says_why_and_what_to_use(installed, device, why):
    with pytest.raises(ValueError, match=f"training.eval_engine: vllm, but .*{why}.*; use auto or hf"):
        choose_engine("vllm", installed, device, 100)


def test_a_spec_asking_for_an_unknown_engine_names_the_field(tmp_path, tiny_base):
    from mtft.train.spec import SpecError

    with pytest.raises(SpecError, match="eval_engine"):
        load_spec(tiny_spec(tmp_path, tiny_base, eval_engine="tensorrt"))


def test_a_worker_that_cannot_load_its_model_is_an_error_naming_its_log(tmp_path):
    log_path = tmp_path / "vllm-eval.log"
    evaluator = VllmEvaluator(EngineConfig(str(tmp_path / "no-such-model"), "float32", 8, 64, threads=2), log_path)
    with pytest.raises(EngineError, match=f"could not load .*no-such-model.*log: {log_path}"):
        evaluator.generate([[1, 2, 3]], 4, [0], None)
    assert "no-such-model" in log_path.read_text()


def test_under_auto_an_engine_that_fails_falls_back_to_hf_with_the_same_scores(trained, tmp_path, monkeypatch, caplog):
    import mtft.train.scorer as scorer

    spec, options, results = trained
    monkeypatch.setattr(scorer, "AUTO_VLLM_EXAMPLES", 1)  # auto picks vllm for this tiny run
    # the worker gets a base folder it cannot load: a real start failure
    monkeypatch.setattr(scorer, "EngineConfig", lambda *a, **k: EngineConfig(str(tmp_path / "gone"), *a[1:], **k))
    again = RunOptions(output=tmp_path / "run", registry=tmp_path / "registry", tasks=["yesno"])
    with caplog.at_level(logging.INFO, logger="mtft"):
        fallback = train_adapters(spec, again)
    assert "evaluation engine: vllm (auto: 12 eval examples)" in caplog.text
    assert "falling back to hf for the rest of the run" in caplog.text
    assert "vllm-eval.log" in caplog.text
    assert fallback[0].adapter == results[0].adapter
    assert predictions(again.output)["yesno/adapter"] == predictions(options.output)["yesno/adapter"]


def test_lora_ranks_round_up_to_one_vllm_serves():
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 16, 33)] == [1, 8, 8, 16, 16, 64]
