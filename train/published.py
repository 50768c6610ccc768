"""Scoring a published adapter on any data file (`mtft-train registry eval`), as training scored it.

The same template rendering, greedy generation, end tokens, labels and metric as the
run that published it, so on that run's eval examples it reproduces the recorded score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mtft.registry import AdapterRecord, Registry, RegistryError, fingerprint

from .data import load_examples
from .evaluate import Evaluation, end_ids, evaluate
from .hardware import choose_dtype, set_threads

log = logging.getLogger(__name__)


def score_published(registry: Registry, record: AdapterRecord, data: Path, limit: int | None = None,
                    batch_size: int = 16, threads: int | None = None) -> Evaluation:
    """`record`'s adapter on the rows of `data`; SpecError (file:line) for rows its template cannot fill."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = load_examples(Path(data), record.task, record.prefix, record.template)[:limit]
    base_dir = Path(record.base_model.path)
    if not (base_dir / "config.json").is_file():
        raise RegistryError(f"{record.name} was trained on {base_dir}, which is not here; "
                            "run where that base model is (or convert it again with mtft-train prepare-base)")
    if fingerprint(base_dir) != record.base_model.fingerprint:
        raise RegistryError(f"{base_dir} is no longer the base {record.name} was trained on (its weights changed)")
    set_threads(threads)
    dtype, reason = choose_dtype("auto", torch.device("cpu"))
    log.info("scoring %s on %d examples of %s (%s: %s)", record.name, len(examples), data, dtype, reason)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(model, registry.version_dir(record.task, record.version)).eval()
    return evaluate(model, tokenizer, examples, record.metric, record.labels, record.max_new_tokens,
                    end_ids(tokenizer, record.template.format), batch_size)
