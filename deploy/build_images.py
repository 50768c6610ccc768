"""`make images`: build mtft:cpu and mtft:router from the working tree with deploy/Dockerfile.

Works where the Dockerfile's defaults do (python:3.11-slim pullable, PyPI and PyTorch's CPU index
reachable) and on a machine that reaches no image registry and installs Python packages through
its own pip configuration (a proxy's CA bundle, local wheel folders and indexes). Each choice is
printed with its reason:

- base image: $BASE_IMAGE; else python:3.11-slim when present or pullable; else mtft-base:bookworm,
  built from Debian packages by deploy/base-image.sh when missing (needs root and debootstrap);
- pip settings: $PIP_SETTINGS (a folder holding a pip.conf); else, when this machine's `pip config
  list` names where packages come from (index, find-links, cert, constraint), a folder written
  from it: its files copied in, its local folders and file:// indexes served read-only on
  127.0.0.1 while the builds run (they use the host network); else deploy/pip/ (PyPI and
  PyTorch's CPU index);
- builder: BuildKit when `docker buildx` exists, else the legacy builder (DOCKER_BUILDKIT=0).

Both images build from one copy of the sources taken at the start (what /.dockerignore lets in):
the router stage reuses the cpu stage's layers and both hold the same code, also where the
working tree changes during the builds. Chosen pip settings go into that copy as deploy/pip-site/.

Stdlib only: it runs before the project's venv exists.
"""

from __future__ import annotations

import configparser
import functools
import http.server
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "python:3.11-slim"
DEBIAN_BASE = "mtft-base:bookworm"
SITE = "deploy/pip-site"  # where the chosen pip settings lie in the build context
IN_BUILD = "/tmp/pip-settings"  # where deploy/Dockerfile copies the settings folder
# pip options that say where packages come from: when the host sets any, the build uses its settings.
SOURCE_KEYS = {"index-url", "extra-index-url", "find-links", "cert", "client-cert", "constraint"}
FILE_KEYS = {"cert", "client-cert", "constraint"}  # local files: copied into the settings folder
LOCATION_KEYS = {"index-url", "extra-index-url", "find-links"}  # local folders: served on loopback
TARGETS = ("cpu", "router")


def say(message: str) -> None:
    print(f"images: {message}", flush=True)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, **kwargs)


def base_image() -> str:
    if os.environ.get("BASE_IMAGE"):
        say(f"base image {os.environ['BASE_IMAGE']} ($BASE_IMAGE)")
        return os.environ["BASE_IMAGE"]
    if run(["docker", "image", "inspect", DEFAULT_BASE], capture_output=True).returncode == 0:
        say(f"base image {DEFAULT_BASE} (present)")
        return DEFAULT_BASE
    if run(["docker", "image", "inspect", DEBIAN_BASE], capture_output=True).returncode == 0:
        say(f"base image {DEBIAN_BASE} (present; {DEFAULT_BASE} is not: set BASE_IMAGE to choose)")
        return DEBIAN_BASE
    try:
        pulled = run(["docker", "pull", DEFAULT_BASE], capture_output=True, text=True, timeout=120)
        if pulled.returncode == 0:
            say(f"base image {DEFAULT_BASE} (pulled)")
            return DEFAULT_BASE
        reason = pulled.stderr.strip().splitlines()[-1:] or ["no output"]
    except subprocess.TimeoutExpired:
        reason = ["no answer in 120 s"]
    say(f"{DEFAULT_BASE} cannot be pulled ({reason[0]}): building {DEBIAN_BASE} from Debian packages "
        "with deploy/base-image.sh")
    if run([str(ROOT / "deploy" / "base-image.sh"), DEBIAN_BASE]).returncode != 0:
        sys.exit(f"images: deploy/base-image.sh failed; build a Python 3.11 base yourself and set BASE_IMAGE")
    return DEBIAN_BASE


def host_pip_config() -> dict[str, dict[str, str]]:
    """This machine's pip settings by section ('global', 'install', ...; environment variables win)."""
    listed = run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    sections: dict[str, dict[str, str]] = {}
    for line in sorted(listed.splitlines(), key=lambda l: l.startswith(":env:")):  # env last: it wins
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        sections.setdefault("global" if section == ":env:" else section, {})[name] = shlex.split(value)[0]
    return sections


