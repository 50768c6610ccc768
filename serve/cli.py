"""`mtft-serve`: the whole serving stack from one command; flags override an optional YAML file.

Every `ServeConfig` field is a flag of the same name (`--poll-s`, `--base-workaround/
--no-base-workaround`; `vllm_args` is the repeatable `--vllm-arg`, `backends` the repeatable
`--backend`), its help the field's description, its default the model's: the options are
declared once, there.

Ready when `GET http://HOST:PORT/ready` answers 200 (also logged as
"ready at ..." and written to `<state-dir>/ready.json`). Ctrl-C or SIGTERM
stops the router and the vLLM children with their process groups. With
`--vllm-only` there is no router: one vLLM backend listens on HOST:PORT.
"""

from __future__ import annotations

import inspect
import logging
import signal
import sys
from pathlib import Path

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import ServeConfig, ServeConfigError, load_config
from .stack import ServeError, Stack

app = typer.Typer(add_completion=False)
# A repeatable option is named for one value: `--vllm-arg A --vllm-arg B` fills `vllm_args`.
FLAG_NAMES = {"vllm_args": "--vllm-arg", "backends": "--backend"}
CONFIG_FILE = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                default=typer.Option(None, help="YAML file with any of the options below; flags win"))


def serve(**options: object) -> None:
    """Serve every task's adapter from the registry behind one OpenAI-compatible endpoint (vLLM + the router).

    Example: mtft-serve --registry runs/registry --port 8000  (then: model="ticket", or prompts "ticket: ...")
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    config_file = options.pop("config")
    try:
        # An option not given is None (an unrepeated list option: empty): the YAML file or the default holds.
        settings = load_config(config_file, {name: value for name, value in options.items() if value != []})
    except ServeConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    sys.exit(run(Stack(settings)))


def run(stack: Stack) -> int:
    """Start the stack and supervise it until a signal or a failure; the exit code."""

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
    return code


def flags(model: type[BaseModel]) -> list[inspect.Parameter]:
    """One typer option per field of `model`, each defaulting to None so that a flag not given
    leaves the YAML file's value (or the model's default, shown in the help) in place."""
    params = []
    for name, field in model.model_fields.items():
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        is_bool = bool in (field.annotation, *getattr(field.annotation, "__args__", ()))
        default = "" if field.default in (None, PydanticUndefined) else f"; default: {field.default}"
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}" if is_bool else flag,
                              help=f"{field.description}{default}", show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=field.annotation | None))
    return params


serve.__signature__ = inspect.Signature([CONFIG_FILE, *flags(ServeConfig)])
serve.__annotations__ = {p.name: p.annotation for p in serve.__signature__.parameters.values()}
app.command()(serve)


def main() -> None:
    app()
