"""Evaluation through vLLM's offline engine: the answers HF `generate` gives, in less time.

The engine lives in a worker process (`python -m mtft.train.vllm_eval`): vLLM must own its main
module and spawns its own engine core, and its threads must not share torch's state with the
training that continues afterwards. The training process sends prompt token ids, the end tokens
and an adapter folder (a LoRARequest of its own per evaluation, so no cache is ever shared
between two states of an adapter); the worker returns the answers' token ids, which the caller
cuts and decodes exactly as the HF path does. Starting the engine costs about 20 s, so the worker
starts at the first evaluation that uses it and serves every later one of the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

from tqdm import tqdm

from .evaluate import decode_answers
from .tasklora import save_adapter

log = logging.getLogger(__name__)

Adapter = Path | Callable[[], dict] | None  # what `answers` evaluates: see there
CHUNK = 128  # prompts per engine call: a progress bar that moves, batches still large for decode

# vLLM accepts only these LoRA ranks (its LoRAConfig checks max_lora_rank): an adapter of rank r needs the next one up.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
START_TIMEOUT_S = 300
NICE = 19  # the launched worker's niceness: it gets a core only while the run leaves one idle


class EngineError(RuntimeError):
    """The vLLM evaluation worker could not start or answer; the message says where its log is."""


@dataclass(frozen=True)
class EngineConfig:
    """What the worker's engine is built with; it must hold the longest prompt plus its answer."""

    base_dir: str
    dtype: str  # "float32" or "bfloat16", as the training's base
    max_lora_rank: int
    max_model_len: int
    kv_cache_gib: float = 1.0
    threads: int | None = None


def vllm_rank(rank: int) -> int:
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VllmEvaluator:
    """One vLLM worker process for a run's evaluations; `close()` (or the end of the process) stops it."""

    def __init__(self, config: EngineConfig, log_path: Path, lora_config=None):
        self.config, self.log_path, self.lora_config = config, log_path, lora_config
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._requests = 0
        self._ready = False
        self._scratch = tempfile.TemporaryDirectory(prefix="mtft-vllm-eval-")

    def answers(self, tokenizer, prompts: list[str], max_new_tokens: int, end_ids: list[int],
                adapter: Adapter, desc: str | None = None) -> list[str]:
        """Greedy answer texts, decoded as the HF path decodes them; `adapter`: None (the base), a
        PEFT adapter folder, or a function returning PEFT LoRA weights (written to a folder here)."""
        folder = self._adapter_folder(adapter)
        try:
            ids = [tokenizer(p).input_ids for p in prompts]
            rows: list[list[int]] = []
            chunks = range(0, len(ids), CHUNK)
            for start in tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=desc is None, dynamic_ncols=True):
                rows += self.generate(ids[start : start + CHUNK], max_new_tokens, end_ids, folder)
            return decode_answers(tokenizer, rows, end_ids)
        finally:
            if folder is not None and callable(adapter):
                shutil.rmtree(folder, ignore_errors=True)

    def _adapter_folder(self, adapter: Adapter) -> Path | None:
        if adapter is None or isinstance(adapter, Path):
            return adapter
        folder = Path(self._scratch.name) / f"adapter-{self._requests + 1}"
        save_adapter(folder, self.lora_config, adapter(), self.config.base_dir)
        return folder

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, end_ids: list[int],
                 adapter_dir: Path | None) -> list[list[int]]:
        """Greedy answer token ids per prompt; generation stops at any of `end_ids` (kept in the answer)."""
        self.start()
        self._requests += 1
        request = {"prompts": prompt_ids, "max_tokens": max_new_tokens, "end_ids": end_ids,
                   "adapter": str(adapter_dir) if adapter_dir is not None else None, "id": self._requests}
        self._connection.send(request)
        reply = self._receive()
        if "error" in reply:
            raise EngineError(f"the vLLM evaluation worker failed: {reply['error']} (log: {self.log_path})")
        return reply["answers"]

    def launch(self) -> None:
        """Start the worker without waiting for it: its start (mostly importing vLLM, tens of seconds)
        then runs while the caller goes on. It runs niced, so a training beside it keeps its cores; when the
        caller evaluates, the caller waits and nothing competes with the worker."""
        if self._process is not None:
            return
        self._began = time.perf_counter()
        ours, theirs = Pipe()
        cores = sorted(os.sched_getaffinity(0))[: self.config.threads or None]
        # vLLM's "auto" binding takes one core of two here; the run's own cores are idle while it evaluates.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{self.config.kv_cache_gib:g}",
               "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "OMP_NUM_THREADS": str(len(cores)),
               # The engine in this worker's own process: no engine-core process, no hop per step.
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._process = subprocess.Popen([sys.executable, "-m", "mtft.train.vllm_eval", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: os.nice(NICE))
        theirs.close()
        self._connection = ours
        ours.send(asdict(self.config))
        self._ready = False

    def start(self) -> None:
        """Start the worker (if not launched yet) and wait for its engine; `generate` calls it."""
        self.launch()
        if self._ready:
            return
        ours, began = self._connection, self._began
        while not ours.poll(1.0):
            if self._process.poll() is not None or time.perf_counter() - began > START_TIMEOUT_S:
                self.close()
                raise EngineError(f"the vLLM evaluation worker did not start; its log: {self.log_path}")
        ready = self._receive()
        if "error" in ready:
            self.close()
            raise EngineError(f"vLLM could not load {self.config.base_dir}: {ready['error']} (log: {self.log_path})")
        self._ready = True
        log.info("evaluation engine: vLLM (%s, max LoRA rank %d), ready %.0f s after its launch; log %s",
                 self.config.dtype, self.config.max_lora_rank, time.perf_counter() - began, self.log_path)

    def _receive(self) -> dict:
        try:
            return self._connection.recv()
        except (EOFError, OSError) as error:
            self.close()
            raise EngineError(f"the vLLM evaluation worker died ({error}); its log: {self.log_path}") from error

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.send(None)
            except OSError:
                pass
            self._connection.close()
            self._connection = None
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._ready = False

    def __del__(self) -> None:
        self.close()


def _serve(connection: Connection) -> None:
    """The worker: build the engine, then answer requests until the parent sends None or goes away."""
    config = EngineConfig(**connection.recv())
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        llm = LLM(model=config.base_dir, dtype=config.dtype, enable_lora=True, max_lora_rank=config.max_lora_rank,
                  max_loras=1, max_cpu_loras=1, max_model_len=config.max_model_len, enforce_eager=True, seed=0,
                  enable_prefix_caching=False, distributed_executor_backend="uni")
    except Exception as error:  # reported to the parent, which names the log
        connection.send({"error": f"{type(error).__name__}: {error}"})
        raise
    connection.send({"ready": True})
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            # ignore_eos: only the caller's end tokens stop an answer, as in HF generate.
            params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True,
                                    stop_token_ids=request["end_ids"], detokenize=False)
            lora = None
            if request["adapter"] is not None:
                lora = LoRARequest(f"eval-{request['id']}", request["id"], request["adapter"])
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
            results = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            connection.send({"answers": [list(r.outputs[0].token_ids) for r in results]})
        except Exception as error:
            connection.send({"error": f"{type(error).__name__}: {error}"})


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
    # Nothing to tear down that the OS does not: skipping the interpreter's (seconds with vLLM
    # loaded) lets the run end without waiting for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
