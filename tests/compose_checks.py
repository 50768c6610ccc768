"""What the deploy tests check deploy/compose.yaml and deploy/compose.scale.yaml against: each service
is one container (tests/deploy_checks.py's checks), read with compose's variable substitution at
the defaults; on the host's network (network_mode: host) no two services listen on one port and
none publishes ports, which Docker would ignore there; a tmpfs names the image's user."""

from __future__ import annotations

import functools
import re
from urllib.parse import urlparse

import yaml
from deploy_checks import DEPLOY, Container, cli_problems, container_problems, gib, parse_cli, stages

from mtft.serve import ServeConfig


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's variable substitution (${NAME}, ${NAME:-default}, ${NAME-default}, $$) over strings, lists, dicts."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    pattern = r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}"
    return re.sub(pattern, lambda m: "$" if m.group(0) == "$$" else (env or {}).get(m.group(1), m.group(2) or ""), value)


def compose_variables(name: str) -> set[str]:
    """Every variable a compose file reads from the shell."""
    return set(re.findall(r"(?<!\$)\$\{(\w+)", (DEPLOY / name).read_text()))


def service_command(service: dict) -> list[str]:
    """The command line the container runs with the variables at their defaults."""
    return interpolate(service["command"])


def compose_problems(compose: dict) -> list[str]:
    problems = []
    listening: dict[int, str] = {}  # host-network port -> service
    for name, service in compose["services"].items():
        where = f"compose {name}"
        host_network = service.get("network_mode") == "host"
        if service.get("build", {}).get("target") != service["image"].rpartition(":")[2]:
            problems.append(f"{where}: image {service['image']} is not the build target's name")
        if host_network and service.get("ports"):
            problems.append(f"{where}: publishes {service['ports']}, which Docker ignores on the host's network")
        named = {v.split(":")[0] for v in service.get("volumes", [])} - set(compose.get("volumes", {}))
        problems += [f"{where}: volume {v} is not declared under volumes:" for v in sorted(named)]
        mounts = {v.split(":")[1]: (v.split(":")[0], v.endswith(":ro")) for v in service.get("volumes", [])}
        mounts.update({path.split(":")[0]: ("tmpfs", False) for path in service.get("tmpfs", [])})
        problems += tmpfs_problems(where, service)
        check = " ".join(interpolate(service.get("healthcheck", {}).get("test", [])))
        probes = [(u.path, u.port) for u in map(urlparse, re.findall(r"http://[^'\"\s]+", check))]
        argv = service_command(service)
        problems += container_problems(Container(
            where, argv, {k: str(v) for k, v in service.get("environment", {}).items()},
            mounts=mounts, ports={p: int(p.split(":")[-1]) for p in service.get("ports", []) + service.get("expose", [])}, probes=probes,
            image=service["image"], memory_limit_gib=gib(service["mem_limit"]) if "mem_limit" in service else None,
            shm_gib=gib(service.get("shm_size", 0)), host_network=host_network))
        if host_network and argv[0] == "mtft-serve" and not cli_problems(where, argv):
            port = parse_cli(argv)[1].get("port") or ServeConfig.model_fields["port"].default
            if port in listening:
                problems.append(f"{where}: listens on port {port} of the host, as {listening[port]} does")
            listening[port] = name
    return problems


def tmpfs_problems(where: str, service: dict) -> list[str]:
    """A non-root image's tmpfs must name its user: Docker mounts it again root-owned, mode 755, when
    the container restarts (moby#20437), and the user can no longer write it."""
    stage = stages().get(service["image"].rpartition(":")[2])
    if stage is None or stage.user in ("0", "root"):
        return []
    return [f"{where}: tmpfs {entry} without uid={stage.user}: after a restart the image's user cannot write it"
            for entry in service.get("tmpfs", []) if f"uid={stage.user}" not in entry.partition(":")[2].split(",")]


@functools.cache
def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())
