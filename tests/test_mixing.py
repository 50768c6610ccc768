"""Multi-task data mixing: the static formulas, the dynamic re-weighting, and the seeded sampler."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from mtft.train.mixing import DynamicMixing, TaskSampler, chi_square_p, task_probabilities
from mtft.train.multitask import LOW_SHARE
from mtft.train.spec import MixingSpec

SIZES = {"a": 1000, "b": 100, "c": 10}


def normalised(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


def realised(sampler: TaskSampler, probs: dict[str, float], slots: int = 20_000, batch: int = 100) -> list[int]:
    for _ in range(slots // batch):
        sampler.draw(probs, batch)
    return [sampler.counts[t] for t in sampler.sizes]


# The formulas, written independently of the implementation.
STRATEGIES = [
    pytest.param(MixingSpec(strategy="proportional"), {t: n for t, n in SIZES.items()}, id="proportional"),
    pytest.param(MixingSpec(strategy="uniform"), {t: 1 for t in SIZES}, id="uniform"),
    pytest.param(
        MixingSpec(strategy="temperature", temperature=3), {t: n ** (1 / 3) for t, n in SIZES.items()}, id="temperature-3"
    ),
    pytest.param(MixingSpec(strategy="sqrt"), {t: n**0.5 for t, n in SIZES.items()}, id="sqrt"),
    pytest.param(MixingSpec(strategy="capped", cap=50), {"a": 50, "b": 50, "c": 10}, id="capped-50"),
    pytest.param(  # weights may name tasks that are not mixed here; they are ignored
        MixingSpec(strategy="explicit", weights={"a": 1, "b": 3, "c": 6, "other": 100}), {"a": 1, "b": 3, "c": 6}, id="explicit"
    ),
    pytest.param(MixingSpec(strategy="dynamic"), {t: 1 for t in SIZES}, id="dynamic-starts-uniform"),
]


@pytest.mark.parametrize("mixing, raw", STRATEGIES)
def test_each_static_strategy_follows_its_formula(mixing, raw):
    probs = task_probabilities(mixing, SIZES)
    assert list(probs) == list(SIZES)
    assert probs == pytest.approx(normalised(raw), rel=1e-12)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)


def test_temperature_mixing_follows_size_to_the_one_over_t():
    for t in (0.5, 1.5, 4.0):
        probs = task_probabilities(MixingSpec(strategy="temperature", temperature=t), SIZES)
        assert probs == pytest.approx(normalised({k: n ** (1 / t) for k, n in SIZES.items()}))


def test_temperature_one_is_proportional_and_large_temperature_is_uniform():
    proportional = task_probabilities(MixingSpec(strategy="proportional"), SIZES)
    assert task_probabilities(MixingSpec(strategy="temperature", temperature=1), SIZES) == pytest.approx(proportional)
    hot = task_probabilities(MixingSpec(strategy="temperature", temperature=1e6), SIZES)
    assert hot == pytest.approx({t: 1 / 3 for t in SIZES}, abs=1e-5)


def test_sqrt_is_temperature_two():
    assert task_probabilities(MixingSpec(strategy="sqrt"), SIZES) == pytest.approx(
        task_probabilities(MixingSpec(strategy="temperature", temperature=2), SIZES)
    )


def test_the_default_mixing_keeps_a_small_task_above_the_starvation_warning_where_sqrt_does_not():
    """Temperature 5: at the sizes a user met (1k, 10k and 29k examples) the small task still gets
    over LOW_SHARE of the examples its own run would see; proportional and sqrt starve it."""
    sizes = {"small": 1_000, "mid": 10_000, "large": 29_000}

    def share(mixing: MixingSpec, task: str = "small") -> float:  # of an equal-compute run: 1/N in its own run
        return task_probabilities(mixing, sizes)[task] * len(sizes)

    assert MixingSpec() == MixingSpec(strategy="temperature", temperature=5)
    assert share(MixingSpec()) > LOW_SHARE > share(MixingSpec(strategy="sqrt")) > share(MixingSpec(strategy="proportional"))
    assert share(MixingSpec(), "mid") >= 1 and share(MixingSpec(), "large") >= 1  # the large tasks give up nothing


def test_capped_counts_no_task_above_the_cap_and_a_high_cap_is_proportional():
    assert task_probabilities(MixingSpec(strategy="capped", cap=10), SIZES) == pytest.approx({t: 1 / 3 for t in SIZES})
    assert task_probabilities(MixingSpec(strategy="capped", cap=10**6), SIZES) == pytest.approx(
        task_probabilities(MixingSpec(strategy="proportional"), SIZES)
    )


def test_explicit_weights_that_sum_to_zero_for_the_selected_tasks_are_rejected_by_name():
    mixing = MixingSpec(strategy="explicit", weights={"a": 0, "b": 0, "elsewhere": 1})
    with pytest.raises(ValueError, match=r"\['a', 'b'\] sum to 0"):
        task_probabilities(mixing, {"a": 10, "b": 20})


def test_explicit_weights_missing_a_task_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"no weight for tasks \['b'\]"):
        task_probabilities(MixingSpec(strategy="explicit", weights={"a": 1}), {"a": 10, "b": 20})


@pytest.mark.parametrize("mixing", [p.values[0] for p in STRATEGIES], ids=[p.id for p in STRATEGIES])
def test_realised_counts_match_the_formula(mixing):
    probs = task_probabilities(mixing, SIZES)
    counts = realised(TaskSampler(SIZES, seed=1), probs)
    assert sum(counts) == 20_000
    assert chi_square_p(counts, list(probs.values())) > 1e-3


def test_the_counts_check_can_fail_proportional_counts_are_not_uniform():
    counts = realised(TaskSampler(SIZES, seed=1), task_probabilities(MixingSpec(strategy="proportional"), SIZES))
    uniform = list(task_probabilities(MixingSpec(strategy="uniform"), SIZES).values())
    assert chi_square_p(counts, uniform) < 1e-6


def test_chi_square_p_edge_cases():
    assert chi_square_p([50, 50], [0.5, 0.5]) == pytest.approx(1.0)
    assert chi_square_p([10, 0, 10], [0.5, 0.0, 0.5]) == pytest.approx(1.0)  # p=0 categories are skipped
    assert chi_square_p([10, 1, 10], [0.5, 0.0, 0.5]) == 0.0  # ...but must stay empty
    # One degree of freedom: statistic (60-50)²/50 + (40-50)²/50 = 4, and p = erfc(sqrt(4 / 2)).
    assert chi_square_p([60, 40], [0.5, 0.5]) == pytest.approx(math.erfc(math.sqrt(2)), rel=1e-9)


def test_within_a_task_every_example_is_seen_once_before_any_repeats():
    sampler = TaskSampler({"a": 7, "b": 5}, seed=3)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(10):
        for task, index in sampler.draw({"a": 0.5, "b": 0.5}, 6):
            seen[task].append(index)
    for task, size in sampler.sizes.items():
        indices = seen[task]
        assert len(indices) > 2 * size  # several epochs were crossed
        for start in range(0, len(indices) - size + 1, size):
            assert sorted(indices[start : start + size]) == list(range(size))
    assert sampler.counts == {t: len(v) for t, v in seen.items()}


def test_epochs_are_shuffled_differently():
    sampler = TaskSampler({"a": 50}, seed=0)
    first, second = sampler.draw({"a": 1.0}, 50), sampler.draw({"a": 1.0}, 50)
    assert [i for _, i in first] != [i for _, i in second]


def test_rows_are_grouped_by_task_in_sizes_order():
    sampler = TaskSampler({"c": 10, "a": 10, "b": 10}, seed=0)
    for _ in range(20):
        tasks = [t for t, _ in sampler.draw({"a": 1, "b": 1, "c": 1}, 12)]
        groups = [t for i, t in enumerate(tasks) if i == 0 or t != tasks[i - 1]]
        assert groups == [t for t in ("c", "a", "b") if t in tasks]  # each task once, contiguous


def test_tasks_with_probability_zero_are_never_drawn():
    sampler = TaskSampler(SIZES, seed=0)
    rows = [t for _ in range(50) for t, _ in sampler.draw({"a": 0.0, "b": 0.7, "c": 0.3}, 40)]
    assert "a" not in rows and sampler.counts["a"] == 0
    rows = [t for _ in range(50) for t, _ in sampler.draw({"b": 1.0}, 40)]  # missing = 0
    assert set(rows) == {"b"}


def test_probabilities_naming_unknown_tasks_are_rejected():
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\]"):
        TaskSampler(SIZES, seed=0).draw({"a": 0.5, "z": 0.5}, 4)


def test_same_seed_same_rows_other_seed_other_rows():
    def rows(seed):
        sampler = TaskSampler(SIZES, seed=seed)
        return [sampler.draw({"a": 0.2, "b": 0.5, "c": 0.3}, 16) for _ in range(5)]

    assert rows(7) == rows(7)
    assert rows(7) != rows(8)


def run(mixing: DynamicMixing, sampler: TaskSampler, steps: range) -> list[list[tuple[str, int]]]:
    """A stand-in training loop: task a's loss stays flat, b's falls, c's falls fast."""
    batches = []
    for step in steps:
        batch = sampler.draw(mixing.probabilities(step), 8)
        batches.append(batch)
        for task in dict.fromkeys(t for t, _ in batch):
            mixing.observe_loss(task, {"a": 2.0, "b": 2.0 * 0.99**step, "c": 2.0 * 0.9**step}[task])
    return batches


