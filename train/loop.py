"""The training recipe for one LoRA: masked next-token loss, checkpoints, exact resume.

A checkpoint holds the adapter weights, optimizer, schedule, step and RNG
state, so a run killed at any point and resumed produces the same adapter as
one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_scheduler

from .batches import IGNORE, Tokenized, collate, micro_batches
from .spec import SpecError, TrainingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One task's training: its tokenized data and where its files go."""

    task: str
    items: list[Tokenized]
    training: TrainingSpec
    dir: Path
    config_hash: str  # of everything that shapes the result; resume refuses a mismatch
    pad_id: int

    @property
    def total_steps(self) -> int:
        return total_steps(len(self.items), self.training)


def total_steps(examples: int, t: TrainingSpec) -> int:
    """Optimizer steps: `max_steps`, else `epochs` over `examples`."""
    if t.max_steps is not None:
        return t.max_steps
    batches = -(-examples // t.batch_size)
    return max(1, round(t.epochs * batches / t.grad_accum))


def train(model, optimizer_params, job: Job, accelerator, resume: bool, on_eval=None) -> None:
    """Train `model` (a PeftModel) in place; `on_eval(step)` returns a score to log."""
    t = job.training
    optimizer = torch.optim.AdamW(optimizer_params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.schedule, optimizer, t.warmup_steps, job.total_steps)
    ckpt = job.dir / "checkpoint"
    metrics_path = job.dir / "metrics.jsonl"
    start = 0
    if resume and latest_checkpoint(ckpt):
        start = _load(latest_checkpoint(ckpt), model, optimizer, scheduler, job)
        truncate_metrics(metrics_path, start)
        log.info("%s: resuming at step %d/%d from %s", job.task, start, job.total_steps, latest_checkpoint(ckpt))
    else:
        metrics_path.unlink(missing_ok=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    stream = micro_batches(job.items, t.batch_size, t.seed, t.batching == "length")
    for _ in range(start * t.grad_accum):
        next(stream)
    bar = tqdm(total=job.total_steps, initial=start, desc=job.task, unit="step", dynamic_ncols=True)
    for step in range(start, job.total_steps):
        began = time.perf_counter()
        batch_ids = [next(stream) for _ in range(t.grad_accum)]
        epoch = batch_ids[-1][0]
        parts = [[job.items[i] for i in ids] for _, ids in batch_ids]
        # Per-token averaging over the whole optimizer step: every answer token
        # weighs the same, however the step is split into micro-batches.
        targets = sum(sum(x != IGNORE for x in item.labels) for part in parts for item in part)
        loss_sum, tokens = 0.0, 0
        for part in parts:
            batch = {k: v.to(accelerator.device) for k, v in collate(part, job.pad_id).items()}
            with accelerator.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE, reduction="sum",
            )
            accelerator.backward(loss / targets)
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began
        row = {"step": step + 1, "epoch": epoch, "loss": loss_sum / targets,
               "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / seconds, "seconds": seconds}
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if on_eval and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < job.total_steps:
            row["eval"] = on_eval(step + 1)
            model.train()
        append_metrics(metrics_path, row)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == job.total_steps:
            _save(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, step + 1, job)
    bar.close()


def append_metrics(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint: the resumed run logs them again."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def latest_checkpoint(ckpt: Path) -> Path | None:
    # A kill between the two renames in save_checkpoint leaves only the previous checkpoint.
    for candidate in (ckpt, ckpt.with_name("checkpoint.old")):
        if (candidate / "state.pt").exists():
            return candidate
    return None


def save_checkpoint(ckpt: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write trainable tensors and training state atomically: a kill leaves the old or the new one."""
    tmp, old = ckpt.with_name("checkpoint.tmp"), ckpt.with_name("checkpoint.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "adapter.safetensors")
    torch.save({**state, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "state.pt")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ckpt, old)
    os.rename(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, config_hash: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and state of a checkpoint made with the same config; restores the RNGs."""
    state = torch.load(ckpt / "state.pt", weights_only=False)
    if state["config_hash"] != config_hash:
        raise SpecError(
            str(ckpt),
            [
                f"checkpoint of {what} was made with a different spec or base model; "
                "rerun without --resume to start over, or restore the spec it was made with"
            ],
        )
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return load_file(ckpt / "adapter.safetensors"), state


def _save(ckpt: Path, model, optimizer, scheduler, step: int, job: Job) -> None:
    state = {"step": step, "config_hash": job.config_hash, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    save_checkpoint(ckpt, get_peft_model_state_dict(model), state)


def _load(ckpt: Path, model, optimizer, scheduler, job: Job) -> int:
    tensors, state = load_checkpoint(ckpt, job.config_hash, f"task {job.task!r}")
    set_peft_model_state_dict(model, tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
