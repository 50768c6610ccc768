"""What `make images` and `make deploy-check` rely on, checked without Docker.

`make images` (deploy/build_images.py) builds deploy/Dockerfile's cpu and router targets as
mtft:cpu and mtft:router with the build arguments the Dockerfile declares, with either builder
(no `# syntax=` line; no stage before those targets needs another image than the base); the
Kubernetes manifests and compose files run exactly those tags (the GPU overlays run mtft:gpu, the
gpu target). Its pip settings folder for this machine rewrites local files, folders and indexes to
what the build can reach, and the served indexes' relative links resolve. `make deploy-check`
(deploy/check.py) sets exactly the variables the compose files read, names services they have,
appends options the real training CLI takes, asks tasks the demo spec has, and reads metrics the
router exports.
"""

from __future__ import annotations

import configparser
import functools
import http.server
import importlib.util
import re
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from compose_checks import compose, compose_variables
from deploy_checks import (CLI_ERRORS, DEPLOY, K8S, ROOT, dockerfile_args, ignored, k8s_containers, kustomizations, parse_cli,
                           render, stages)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_images, check = load("build_images"), load("check")
MADE = {f"mtft:{target}" for target in build_images.TARGETS}
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def images(folder: Path) -> set[str]:
    return {c.image for o in render(folder) if o["kind"] in ("Deployment", "StatefulSet", "Job")
            for c in k8s_containers(o)}


def test_make_images_tags_the_cpu_and_router_targets():
    assert MADE == {"mtft:cpu", "mtft:router"}
    argv = build_images.build_argv("router", "base:1", "deploy/pip")
    assert argv[argv.index("--target") + 1] == "router" and argv[argv.index("-t") + 1] == "mtft:router"
    assert {"cpu", "router", "gpu"} <= set(stages())


def test_the_manifests_and_compose_files_run_the_images_make_images_tags():
    cpu = [f for f in kustomizations() if "gpu" not in f.relative_to(K8S).parts and images(f)]
    assert {f.name for f in cpu} == {"serve", "scale", "train"}
    assert all(images(f) <= MADE for f in cpu), {f.name: images(f) for f in cpu}
    assert images(K8S / "scale") == MADE
    gpu = [f for f in kustomizations() if "gpu" in f.relative_to(K8S).parts and images(f)]
    assert gpu and all(images(f) == {"mtft:gpu"} for f in gpu)
    for name in ("compose.yaml", "compose.scale.yaml"):
        assert {s["image"] for s in compose(name)["services"].values()} <= MADE


def test_make_images_passes_build_arguments_the_dockerfile_declares():
    args = dockerfile_args(DOCKERFILE)
    argv = build_images.build_argv("cpu", "base:1", "deploy/pip")
    passed = {argv[i + 1].partition("=")[0] for i, word in enumerate(argv) if word == "--build-arg"}
    assert passed == set(args) == {"BASE_IMAGE", "PIP_SETTINGS"}
    assert args["BASE_IMAGE"] == build_images.DEFAULT_BASE
    assert (ROOT / args["PIP_SETTINGS"] / "pip.conf").is_file() and not ignored(args["PIP_SETTINGS"])
    assert f"tag=${{1:-{build_images.DEBIAN_BASE}}}" in (DEPLOY / "base-image.sh").read_text()


def test_the_dockerfile_builds_with_either_builder():
    assert not re.search(r"^#\s*syntax=", DOCKERFILE, re.M)  # BuildKit would pull that frontend
    # The legacy builder builds every stage before the target: none of them may need another image.
    order = list(stages())
    last = max(order.index(target) for target in build_images.TARGETS)
    for name in order[: last + 1]:
        assert stages()[name].base in {"scratch", dockerfile_args(DOCKERFILE)["BASE_IMAGE"], *order[:order.index(name)]}, name


