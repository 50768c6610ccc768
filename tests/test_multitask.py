"""Multi-task training: the shared adapter's export, one-pass adapters, mixing in the loop, loss
weighting, sequential stages, per-task monitoring and bad input."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtft.registry import Registry
from mtft.train.mixing import chi_square_p
from mtft.train import RunOptions, SpecError, load_spec, train_one_pass, train_shared
from mtft.train.tasklora import TaskLoRA, peft_init

from conftest import tiny_spec
from helpers import adapter_weights, cli, kill_at_random_step


def _lora_init(model, rank=8, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=16, target_modules=list(modules), task_type="CAUSAL_LM")
    return (config, *peft_init(model, config))


@pytest.mark.parametrize("up_projections", [1, 3])
def test_each_task_exported_from_the_shared_adapter_is_exactly_that_task(tiny_base, up_projections):
    """The exported PEFT LoRA's logits equal the conditioned model's logits for its task (fp32)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    config, init, model = _lora_init(model)
    lora = TaskLoRA(model, ["a", "b", "c"], init, 8, 16, 0.0, shared=True, up_projections=up_projections)
    with torch.no_grad():  # every parameter away from its init, so B, Λ and θ all matter
        for p in lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 900, (2, 12))
    conditioned = {}
    with torch.no_grad():
        for task in lora.tasks:
            with lora.task(task):
                conditioned[task] = model(input_ids=ids).logits
        exported = {t: lora.export(t) for t in lora.tasks}
        base = lora.remove()(input_ids=ids).logits
        for task in lora.tasks:
            peft_model = get_peft_model(model, config)
            set_peft_model_state_dict(peft_model, exported[task])
            served = peft_model(input_ids=ids).logits
            model = peft_model.unload()
            torch.testing.assert_close(served, conditioned[task], rtol=1e-5, atol=1e-5)
    # The check means something: tasks differ from each other and from the base.
    assert (conditioned["a"] - conditioned["b"]).abs().max() > 1e-3
    assert (conditioned["a"] - base).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_task_layer_trains_as_the_peft_lora_it_exports_to(tiny_base, dtype):
    """`mtft-train adapters` trains TaskLoRA layers: logits and adapter gradients equal PEFT's on
    the same weights. float32: to rounding. bfloat16 base: the LoRA products run in bfloat16 (PEFT
    runs them in float32), so the two agree to bfloat16 precision; weights and gradients stay float32."""
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=getattr(torch, dtype))
    config, init, model = _lora_init(model)
    lora = TaskLoRA(model, ["a"], init, 8, 16, 0.0, shared=False)
    with torch.no_grad():  # B away from zero, so A's gradient is not zero too
        for p in lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, targets = torch.randint(3, 900, (3, 10)), torch.randint(3, 900, (3, 10))

    def loss_and_grads(net, params):
        logits = net(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        return logits.float(), {k: p.grad for k, p in params.items()}

    with lora.task("a"):
        ours = loss_and_grads(model, {f"{n}.{w}": getattr(layer, w)[0] for n, layer in lora.layers.items()
                                      for w in ("lora_A", "lora_B")})
    exported = lora.export("a")
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.parameters())
    peft_model = get_peft_model(lora.remove(), config)
    set_peft_model_state_dict(peft_model, exported)
    theirs = loss_and_grads(peft_model, {k.removeprefix("base_model.model.").replace(".default", "")
                                         .removesuffix(".weight"): p
                                         for k, p in peft_model.named_parameters() if p.requires_grad})
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 0.05, "atol": 0.02}
    torch.testing.assert_close(ours[0], theirs[0], **tolerance)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 2 * 7 * 2  # 7 projections, 2 layers
    for key, grad in ours[1].items():
        scale = theirs[1][key].abs().max()
        assert scale > 0, key
        assert (grad - theirs[1][key]).abs().max() <= (1e-5 if dtype == "float32" else 0.05) * scale, key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_task_layer_computes_the_plain_lora_composition_in_fewer_passes(dtype, dropout):
    """A layer's written-out product and backward (`_LoRAProduct`) give what autograd gives for the plain
    composition base(x) + s · B_t A_t dropout(x) on each task's rows: the output and every gradient
    (input, each task's A and B), float32 to rounding, bfloat16 to its rounding."""
    from mtft.train.tasklora import SeparateLoRALinear, _Rows, _TaskLinear

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    rows = _Rows()
    layer = SeparateLoRALinear(torch.nn.Linear(64, 96).to(dt).requires_grad_(False), 3, 8, 16, dropout, rows)
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    rows.runs = [(2, 2), (0, 3)]  # task 1 has no rows: its weights get no gradient
    x = torch.randn(5, 7, 64, dtype=dt, requires_grad=True)
    grad_out = torch.randn(5, 7, 96, dtype=dt)

    def outputs_and_grads(forward):
        x.grad = None
        for p in params:
            p.grad = None
        torch.manual_seed(1)  # the same dropout masks
        out = forward(x)
        out.backward(grad_out)
        return [out, x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in params]

    written = outputs_and_grads(layer)
    plain = outputs_and_grads(lambda inputs: _TaskLinear.forward(layer, inputs))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 0.02, "atol": 0.02}
    for ours, theirs in zip(written, plain, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tolerance)
    # params: A_0, A_1, A_2, B_0, B_1, B_2
    assert written[2 + 1].abs().max() == 0 and written[2 + 5].abs().max() > 0  # A_1 untouched, B_2 trained
    # The check can fail: a delta that skipped the scaling would be off by the delta itself.
    layer.scaling /= 2
    assert (layer(x) - written[0]).abs().max() > 0.1