def roundtrip_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def roundtrip_torch(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("roundtrip", [roundtrip_json, roundtrip_torch], ids=["json", "torch.save"])
def test_a_resumed_run_draws_the_same_rows_as_an_uninterrupted_one(roundtrip):
    tasks = list(SIZES)
    straight = run(DynamicMixing(tasks, 0.1, 5, "loss"), TaskSampler(SIZES, seed=4), range(60))

    mixing, sampler = DynamicMixing(tasks, 0.1, 5, "loss"), TaskSampler(SIZES, seed=4)
    before = run(mixing, sampler, range(33))  # 33: mid update interval, mid epoch of c
    states = roundtrip({"mixing": mixing.state_dict(), "sampler": sampler.state_dict()})
    mixing, sampler = DynamicMixing(tasks, 0.1, 5, "loss"), TaskSampler(SIZES, seed=4)
    mixing.load_state_dict(states["mixing"])
    sampler.load_state_dict(states["sampler"])
    after = run(mixing, sampler, range(33, 60))

    assert before + after == straight
    assert sampler.counts == {t: sum(1 for b in straight for r in b if r[0] == t) for t in SIZES}


def test_state_from_another_sampler_is_rejected():
    with pytest.raises(ValueError, match="sampler state is for"):
        TaskSampler({"a": 5}, seed=0).load_state_dict(TaskSampler({"a": 6}, seed=0).state_dict())


def test_dynamic_mixing_samples_a_flat_loss_task_more_than_a_falling_one():
    sampler = TaskSampler(SIZES, seed=0)
    mixing = DynamicMixing(list(SIZES), 0.1, 5, "loss")
    run(mixing, sampler, range(200))
    probs = mixing.probabilities(200)
    assert probs["a"] > probs["b"] > probs["c"]
    assert sampler.counts["a"] > sampler.counts["b"] > sampler.counts["c"]


def test_loss_slowness_is_the_running_loss_over_the_first_loss():
    mixing = DynamicMixing(["a", "b"], floor=0.0, update_every=1, signal="loss")
    mixing.observe_loss("a", 4.0)
    mixing.observe_loss("a", 2.0)  # running loss 0.9 * 4 + 0.1 * 2 = 3.8, slowness 0.95; b unseen = 1
    assert mixing.probabilities(1) == pytest.approx({"a": 0.95 / 1.95, "b": 1 / 1.95})


def test_eval_signal_weights_tasks_by_one_minus_score_above_the_floor():
    mixing = DynamicMixing(["a", "b", "c", "d"], floor=0.4, update_every=1, signal="eval")
    mixing.observe_eval({"a": 0.0, "b": 0.5, "c": 1.0})  # slowness 1, 0.5, 1e-3; d unseen = 1
    total = 1 + 0.5 + 1e-3 + 1
    expected = {t: 0.1 + 0.6 * s / total for t, s in {"a": 1, "b": 0.5, "c": 1e-3, "d": 1}.items()}
    assert mixing.probabilities(0) == pytest.approx(expected)


def test_every_task_keeps_at_least_floor_over_n():
    mixing = DynamicMixing(["a", "b", "c"], floor=0.3, update_every=1, signal="loss")
    mixing.observe_loss("a", 5.0)
    mixing.observe_loss("b", 5.0)
    for _ in range(100):
        mixing.observe_loss("b", 0.0)  # b is learnt: its slowness falls towards 0
    probs = mixing.probabilities(1)
    assert min(probs.values()) >= 0.3 / 3
    assert probs["b"] == pytest.approx(0.1, abs=0.01)
    assert sum(probs.values()) == pytest.approx(1.0)


def test_dynamic_mixing_reweights_only_every_update_every_steps():
    mixing = DynamicMixing(["a", "b"], floor=0.0, update_every=10, signal="loss")
    uniform = {"a": 0.5, "b": 0.5}
    assert mixing.probabilities(0) == uniform
    mixing.observe_loss("a", 1.0)
    mixing.observe_loss("a", 0.0)
    mixing.observe_loss("b", 1.0)
    assert mixing.probabilities(3) == uniform
    reweighted = mixing.probabilities(10)
    assert reweighted["b"] > reweighted["a"]
    mixing.observe_loss("b", 0.0)
    assert mixing.probabilities(11) == reweighted
    assert mixing.probabilities(20) != reweighted


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.observe_loss("z", 1.0), "unknown task 'z'"),
        (lambda m: m.observe_loss("a", float("nan")), "finite"),
        (lambda m: m.observe_eval({"a": 1.5}), r"in \[0, 1\]"),
    ],
    ids=["unknown-task", "nan-loss", "score-out-of-range"],
)
def test_dynamic_mixing_rejects_bad_observations(call, match):
    with pytest.raises(ValueError, match=match):
        call(DynamicMixing(["a", "b"], floor=0.1, update_every=1, signal="loss"))