def test_the_pip_settings_of_this_kind_of_machine_reach_the_build(tmp_path):
    """Files are copied in, local folders and indexes linked for the loopback file server, remote URLs kept."""
    ca, constraints, wheels = tmp_path / "ca.pem", tmp_path / "constraints.txt", tmp_path / "wheels"
    ca.write_text("CERT")
    constraints.write_text("torch<=2.14.1\n")
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-none-any.whl").write_text("wheel")
    index = tmp_path / "mirror" / "simple" / "numpy"
    index.mkdir(parents=True)
    (index / "index.html").write_text('<a href="../../files/numpy-2.0-py3-none-any.whl">numpy</a>')
    (tmp_path / "mirror" / "files").mkdir()
    (tmp_path / "mirror" / "files" / "numpy-2.0-py3-none-any.whl").write_text("numpy wheel")
    config = {"global": {"cert": str(ca), "constraint": str(constraints), "find-links": str(wheels),
                         "extra-index-url": f"file://{tmp_path}/mirror/simple https://example.org/simple",
                         "default-timeout": "180"}}
    site, served = tmp_path / "site", tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(build_images.QuietHandler,
                                                                                 directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        build_images.write_site(config, site, served, port)
        written = configparser.ConfigParser(interpolation=None)
        written.read(site / "pip.conf")
        options = written["global"]
        assert options["cert"] == "/tmp/pip-settings/cert-0-ca.pem" and (site / "cert-0-ca.pem").read_text() == "CERT"
        assert (site / Path(options["constraint"]).name).read_text() == "torch<=2.14.1\n"
        assert options["default-timeout"] == "180"
        assert options["extra-index-url"] == f"http://127.0.0.1:{port}/1/simple/ https://example.org/simple"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/1/simple/numpy/").read().decode()
        link = re.search(r'href="([^"]+)"', page).group(1)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/1/simple/numpy/{link}").read() == b"numpy wheel"
        listing = urllib.request.urlopen(options["find-links"]).read().decode()
        assert "torch-2.13.0%2Bcpu-cp311-none-any.whl" in listing
    finally:
        server.shutdown()


def test_the_deploy_check_drives_what_the_compose_files_and_clis_have():
    files = {name: compose(name) for name in check.SERVICES}
    assert check.VARIABLES == compose_variables("compose.yaml") | compose_variables("compose.scale.yaml")
    for name, services in check.SERVICES.items():
        assert set(services) <= set(files[name]["services"]), name
        assert "registry" in files[name]["volumes"]  # the volume check reads <project>_registry
    scale = files["compose.scale.yaml"]["services"]
    router = scale["router"]["command"]
    backends = [router[i + 1] for i, word in enumerate(router) if word == "--backend"]
    for i, variable in enumerate(check.PORT_VARIABLES[1:]):  # vllm-<i> is the router's backend <i>
        own = scale[f"vllm-{i}"]["command"]
        assert own[own.index("--port") + 1].startswith(f"${{{variable}:-") and f"${{{variable}:-" in backends[i]
    for command in (files["compose.yaml"]["services"]["serve"]["command"], router):
        assert command[command.index("--port") + 1].startswith(f"${{{check.PORT_VARIABLES[0]}:-")


def test_the_deploy_check_trains_and_asks_tasks_the_demo_has():
    train = compose()["services"]["train"]["command"]
    spec = yaml.safe_load((ROOT / train[train.index("--config") + 1].removeprefix("/app/")).read_text())
    prefixes = {task["name"]: task["prefix"] for task in spec["tasks"]}
    for task, extra in check.TRAIN_RUNS.items():
        parse_cli([*train, "--task", task, *extra])
        assert prefixes[task] == check.PREFIXES[task]
        text, expected = check.example(task)  # the held-out row and the field the check compares
        assert text and expected
    source = (ROOT / "router" / "metrics.py").read_text()
    assert all(f'"{name.removesuffix("_total")}"' in source for name in check.METRICS)


@pytest.mark.parametrize("extra", [["--tsak", "ticket"], ["--task"]])
def test_a_train_run_the_cli_does_not_take_is_caught(extra):
    with pytest.raises(CLI_ERRORS):
        parse_cli([*compose()["services"]["train"]["command"], *extra])
