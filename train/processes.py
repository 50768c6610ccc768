"""Several training processes (`accelerate launch`): which rows each takes, and what they share.

Every process runs the same program and draws the same global steps (the step plans are seeded),
takes its share of every micro-batch (`Ranks.shard`) and, once per optimizer step, adds its
gradients to everyone else's (`Ranks.sum_gradients`). Losses are normalised by the whole step's
answer tokens, so N processes compute exactly the gradient one process computes on the same
global batch: `training.batch_size` is the global micro-batch, split over the processes.

Why not DDP's wrapper: processes run different numbers of forwards per step (rows are split by
length, and a short last batch of an epoch may leave one process none), many steps leave some
parameters untouched (a finished task's adapter in one pass, the embedding of a task absent from
a shared step), and the uncertainty weights live outside the model. One explicit sum per step
over the trainable tensors is DDP's arithmetic without its constraints, and a parameter no
process touched keeps no gradient, so AdamW skips it exactly as it does in one process.

A base too big for one device is sharded with FSDP2 (`accelerate launch` with an FSDP config,
`fsdp_version: 2`; `FrozenBase.shard`). Only the frozen base is: the LoRA layers are put in after
sharding, so FSDP never sees them, and they are trained exactly as above (whole on every process,
gradients summed once per step). Wrapping them in FSDP instead would have FSDP reduce-scatter
their gradients in every backward, which cannot leave a parameter that no process touched without
a gradient, and would shard the optimizer state of a few megabytes to save nothing; keeping them
outside keeps one process == N processes exact, with sharding or without. What sharding adds is
lockstep: every forward and backward gathers the base's weights with every process, so each
process runs as many as the busiest (`Ranks.most`, the loop's idle passes), and the main
process's evaluations run on the base gathered whole (`FrozenBase.whole`). DeepSpeed is refused
with a message that points at FSDP.

Files, the registry and evaluation belong to the main process; what steers training (scores)
is broadcast from it (`Ranks.from_main`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .trackers import FOLDER as TRACKER_FOLDER

T = TypeVar("T")
# The other processes wait in a collective while the main one evaluates, scores the base or publishes:
# longer than torch's defaults (NCCL 10 min, gloo 30 min) for a large eval split on a big model.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
DATA_PARALLEL = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU"}
# FSDP settings accelerate applies in `prepare`, which mtft-train does not call (it shards the frozen
# base itself, `FrozenBase.shard`): set, they would be dropped without a word, so they are refused.
FSDP_NOT_APPLIED = {
    "activation_checkpointing": "use training.gradient_checkpointing, which recomputes the frozen base's layers",
    "cpu_ram_efficient_loading": "every process loads the checkpoint once and keeps its shard",
}


def check_processes(batch_size: int, processes: int, distributed_type: str, fsdp_version: int | None = None,
                    quantized: bool = False, fsdp_set: Sequence[str] = ()) -> list[str]:
    """What makes a launch unusable for this spec; every problem at once, before any training.
    `fsdp_set`: the FSDP settings of `FSDP_NOT_APPLIED` the launch turns on."""
    problems = [f"accelerate's fsdp_{name}: true is not applied by mtft-train ({FSDP_NOT_APPLIED[name]}); set "
                f"fsdp_{name}: false in the accelerate config" for name in fsdp_set]
    if distributed_type == "DEEPSPEED":
        problems.append("accelerate distributed_type DEEPSPEED is not supported: to shard a base too big for one "
                        "device use FSDP (deploy/accelerate/1node-ngpu-fsdp.yaml; 1node-cpu-fsdp.yaml on CPUs)")
    elif distributed_type == "FSDP" and fsdp_version != 2:
        problems.append(f"accelerate FSDP with fsdp_version {fsdp_version} is not supported: mtft-train shards the "
                        "frozen base with FSDP2 (fully_shard); set fsdp_version: 2 in the accelerate config "
                        "(deploy/accelerate/1node-ngpu-fsdp.yaml)")
    elif distributed_type == "FSDP" and quantized:
        problems.append("training.base_quantization with FSDP is not supported: FSDP2 cannot shard bitsandbytes' "
                        "packed 4-bit weights (each process would hold them all); use a data-parallel config "
                        "(deploy/accelerate/1node-ngpu.yaml) with the 4-bit base, or FSDP with a full-precision base")
    elif distributed_type not in DATA_PARALLEL | {"FSDP"}:
        problems.append(f"accelerate distributed_type {distributed_type} is not supported: mtft-train trains with "
                        "data parallelism over N processes (distributed_type MULTI_GPU, or MULTI_CPU on CPUs), "
                        "the base sharded with FSDP or not; use deploy/accelerate/1node-ngpu.yaml, "
                        "1node-ngpu-fsdp.yaml or multinode.yaml")
    if batch_size % processes:
        problems.append(f"training.batch_size {batch_size} does not divide into the {processes} processes of this "
                        f"launch: every process takes batch_size / processes examples of each micro-batch; make "
                        f"batch_size a multiple of {processes} or launch a number of processes that divides it")
    return problems


def fsdp_plugin(accelerator):
    """The FSDP plugin of an `accelerate launch` with an FSDP config, else None.

    accelerate makes a launch FSDP only on accelerators; on CPUs it runs the processes as MULTI_CPU
    and would drop the config without a word. The plugin is then built from the same launch
    settings and put where accelerate's FSDP2 preparation reads it, so the base is sharded (over
    gloo) as the config asks.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return plugin


