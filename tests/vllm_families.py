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
    from vllm_greedy import engine, greedy  # this script's folder is first on sys.path

    out = {}
    for request in json.load(open(sys.argv[1])):
        try:
            llm = engine(request, distributed_executor_backend="uni")
            out[request["model"]] = greedy(llm, request)
            llm.llm_engine.engine_core.shutdown()  # frees the KV cache before the next family's
            del llm
            gc.collect()
        except Exception as exc:  # the family's row records vLLM's own error; the next family still runs
            out[request["model"]] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle)