def test_a_mixed_batch_sends_each_row_through_its_own_task(tiny_base):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    _, init, model = _lora_init(model)
    lora = TaskLoRA(model, ["a", "b"], init, 8, 16, 0.0, shared=False)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ids = torch.randint(3, 900, (3, 10))
        with lora.rows([("a", 2), ("b", 1)]):
            mixed = model(input_ids=ids).logits
        for rows, task in ((slice(0, 2), "a"), (slice(2, 3), "b")):
            with lora.task(task):
                torch.testing.assert_close(mixed[rows], model(input_ids=ids[rows]).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="rows cover 2 of 3"):
        with lora.rows([("a", 2)]):
            model(input_ids=ids)


def test_one_pass_adapters_equal_the_adapters_trained_alone(trained, tmp_path):
    """`adapters --one-pass` mixes every task in each batch, yet each adapter equals the sequential one."""
    spec, options, sequential = trained
    one_pass = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    results = train_one_pass(spec, one_pass)
    assert [r.task for r in results] == [r.task for r in sequential]
    for result in results:
        alone, joint = adapter_weights(options.registry, result.task), adapter_weights(one_pass.registry, result.task)
        assert alone.keys() == joint.keys()
        for key in alone:
            diff = (joint[key] - alone[key]).abs()
            # Float tolerance: padding to a wider mixed batch reorders sums (~1e-7), and Adam turns the
            # sign of a near-zero gradient into a full lr-sized step for a rare element.
            assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 0.01, (key, diff.max())
        assert max((alone[k] - adapter_weights(options.registry, "yesno" if result.task == "echo" else "echo")[k])
                   .abs().max() for k in alone) > 1e-3, "tasks trained to the same weights: the test proves nothing"
    record = Registry(one_pass.registry).latest()["yesno"]
    assert record.trained_by == "mtft-train adapters --one-pass"
    rows = [json.loads(x) for x in (one_pass.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(set(r["tasks"]) == {"yesno", "echo"} for r in rows), "every step mixes both tasks"


def test_a_task_with_its_own_budget_trains_its_own_steps_and_rate_alone_or_in_one_pass(tiny_base, tmp_path, caplog):
    """`tasks[].training` gives one task more steps and another rate; one pass gives it the same."""
    from mtft.train import train_adapters

    path = tiny_spec(tmp_path, tiny_base, max_steps=4, eval_every=None)
    raw = yaml.safe_load(path.read_text())
    raw["tasks"][1]["training"] = {"max_steps": 7, "learning_rate": 2e-2}  # echo
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(path)
    runs = {}
    for name, trainer in (("alone", train_adapters), ("one-pass", train_one_pass)):
        options = RunOptions(output=tmp_path / name, registry=tmp_path / f"{name}-reg")
        trainer(spec, options)
        rows = [json.loads(x) for x in (options.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        runs[name] = options, rows
    _, alone = runs["alone"]
    steps = {t: [r["step"] for r in alone if r["task"] == t] for t in ("yesno", "echo")}
    assert steps == {"yesno": [1, 2, 3, 4], "echo": [1, 2, 3, 4, 5, 6, 7]}
    peak = {t: max(r["lr"] for r in alone if r["task"] == t) for t in ("yesno", "echo")}
    assert peak["echo"] > 1e-2 > 5e-3 >= peak["yesno"]
    # One pass: echo keeps stepping after yesno's 4 steps, and both adapters equal the ones trained alone.
    one_pass_options, one_pass = runs["one-pass"]
    assert [sorted(r["tasks"]) for r in one_pass] == [["echo", "yesno"]] * 4 + [["echo"]] * 3
    for task in ("yesno", "echo"):
        a = adapter_weights(runs["alone"][0].registry, task)
        b = adapter_weights(one_pass_options.registry, task)
        assert max((a[k] - b[k]).abs().max() for k in a) < 1e-4, task
    # A shared adapter has one schedule for every task: it says so, and the task's own budget is not used.
    with caplog.at_level("WARNING", logger="mtft.train.multitask"):
        result = cli("shared", "--config", str(path), "--check", "--registry", str(tmp_path / "shared-reg"))
    assert result.exit_code == 0
    assert any("tasks ['echo'] set their own training" in r.getMessage() and "ignored here" in r.getMessage()
               for r in caplog.records)


@pytest.fixture
def shared_run(shared_trained):
    return shared_trained


def test_shared_training_publishes_one_exported_adapter_per_task(shared_run):
    folder, _, output = shared_run
    latest = Registry(folder / "registry").latest()
    assert set(latest) == {"yesno", "echo"}
    for record in latest.values():
        assert record.trained_by == "mtft-train shared" and record.rank == 8
        assert {"base", "adapter"} <= record.metrics.keys()
    results = json.loads((folder / "run" / "results.json").read_text())
    assert results["mode"] == "shared" and set(results["tasks"]) == {"yesno", "echo"}
    assert "base (zero-shot)" in output and "shared adapter" in output


def test_the_final_table_compares_with_per_task_adapters_in_the_registry(trained, tmp_path):
    import shutil

    spec, options, sequential = trained
    shutil.copytree(options.registry, tmp_path / "reg")
    spec = spec.model_copy(deep=True)
    spec.training.max_steps = 2
    results = train_shared(spec, RunOptions(output=tmp_path / "run", registry=tmp_path / "reg"))
    assert [r.separate for r in results] == [r.adapter for r in sequential]
    assert [r.version for r in results] == [2, 2]  # published after the per-task adapters
    table = json.loads((tmp_path / "run" / "results.json").read_text())["tasks"]
    assert table["yesno"]["separate"] == sequential[0].adapter


def test_shared_training_logs_per_task_curves_counts_mixing_and_weights(shared_run):
    folder, _, _ = shared_run
    rows = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    for task in ("yesno", "echo"):
        losses = [r["tasks"][task]["loss"] for r in steps if task in r["tasks"]]
        assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"{task}: loss did not go down"
    last = steps[-1]
    assert sum(last["seen"].values()) == 24 * 4  # max_steps × tasks steps of batch_size examples, all counted
    assert last["mix"] == pytest.approx({"yesno": 0.5, "echo": 0.5})  # the default mixing on equal sizes
    assert last["loss_weights"] == {"yesno": 1.0, "echo": 1.0}
    evals = [r for r in rows if "eval" in r and "loss" in r]
    assert [r["step"] for r in evals] == [8, 16] and all(set(r["eval"]) == {"yesno", "echo"} for r in evals)
    assert (folder / "run" / "curves.png").stat().st_size > 10_000


def test_proportional_mixing_in_training_matches_the_task_sizes(tiny_base, tmp_path):
    """Realised per-task counts over a run follow P ∝ size (chi-square), with sizes 3:1."""
    spec_path = tiny_spec(tmp_path, tiny_base, max_steps=30, eval_every=None, batch_size=8)
    spec = load_spec(spec_path)
    spec.multitask.mixing.strategy = "proportional"
    spec.tasks[1].limits.train_examples = 12  # echo: 12 train examples vs yesno's 36
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    train_shared(spec, options)
    rows = [json.loads(x) for x in (options.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    seen = rows[-1]["seen"]
    assert rows[-1]["mix"] == pytest.approx({"yesno": 0.75, "echo": 0.25})
    assert chi_square_p([seen["yesno"], seen["echo"]], [0.75, 0.25]) > 0.001
    assert chi_square_p([seen["yesno"], seen["echo"]], [0.5, 0.5]) < 1e-6  # the check can fail


def _spec_with(tmp_path, tiny_base, multitask: dict, **training) -> Path:
    path = tiny_spec(tmp_path, tiny_base, **training)
    raw = yaml.safe_load(path.read_text())
    raw["multitask"] = multitask
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_uncertainty_weighting_learns_and_logs_a_weight_per_task(tiny_base, tmp_path):
    spec = load_spec(_spec_with(tmp_path, tiny_base, {"loss": {"weighting": "uncertainty", "averaging": "example"}},
                                eval_every=None, learning_rate=5e-2))
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    train_shared(spec, options)
    rows = [json.loads(x) for x in (options.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = rows[0]["loss_weights"], rows[-1]["loss_weights"]
    assert first == pytest.approx({"yesno": 1.0, "echo": 1.0}, abs=0.1)
    # Kendall: high-loss tasks get exp(-s) < 1 as s grows; the weights moved away from 1.
    assert all(abs(last[t] - 1.0) > 0.05 for t in last)


def test_sequential_stages_train_one_task_each_and_write_a_forgetting_table(tiny_base, tmp_path):
    spec = load_spec(_spec_with(tmp_path, tiny_base, {
        "schedule": "sequential", "sequential": {"order": ["echo", "yesno"], "replay": 0.25, "stage_steps": 6}},
        eval_every=None))
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    train_shared(spec, options)
    rows = [json.loads(x) for x in (options.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["stage"] for r in rows] == [0] * 6 + [1] * 6
    assert all(r["mix"] == {"echo": 1.0} and set(r["tasks"]) == {"echo"} for r in rows[:6])
    assert rows[6]["mix"] == {"yesno": 0.75, "echo": 0.25}  # replay of the earlier task
    assert set(rows[5]["eval"]) == {"echo"}  # end of stage 0: the tasks seen so far
    assert set(rows[-1]["eval"]) == {"echo", "yesno"}
    table = (options.output / "forgetting.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["stage", "trained", "task"]
    assert [line.split()[:3] for line in table[1:]] == [["0", "echo", "echo"], ["1", "yesno", "echo"],
                                                        ["1", "yesno", "yesno"]]


@pytest.mark.slow
def test_a_killed_shared_run_resumes_and_ends_identical(tiny_base, tmp_path):
    spec_path = _spec_with(tmp_path, tiny_base, {"mixing": {"strategy": "dynamic", "update_every": 3}},
                           max_steps=100, checkpoint_every=1, eval_every=None)
    command = [sys.executable, "-m", "mtft.train.cli", "shared", "--config", str(spec_path),
               "--registry", str(tmp_path / "reg"), "--output", str(tmp_path / "run")]
    metrics = tmp_path / "run" / "metrics.jsonl"
    kill = kill_at_random_step(command, metrics, total=200)
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{kill}: {result.stderr}"
    assert "shared: resuming at step" in result.stderr, kill
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == list(range(1, 201)), kill

    reference = RunOptions(output=tmp_path / "ref", registry=tmp_path / "ref-reg")
    train_shared(load_spec(spec_path), reference)
    ref_rows = [json.loads(x) for x in (reference.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["seen"] for r in rows] == [r["seen"] for r in ref_rows], f"{kill}: other mixed batches"
    assert len({json.dumps(r["mix"]) for r in rows}) > 1, "dynamic mixing never re-weighted"
    for task in ("yesno", "echo"):
        resumed, straight = adapter_weights(tmp_path / "reg", task), adapter_weights(reference.registry, task)
        assert all((resumed[k] == straight[k]).all() for k in straight), f"{kill}: {task}'s adapters differ"

    changed = _spec_with(tmp_path, tiny_base, {"mixing": {"strategy": "uniform"}}, max_steps=100,
                         checkpoint_every=1, eval_every=None)
    with pytest.raises(SpecError, match="different spec"):
        train_shared(load_spec(changed), RunOptions(output=tmp_path / "ref", registry=tmp_path / "x", resume=True))


def test_shared_bad_input_fails_at_start_and_leaves_the_registry_alone(shared_run, tmp_path, tiny_base):
    folder, _, _ = shared_run
    registry = folder / "registry"
    before = sorted(p.relative_to(registry) for p in registry.rglob("*"))
    spec_path = tiny_spec(tmp_path, tiny_base)
    (tmp_path / "echo.jsonl").write_text("")  # a shared-mode task without data
    result = cli("shared", "--config", str(spec_path), "--registry", str(registry), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "task 'echo': the train split is empty; add examples" in result.output
    for check in ([], ["--check"]):
        result = cli("shared", "--config", str(spec_path), "--task", "yesno", "--registry", str(registry),
                     "--output", str(tmp_path / "o"), *check)
        assert result.exit_code == 2 and "mtft-train shared needs at least two tasks" in result.output
    partial = _spec_with(tmp_path, tiny_base, {"schedule": "sequential", "sequential": {"order": ["yesno"]}})
    result = cli("shared", "--config", str(partial), "--check", "--registry", str(registry))
    assert result.exit_code == 2 and "tasks ['echo'] are selected but not in the order ['yesno']" in result.output
    bad = _spec_with(tmp_path, tiny_base, {"schedule": "sequential", "sequential": {"order": ["yesno", "nope"]}})
    result = cli("shared", "--config", str(bad), "--registry", str(registry), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "multitask.sequential.order: unknown tasks ['nope']" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(registry) for p in registry.rglob("*")) == before


@pytest.mark.parametrize("order_by", ["size", "base_loss"])
def test_curriculum_orders_stages_by_size_or_by_zero_shot_loss(tiny_base, tmp_path, caplog, order_by):
    spec = load_spec(_spec_with(tmp_path, tiny_base, {
        "schedule": "sequential", "sequential": {"order_by": order_by, "stage_steps": 2, "rounds": 2}},
        eval_every=None))
    spec.tasks[0].limits.train_examples = 10  # yesno smaller than echo's 36
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    with caplog.at_level("INFO", logger="mtft.train.shared"):
        train_shared(spec, options)
    rows = [json.loads(x) for x in (options.output / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    stage_tasks = [next(iter(r["tasks"])) for r in rows[::2]]
    if order_by == "size":
        expected = ["echo", "yesno"]
    else:
        line = next(r.getMessage() for r in caplog.records if "curriculum by base loss" in r.getMessage())
        losses = ast.literal_eval(line.split("first): ", 1)[1])  # the logged {task: loss}
        expected = sorted(losses, key=losses.__getitem__)
        assert set(expected) == {"yesno", "echo"} and losses[expected[0]] < losses[expected[1]]
    assert stage_tasks == expected * 2  # two rounds: task rotation


def test_a_starved_task_is_warned_about_and_the_table_shows_each_tasks_share(tiny_base, tmp_path, caplog):
    spec = load_spec(_spec_with(tmp_path, tiny_base, {"mixing": {"strategy": "explicit",
                                                                 "weights": {"yesno": 0.9, "echo": 0.1}}},
                                max_steps=10, eval_every=None))
    options = RunOptions(output=tmp_path / "run", registry=tmp_path / "reg")
    with caplog.at_level("WARNING", logger="mtft.train.multitask"):
        results = train_shared(spec, options)
    by_task = {r.task: r for r in results}
    own = 10 * 4  # a per-task run: max_steps x batch_size examples
    assert by_task["yesno"].seen + by_task["echo"].seen == 20 * 4
    assert by_task["echo"].share == by_task["echo"].seen / own < 0.5 < by_task["yesno"].share
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("echo trained on") and "its own adapter would see" in warned[0]
    for r in results:
        assert r.adapter_interval[0] <= r.adapter <= r.adapter_interval[1]
    assert json.loads((options.output / "results.json").read_text())["tasks"]["echo"]["share"] == by_task["echo"].share
