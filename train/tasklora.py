"""Task-conditioned LoRA layers: many task adapters, or one shared adapter, inside one frozen base.

PEFT refuses batches that mix adapters in training mode, so multi-task training has its own
layer. Every target Linear of the base gets either one LoRA per task (`separate`: all task
adapters trained in one pass) or one LoRA shared by all tasks and conditioned on learned task
embeddings (`shared`, in the spirit of MTL-LoRA, Yang et al. 2024):

    delta_t(x) = s · B_t Λ_t A x,    B_t = Σ_k softmax(θ_t / τ)_k B_k

A (down) and the B_k (up) are shared; the task embedding is Λ_t (an r×r transform of the rank
space, initialised to the identity) and θ_t (the task's mixture over K up-projections, K=1 by
default). Folding B_t Λ_t gives every task an ordinary PEFT LoRA of the same rank, so vLLM serves
exported tasks unchanged. Each batch row goes through its own task's weights; the rows of one task
are contiguous and `TaskLoRA.rows` says which task each run of rows belongs to.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

PEFT_PREFIX = "base_model.model."  # get_peft_model_state_dict keys: PEFT_PREFIX + module + ".lora_A.weight"


def peft_init(model: nn.Module, lora_config) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """PEFT's own initial LoRA for `model` (seed first), and the model back unwrapped.

    Starting from PEFT's init, not a copy of its logic, keeps our layers equal to
    `mtft-train adapters` at step 0 whatever PEFT version is installed.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(model, lora_config)
    return get_peft_model_state_dict(peft_model), peft_model.unload()


def save_adapter(folder: Path, lora_config, weights: dict[str, torch.Tensor], base_dir: str | Path) -> None:
    """`weights` (a PEFT LoRA state dict) as the adapter folder PEFT's `save_pretrained` writes.

    Its config names `base_dir`, which vLLM's resolver matches to the served model. Written
    directly: wrapping the base in a PeftModel only to save it is the slow part of PEFT's way.
    """
    config = copy.copy(lora_config)
    config.base_model_name_or_path, config.inference_mode = str(base_dir), True
    config.save_pretrained(folder)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
              Path(folder) / "adapter_model.safetensors", metadata={"format": "pt"})