def local_path(location: str) -> Path | None:
    """The folder or file a file:// URL or a plain path names, None for a remote URL."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(location) if not parsed.scheme and Path(location).exists() else None


def write_site(config: dict[str, dict[str, str]], site: Path, served: Path, port: int) -> None:
    """`site` (deploy/pip-site/): the host's pip.conf with its files copied in, its local folders and
    indexes linked under `served`, which a file server on 127.0.0.1:`port` serves."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    out = configparser.ConfigParser(interpolation=None)
    for section, options in config.items():
        out[section] = {}
        for name, value in options.items():
            words = value.split()
            if name in FILE_KEYS:
                for i, word in enumerate(words):
                    copied = site / f"{name}-{i}-{Path(word).name}"
                    shutil.copyfile(word, copied)
                    words[i] = f"{IN_BUILD}/{copied.name}"
            elif name in LOCATION_KEYS:
                for i, word in enumerate(words):
                    if (path := local_path(word)) is not None:
                        # An index's pages link to files beside it (../../files/...): serve its parent.
                        shared, below = (path, "") if name == "find-links" else (path.parent, path.name + "/")
                        link = served / str(len(list(served.iterdir())))
                        link.symlink_to(shared)
                        words[i] = f"http://127.0.0.1:{port}/{link.name}/{below}"
            out[section][name] = " ".join(words)
    with (site / "pip.conf").open("w") as f:
        f.write("# Written by deploy/build_images.py from this machine's `pip config list`.\n")
        out.write(f)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def pip_settings(stack: list, context: Path) -> str:
    """The PIP_SETTINGS build argument; puts chosen settings into `context` and starts the loopback
    file server the host's settings need."""
    if os.environ.get("PIP_SETTINGS"):
        shutil.copytree(ROOT / os.environ["PIP_SETTINGS"], context / SITE)
        say(f"pip settings {os.environ['PIP_SETTINGS']} ($PIP_SETTINGS)")
        return SITE
    config = host_pip_config()
    named = sorted({name for options in config.values() for name in options} & SOURCE_KEYS)
    if not named:
        say("pip settings deploy/pip (PyPI and PyTorch's CPU index; this machine's pip configuration names none)")
        return "deploy/pip"
    served = Path(tempfile.mkdtemp(prefix="mtft-pip-served-"))
    stack.append(lambda: shutil.rmtree(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.append(server.shutdown)
    write_site(config, context / SITE, served, server.server_address[1])
    shares = ", ".join(f"{link.readlink()}" for link in sorted(served.iterdir()))
    say(f"pip settings from this machine's pip configuration (it names {', '.join(named)}; "
        f"served on 127.0.0.1:{server.server_address[1]} during the builds: {shares or 'nothing'})")
    return SITE


def snapshot(context: Path) -> None:
    """Copy what /.dockerignore lets in (its `!` lines, less its `**/` patterns) and the Dockerfile."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    skip = shutil.ignore_patterns(*(line.removeprefix("**/") for line in lines if line.startswith("**/")))
    for entry in [line[1:] for line in lines if line.startswith("!")] + ["deploy/Dockerfile"]:
        source, copy = ROOT / entry, context / entry
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=skip)
        else:
            shutil.copy2(source, copy)


def builder_env() -> dict[str, str]:
    if run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        say("builder BuildKit (docker buildx)")
        return dict(os.environ)
    say("builder legacy (DOCKER_BUILDKIT=0: no docker buildx here; the Dockerfile needs nothing BuildKit-only)")
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def build_argv(target: str, base: str, settings: str) -> list[str]:
    """The build of one target, tagged mtft:<target>; on the host's network, which the file server is on."""
    return ["docker", "build", "--network", "host", "-f", "deploy/Dockerfile", "--target", target,
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"PIP_SETTINGS={settings}", "-t", f"mtft:{target}", "."]


def build(target: str, base: str, settings: str, env: dict[str, str], context: Path) -> float:
    argv = build_argv(target, base, settings)
    say(f"$ {shlex.join(argv)}   (in {context})")
    start = time.monotonic()
    if run(argv, cwd=context, env=env).returncode != 0:
        sys.exit(f"images: building mtft:{target} failed (output above)")
    return time.monotonic() - start


def main() -> None:
    context = Path(tempfile.mkdtemp(prefix="mtft-build-context-"))
    cleanup: list = [lambda: shutil.rmtree(context)]
    try:
        snapshot(context)
        base, env = base_image(), builder_env()
        settings = pip_settings(cleanup, context)
        seconds = {target: build(target, base, settings, env, context) for target in TARGETS}
    finally:
        for step in reversed(cleanup):
            step()
    for target, took in seconds.items():
        size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", f"mtft:{target}"],
                       capture_output=True, text=True).stdout)
        say(f"mtft:{target} built in {took:.0f} s, {size / 2**30:.2f} GiB ({size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
