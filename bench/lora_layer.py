"""The LoRA entry point alone: the torch fused path against the compiled kernel, per layer call.

    .venv/bin/python bench/lora_layer.py            # part of `make bench` (section B1-layer, ~1 min)

SmolLM2-135M's four LoRA layer shapes (q/k/v: 576 -> 576+192+192, o: 576 -> 576, gate/up:
576 -> 2x1536, down: 1536 -> 576), rank 8, 8 slots of random weights in the model's dtype, each
path's layout built from them as the plugin builds it once per adapter load (`fused.Stacked`:
fp32 and block-diagonal for torch, the model's dtype and the slices side by side for the
kernel), decode-sized batches of 32, 128 and 256 rows, every row on one adapter or the rows
spread round robin over 8 (every fifth row without one). Each cell times `fused.lora_linear` (with the step's cached plan, as in the
engine) and `kernel.lora_linear` alternately on the same tensors, median of 5 rounds of 100 calls,
and reports ms per decode step (x 30 layers). No vLLM engine: what the engine adds (the base
model's layers evicting the adapters' weights from cache between calls) is in B1's profile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import report  # noqa: E402  (bench/report.py: the make bench report)

from mtft.serve.vllm_plugin import fused, kernel  # noqa: E402

LAYERS = {"q/k/v": (576, (576, 192, 192)), "o": (576, (576,)), "gate/up": (576, (1536, 1536)), "down": (1536, (576,))}
DEPTH, RANK, SLOTS = 30, 8, 8


def timed(call, calls: int = 100, rounds: int = 5) -> list[float]:
    """Seconds per call, one figure per round."""
    call()
    out = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        out.append((time.perf_counter() - began) / calls)
    return out


def cell(rows: int, adapters: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[float, float, float]:
    """(torch ms per step, kernel ms per step, largest difference between their outputs)."""
    torch_s, kernel_s, diff = 0.0, 0.0, 0.0
    slots = torch.tensor([i % adapters for i in range(rows)])
    if adapters > 1:
        slots[::5] = -1
    runs, lengths = torch.unique_consecutive(slots, return_counts=True)
    batch = fused.plan(tuple(runs.tolist()), tuple(lengths.tolist()))
    for width_in, sizes in LAYERS.values():
        # vLLM keeps the slots in the model's dtype; each path builds its own layout from them.
        lora_a = tuple((torch.randn(SLOTS, 1, RANK, width_in, generator=generator) * 0.05).to(dtype) for _ in sizes)
        lora_b = tuple((torch.randn(SLOTS, 1, size, RANK, generator=generator) * 0.05).to(dtype) for size in sizes)
        x = torch.randn(rows, width_in, generator=generator).to(dtype)
        y = torch.randn(rows, sum(sizes), generator=generator).to(dtype)
        weights = fused.Stacked.of(lora_a, lora_b, sizes)
        kernel_dtype = kernel.weight_dtype(lora_a[0], x)
        packed = fused.Stacked.of(lora_a, lora_b, sizes, kernel_dtype, kernel.layout(kernel_dtype))
        by_torch, by_kernel = y.clone(), y.clone()
        fused.lora_linear(by_torch, x, weights, batch, 0.5)
        kernel.lora_linear(by_kernel, x, packed, slots, sizes, 0.5)
        diff = max(diff, float((by_torch.float() - by_kernel.float()).abs().max()))
        pair = [timed(lambda: fused.lora_linear(by_torch, x, weights, batch, 0.5)),
                timed(lambda: kernel.lora_linear(by_kernel, x, packed, slots, sizes, 0.5))]
        torch_s += statistics.median(pair[0])
        kernel_s += statistics.median(pair[1])
    return torch_s * DEPTH * 1e3, kernel_s * DEPTH * 1e3, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vLLM's worker on 2 cores: 1-2)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel.build()
    kernel.load()
    generator = torch.Generator().manual_seed(0)
    lines = ["| dtype | rows | adapters | torch fused ms/step | kernel ms/step | kernel speed-up | max difference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    data = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for rows in (32, 128, 256):
            for adapters in (1, SLOTS):
                by_torch, by_kernel, diff = cell(rows, adapters, dtype, generator)
                data.append({"dtype": dtype_name, "rows": rows, "adapters": adapters, "torch_ms": by_torch,
                             "kernel_ms": by_kernel, "max_difference": diff})
                lines.append(f"| {dtype_name} | {rows} | {adapters} | {by_torch:.1f} | {by_kernel:.1f} | "
                             f"{by_torch / by_kernel:.2f}x | {diff:.1e} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    taken = f"in the plugin's default mode the kernel takes every batch of at most {fused.MAX_ROWS} rows"
    report.save("B1-layer", "The LoRA entry point alone: torch fused path vs compiled kernel", table, data,
                notes=[f"SmolLM2-135M's 4 LoRA layer shapes x {DEPTH} layers, rank {RANK}, {SLOTS} slots, "
                       f"{args.threads} thread(s), median of 5 rounds of 100 calls", taken])


if __name__ == "__main__":
    main()
