"""The compiled fused LoRA kernel (`lora_kernel.cpp`): built once per machine, loaded where built.

torch's cpp_extension builds it (ninja, the machine's C++ compiler, torch's headers; nothing
downloaded) into `$MTFT_HOME/kernels/<key>/`, where the key hashes the source, the flags, torch's
version and the CPU's feature flags: it is compiled with `-march=native`, so a build must never be
loaded on another kind of CPU. `make kernel` (run by `make test`, `make demo` and `make bench`) and
`mtft-serve` build it (about 20 s the first time); vLLM's processes only load a build that is
there and never compile while serving.
Where there is none, or it fails to load, the fused path stays in torch (`fused.lora_linear`) and
the plugin says so in one log line. `python -m mtft.serve.vllm_plugin` builds it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

from .fused import PAIRS, SIDE_BY_SIDE, Stacked

SOURCE = Path(__file__).with_name("lora_kernel.cpp")
NAME = "mtft_lora_kernel"
# -fopenmp: at::parallel_for's OpenMP body is compiled into the caller; the runtime it links is
# the libgomp.so.1 torch has already loaded (same soname), so there is one thread pool.
FLAGS = ("-O3", "-march=native", "-fopenmp")
BUILD_HINT = "build it with `python -m mtft.serve.vllm_plugin` (make kernel does)"

_loaded: str | None = None  # the library's path once loaded in this process


class KernelError(Exception):
    """The kernel cannot be built or loaded here; the message says why and what to do."""


def _home() -> Path:
    home = os.environ.get("MTFT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mtft"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a -march=native build is never shared across CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    key = hashlib.sha256("\n".join((SOURCE.read_text(), " ".join(FLAGS), torch.__version__, sys.version,
                                    _cpu_flags())).encode()).hexdigest()[:16]
    return _home() / "kernels" / f"{NAME}-{key}"


def library() -> Path:
    return build_dir() / f"{NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernel for this machine unless it is built already; its library's path."""
    path = library()
    if path.is_file():
        return path
    from torch.utils import cpp_extension

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # cpp_extension locks the build folder, so concurrent builds wait for one another.
        cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
                           build_directory=str(path.parent), is_python_module=False, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as error:  # no compiler, no ninja, a compile error
        raise KernelError(f"could not build the mtft LoRA kernel in {path.parent}: {error}") from error
    global _loaded
    _loaded = str(path)
    return path


def load() -> None:
    """Load the built kernel into this process (`torch.ops.mtft.lora_linear`); never compiles."""
    global _loaded
    if _loaded is not None:
        return
    path = library()
    if not path.is_file():
        raise KernelError(f"the mtft LoRA kernel is not built for this machine ({path} is missing): {BUILD_HINT}")
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise KernelError(f"the mtft LoRA kernel at {path} does not load ({error}): remove it and {BUILD_HINT}") from error
    _loaded = str(path)


def weight_dtype(slot_weights: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype the kernel reads a layer's stacked weights in: vLLM's slot tensors' dtype where the
    activations have it too (bf16 or fp16 weights are then exact and half the bytes: a decode step
    reads every adapter's weights from memory once, after the rest of the model has passed through
    the caches), else float32."""
    return slot_weights.dtype if slot_weights.dtype == x.dtype else torch.float32


def layout(weights_dtype: torch.dtype) -> str:
    """The `Stacked` layout the kernel reads weights of `weights_dtype` in (see `weight_dtype`): bf16
    pairs where the build multiplies bf16 with AVX-512-bf16, else the slices side by side. Call
    `load()` first."""
    return PAIRS if weights_dtype == torch.bfloat16 and _bf16_pairs() else SIDE_BY_SIDE


@functools.cache
def _bf16_pairs() -> bool:  # asked once: the plugin asks for every layer's call
    return bool(torch.ops.mtft.bf16_pairs())


def lora_linear(y: torch.Tensor, x: torch.Tensor, weights: Stacked, slots: torch.Tensor, sizes: tuple[int, ...],
                scale: float) -> None:
    """y[row, :sum(sizes)] += scale * (x[row] @ A_s^T) @ B_s in place, for each row's slot s >= 0
    (`sizes`: the layer's output slices); rows with slot -1 are left as they are. `weights` in a
    kernel layout (`layout()`). Call `load()` first."""
    if weights.layout not in (SIDE_BY_SIDE, PAIRS):
        raise ValueError(f"the kernel reads B^T {SIDE_BY_SIDE} or in {PAIRS}, not {weights.layout}: build the "
                         "weights with layout=kernel.layout(dtype)")
    torch.ops.mtft.lora_linear(y, x, weights.a, weights.b, slots, weights.rank, sizes, scale, weights.layout == PAIRS)