class _Rows:
    """Which task each run of batch rows belongs to; one object shared by every layer."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] | None = None  # (task index, rows), in batch order
        self.task: int | None = None  # every row: one task (generation)

    def segments(self, batch: int) -> list[tuple[int, int, int]]:
        if self.task is not None:
            return [(self.task, 0, batch)]
        if self.runs is None:
            raise RuntimeError("TaskLoRA: say which task each row is for (TaskLoRA.rows or .task)")
        out, start = [], 0
        for task, count in self.runs:
            out.append((task, start, start + count))
            start += count
        if start != batch:
            raise RuntimeError(f"TaskLoRA: rows cover {start} of {batch} batch rows")
        return out


class _TaskLinear(nn.Module):
    """A frozen Linear plus a task-dependent low-rank delta; each run of batch rows uses its own task's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, rows: _Rows):
        super().__init__()
        self.base, self.rows = base, rows
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def _params(n: int, *shape: int, init=torch.zeros) -> nn.ParameterList:
        return nn.ParameterList(nn.Parameter(init(*shape)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adapter weights, their gradients and optimizer state stay float32 (as PEFT keeps them), but
        # their matmuls run in the base's dtype, as under mixed precision: on a bfloat16 base, casting
        # every activation to float32 for a rank-8 product cost more than the product (a third of a
        # LoRA training step on CPU; bench/train_speed.py).
        segments = self.rows.segments(x.shape[0])
        down = [(self.down(self.dropout(x[start:stop]), task), task) for task, start, stop in segments]
        return self.base(x) + self.up(down) * self.scaling

    def down(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The rank-space (r wide) activations of one task's rows."""
        raise NotImplementedError

    def up(self, down: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """The deltas of every run of rows, in batch order."""
        raise NotImplementedError

    def export(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of an ordinary LoRA equal to this task's delta."""
        raise NotImplementedError


def _as(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weight` in `x`'s dtype (a no-op on a float32 base); autograd keeps its gradient float32."""
    return weight.to(x.dtype)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _LoRAProduct(torch.autograd.Function):
    """y = x W^T + bias, plus s · B_t A_t x' on each run of rows (x' = dropout(x), or x), with the
    backward written out.

    The same sums as `_TaskLinear.forward`'s composition in fewer passes over the activations:
    autograd's version adds the delta to the base product, scales it, slices the rows for each task
    and, in backward, scatters the slice's gradient into a zero tensor and sums the two input
    gradients, each a pass over a (tokens × features) tensor in every projection of every layer.
    Here the delta is accumulated into the base product by the same matmul call (`addmm_`), and
    the input gradient of the delta into the base's. A and B arrive float32 and take the input's
    dtype for the products, as in `_as`; their gradients go back in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, scaling, bounds, *pairs):
        flat = x.reshape(-1, x.shape[-1])
        lora_in = flat if dropped is None else dropped.reshape(flat.shape)
        per_row = flat.shape[0] // x.shape[0]  # positions in one batch row
        y = F.linear(flat, weight, bias)
        saved = []
        for (start, stop), a, b in zip(bounds, pairs[0::2], pairs[1::2]):
            rows = slice(start * per_row, stop * per_row)
            a, b = a.to(x.dtype), b.to(x.dtype)
            h = lora_in[rows] @ a.t()
            y[rows].addmm_(h, b.t(), alpha=scaling)
            saved += [a, b, h]
        ctx.save_for_backward(lora_in, weight, *saved)
        ctx.scaling, ctx.rows, ctx.shape = scaling, [slice(s * per_row, e * per_row) for s, e in bounds], x.shape
        ctx.dtypes = [p.dtype for p in pairs]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        lora_in, weight, *saved = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        wants_x, wants_dropped = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = g @ weight if wants_x else None
        # Without dropout the delta's input gradient goes straight into the base's.
        grad_in = torch.empty_like(lora_in) if wants_dropped else grad_x
        grads = []
        for i, rows in enumerate(ctx.rows):
            a, b, h = saved[3 * i:3 * i + 3]
            g_rows = g[rows]
            grad_h = (g_rows @ b) * ctx.scaling
            grads += [(grad_h.t() @ lora_in[rows]).to(ctx.dtypes[2 * i]),
                      ((g_rows.t() @ h) * ctx.scaling).to(ctx.dtypes[2 * i + 1])]
            if grad_in is grad_x and grad_x is not None:
                grad_x[rows].addmm_(grad_h, a)
            elif wants_dropped:
                torch.mm(grad_h, a, out=grad_in[rows])
        return (None if grad_x is None else grad_x.view(ctx.shape),
                grad_in.view(ctx.shape) if wants_dropped else None, None, None, None, None, *grads)


class SeparateLoRALinear(_TaskLinear):
    """One ordinary LoRA (A_t, B_t) per task: N adapters trained in one pass."""

    def __init__(self, base: nn.Linear, tasks: int, rank: int, alpha: float, dropout: float, rows: _Rows):
        super().__init__(base, rank, alpha, dropout, rows)
        self.lora_A = self._params(tasks, rank, base.in_features)
        self.lora_B = self._params(tasks, base.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.base) is not nn.Linear:  # a 4-bit base computes its own product: the plain composition
            return super().forward(x)
        segments = self.rows.segments(x.shape[0])
        dropped = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        pairs = [p for task, _, _ in segments for p in (self.lora_A[task], self.lora_B[task])]
        return _LoRAProduct.apply(x, dropped, self.base.weight, self.base.bias, self.scaling,
                                  [(start, stop) for _, start, stop in segments], *pairs)

    def down(self, x, task):
        return F.linear(x, _as(self.lora_A[task], x))

    def up(self, down):
        return _cat([F.linear(h, _as(self.lora_B[task], h)) for h, task in down])

    def export(self, task):
        return self.lora_A[task], self.lora_B[task]


class SharedLoRALinear(_TaskLinear):
    """One LoRA for all tasks: shared A and B_k, per task a transform Λ_t and a mixture θ_t over the B_k."""

    def __init__(self, base: nn.Linear, tasks: int, rank: int, alpha: float, dropout: float, rows: _Rows,
                 up_projections: int, tau: float):
        super().__init__(base, rank, alpha, dropout, rows)
        self.tau = tau
        self.lora_A = self._params(1, rank, base.in_features)
        self.lora_B = self._params(up_projections, base.out_features, rank)
        self.transform = self._params(tasks, rank, init=torch.eye)
        # Random θ breaks the symmetry between up-projections (equal B_k would stay equal).
        self.up_logits = (self._params(tasks, up_projections, init=lambda k: 0.5 * torch.randn(k))
                          if up_projections > 1 else None)

    def mixed_up(self, task: int) -> torch.Tensor:
        """B_t: the task's up-projection before its transform."""
        if self.up_logits is None:
            return self.lora_B[0]
        weights = torch.softmax(self.up_logits[task] / self.tau, dim=0)
        return torch.einsum("k,kor->or", weights, torch.stack(list(self.lora_B)))

    def down(self, x, task):
        return F.linear(F.linear(x, _as(self.lora_A[0], x)), _as(self.transform[task], x))

    def up(self, down):
        if self.up_logits is None:
            # Rows differ only in the rank space (r wide): one up-projection serves the whole batch.
            h = _cat([h for h, _ in down])
            return F.linear(h, _as(self.lora_B[0], h))
        return _cat([F.linear(h, _as(self.mixed_up(task), h)) for h, task in down])

    def export(self, task):
        return self.lora_A[0], self.mixed_up(task) @ self.transform[task]


class TaskLoRA:
    """Task-conditioned LoRA on every module named in a PEFT initial state (`init`)."""

    def __init__(self, model: nn.Module, tasks: list[str], init: dict[str, torch.Tensor], rank: int, alpha: float,
                 dropout: float, shared: bool, up_projections: int = 1, tau: float = 1.0):
        self.model, self.tasks = model, list(tasks)
        self._rows = _Rows()
        self.layers: dict[str, _TaskLinear] = {}
        names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in init})
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, attr)
            layer = (SharedLoRALinear(base, len(tasks), rank, alpha, dropout, self._rows, up_projections, tau) if shared
                     else SeparateLoRALinear(base, len(tasks), rank, alpha, dropout, self._rows))
            with torch.no_grad():
                for a in layer.lora_A:
                    a.copy_(init[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                for b in layer.lora_B:
                    b.copy_(init[f"{PEFT_PREFIX}{name}.lora_B.weight"])
            layer.to(base.weight.device)
            setattr(parent, attr, layer)
            self.layers[name] = layer

    def index(self, task: str) -> int:
        return self.tasks.index(task)

    @contextmanager
    def rows(self, runs: list[tuple[str, int]]):
        """Forward passes inside see `runs` = [(task, row count), ...] in batch order."""
        self._rows.runs, self._rows.task = [(self.index(t), n) for t, n in runs], None
        try:
            yield
        finally:
            self._rows.runs = None

    @contextmanager
    def task(self, name: str):
        """Every row is `name`'s: the model behaves as that task's exported adapter (generation)."""
        previous = self._rows.task
        self._rows.task = self.index(name)
        try:
            yield
        finally:
            self._rows.task = previous

    def parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """A task's own adapter (separate) or every trainable parameter (task=None)."""
        if task is None:
            return [p for layer in self.layers.values() for n, p in layer.named_parameters() if not n.startswith("base.")]
        i = self.index(task)
        return [p for layer in self.layers.values() for p in (layer.lora_A[i], layer.lora_B[i])]

    def export(self, task: str) -> dict[str, torch.Tensor]:
        """The task's adapter as a PEFT LoRA state dict (set_peft_model_state_dict reads it)."""
        i = self.index(task)
        out = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                a, b = layer.export(i)
                out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().clone().contiguous()
                out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().clone().contiguous()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, layer in self.layers.items()
                for k, v in layer.state_dict().items() if not k.startswith("base.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict().keys()
        if state.keys() != expected:
            raise ValueError(f"TaskLoRA state does not match: missing {sorted(expected - state.keys())[:3]}, "
                             f"unexpected {sorted(state.keys() - expected)[:3]}")
        for name, layer in self.layers.items():
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            layer.load_state_dict(own, strict=False)  # the frozen base's weights are not in `state`

    def remove(self) -> nn.Module:
        """Put the base Linears back; the model is the untouched frozen base again."""
        for name, layer in self.layers.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), attr, layer.base)
        self.layers = {}
        return self.model