def start_accelerator(report_to: Sequence[str] = (), folder: Path | None = None):
    """The run's accelerator: CUDA where there is one, collectives that outwait an evaluation, and the
    experiment trackers `report_to` names (`trackers.py`), logging under `folder`/trackers."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    logs = ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / TRACKER_FOLDER)) if folder else None
    return Accelerator(cpu=not torch.cuda.is_available(), log_with=list(report_to) or None, project_config=logs,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])


def is_main_process() -> bool:
    """Whether this is the launch's main process (True without `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState().is_main_process


class Ranks:
    """This process's place among the launch's processes, through the accelerator that started them."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.count = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        # A sharded base gathers its weights in every forward and backward, with every process at once.
        self.lockstep = self.count > 1 and getattr(getattr(accelerator, "state", None), "fsdp_plugin", None) is not None

    @property
    def local_count(self) -> int:
        """Processes on this machine (torchrun's LOCAL_WORLD_SIZE), which share its CPU cores."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.count))

    def shard(self, rows: list, length: Callable[[object], int]) -> list:
        """This process's rows of a micro-batch: dealt round-robin by decreasing length.

        Deterministic, so every process knows every other's share; dealing by length keeps the
        processes' tokens (and so their step times) close. The main process gets the longest row,
        so it has rows whenever the micro-batch has any.
        """
        if self.count == 1:
            return rows
        order = sorted(range(len(rows)), key=lambda i: (-length(rows[i]), i))
        return [rows[i] for i in order[self.rank::self.count]]

    def sum_gradients(self, params: list[torch.nn.Parameter], extra: list[float]) -> list[float]:
        """Sum every process's gradients of `params` (and the numbers in `extra`) into every process.

        A parameter that no process gave a gradient keeps none; one that some did gets the sum.
        """
        if self.count == 1:
            return extra
        device = params[0].device if params else self.accelerator.device
        # Which parameters have a gradient, and the counters, in float64 (exact token counts).
        head = torch.tensor([float(p.grad is not None) for p in params] + list(extra), dtype=torch.float64,
                            device=device)
        head = self.accelerator.reduce(head, reduction="sum").tolist()
        used = [i for i, p in enumerate(params) if head[i] > 0]
        if used:
            grads = torch.cat([(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i]))
                               .detach().float().flatten() for i in used])
            grads = self.accelerator.reduce(grads, reduction="sum")
            at = 0
            for i in used:
                size = params[i].numel()
                params[i].grad = grads[at:at + size].view_as(params[i]).to(params[i].dtype).clone()
                at += size
        return head[len(params):]

    def most(self, count: int) -> int:
        """The largest `count` of any process where the processes run in lockstep (a sharded base), else `count`."""
        if not self.lockstep:
            return count
        return int(self.accelerator.reduce(torch.tensor([count], device=self.accelerator.device), reduction="max"))

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` on the main process only; every process returns its result."""
        value = compute() if self.is_main else None
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def seed_step(self, seed: int, step: int) -> None:
        """Per process and step random numbers (dropout) when several processes share a step.

        Each process's rows then draw their own dropout masks, and a resumed run draws the same
        ones whatever the processes did before; one process keeps the checkpointed RNG stream.
        """
        if self.count > 1:
            torch.manual_seed((seed * 1_000_003 + step) * 1_009 + self.rank)
