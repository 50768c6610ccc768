"""`python -m mtft.serve.vllm_plugin [-v]`: build the compiled LoRA kernel for this machine (if it is not
built) and print where it is. A failed build is reported, not fatal: serving then runs the torch fused path."""

import sys

from .kernel import KernelError, build

try:
    print(f"mtft LoRA kernel: {build(verbose='-v' in sys.argv[1:])}")
except KernelError as error:
    print(f"mtft LoRA kernel: {error}", file=sys.stderr)
