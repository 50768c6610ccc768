"""The publish gate: a new version serves only if it scores well enough (`publish.gate` in the spec).

`no_worse` compares with the version serving now *on the same eval data*: the
serving version's recorded score when its record says it was scored on exactly
these examples (`eval_hash`), else the publisher scores it again here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from mtft.registry import AdapterRecord, Registry, RegistryError
from mtft.registry.rollout import Gate

from .data import Example
from .spec import GateSpec


def eval_hash(examples: list[Example]) -> str:
    pairs = [(e.prompt, e.target) for e in examples]
    return "sha256:" + hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def judge(rule: GateSpec, score: float, baseline: tuple[int, float] | None) -> Gate:
    """The verdict on a version scoring `score`; `baseline`: (serving version, its score on the same data)."""
    rules, failed = [], []
    if rule.min is not None:
        rules.append(f"min: {rule.min:g}")
        if score < rule.min:
            failed.append(f"{score:.3f} < min {rule.min:g}")
    if rule.no_worse is not None:
        if baseline is None:
            rules.append(f"no_worse: {rule.no_worse:g} (no version serving yet)")
        else:
            version, base = baseline
            rules.append(f"no_worse: {rule.no_worse:g} vs v{version}")
            if score < base - rule.no_worse - 1e-12:
                failed.append(f"{score:.3f} < v{version}'s {base:.3f} - {rule.no_worse:g}")
    version, base = baseline if baseline is not None and rule.no_worse is not None else (None, None)
    return Gate(passed=not failed, rule="; ".join(rules), score=score, baseline=base, baseline_version=version,
                reason="; ".join(failed))


def serving_record(registry: Registry, task: str, base_fingerprint: str) -> AdapterRecord | None:
    """The version serving `task` now, if it runs on this base (another base's scores do not compare)."""
    try:
        version = registry.serving(task).primary
        record = registry.read(task, version) if version is not None else None
    except RegistryError:
        return None
    return record if record is not None and record.base_model.fingerprint == base_fingerprint else None


def baseline(record: AdapterRecord | None, examples_hash: str,
             rescore: Callable[[AdapterRecord], float]) -> tuple[int, float] | None:
    """(version, score on these eval examples) of the serving version; rescored where its data differed."""
    if record is None:
        return None
    if record.eval_hash == examples_hash and "adapter" in record.metrics:
        return record.version, record.metrics["adapter"]
    return record.version, rescore(record)
