"""deploy/ agrees with the code, checked offline: no Docker engine, no cluster, no network.

Every YAML file parses; every Kubernetes object (each kustomization rendered by kubectl's own
kustomize, and the Secret template) validates against the pinned Kubernetes schema; every
`mtft-serve` / `mtft-train` command line in the Dockerfile, compose.yaml and the manifests parses
with the real typer apps; ports, probe paths (routes of the real router app), env names (found in
the package source), registry mounts, image targets, in-image paths and memory requests agree.
The negative controls feed broken copies through the same checker functions.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from compose_checks import compose, compose_problems
from deploy_checks import (DEPLOY, K8S, SECRET_TEMPLATE, dockerfile_problems, dockerfile_stages, ignored, k8s_problems,
                           kustomizations, render, schema_problems, serve_deployment, stages)


def test_every_yaml_file_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_every_manifest_is_part_of_a_kustomization():
    listed = {(folder / r).resolve() for folder in kustomizations()
              for r in yaml.safe_load((folder / "kustomization.yaml").read_text()).get("resources", [])}
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"} - {SECRET_TEMPLATE}
    assert manifests and manifests <= listed


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_renders_valid_objects_that_agree_with_the_code(folder):
    objects = list(render(folder))
    if folder.name == "train":  # the Job needs the claim that the registry kustomization declares
        objects += render(K8S / "registry")
    expected = {"train": {"Job"}, "registry": {"PersistentVolumeClaim"},
                "scale": {"StatefulSet", "Deployment", "Service", "NetworkPolicy"}}
    assert {o["kind"] for o in objects} >= expected.get(folder.name, {"Deployment", "Service"})
    assert all("namespace" not in o["metadata"] for o in objects)
    assert k8s_problems(objects) == []


def test_the_gpu_overlays_ask_for_a_gpu_and_use_the_cuda_image():
    for folder in (K8S / "gpu" / "serve", K8S / "gpu" / "train"):
        for obj in render(folder):
            if obj["kind"] in ("Deployment", "Job"):
                container = obj["spec"]["template"]["spec"]["containers"][0]
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
                assert container["image"] == "mtft:gpu"
    gpu_serve = next(o for o in render(K8S / "gpu" / "serve") if o["kind"] == "Deployment")
    assert "--no-base-workaround" in gpu_serve["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_secret_template_validates_and_holds_no_real_key():
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text())
    assert schema_problems(secret) == []
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())


def test_compose_agrees_with_the_code():
    assert compose_problems(compose()) == []
    assert compose()["services"]["train"]["profiles"] == ["train"]


def test_dockerfile_agrees_with_the_code():
    assert set(stages()) >= {"cpu", "gpu"}
    assert stages()["gpu"].base.startswith("vllm/vllm-openai:v")
    assert dockerfile_problems(stages()) == []


def test_the_dockerignore_keeps_local_state_out_of_the_images():
    assert all(ignored(path) for path in (".venv", ".git", "runs", "tests", "serve/__pycache__", "deploy/Dockerfile"))
    assert not any(ignored(path) for path in ("train/demo/tasks.yaml", "serve/cli.py", "deploy/pip/pip.conf"))


@pytest.mark.parametrize("path", sorted((DEPLOY / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes % config.num_machines == 0


# ---- negative controls: the same checks catch a broken copy ----------------------------------

def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


BROKEN_DEPLOYMENTS = [
    (lambda o: _container(o)["args"].append("--bogus-flag"), r"No such option: --bogus-flag"),
    (lambda o: _container(o)["args"].__setitem__(1, "/registy"), r"registry /registy is not a mount path"),
    (lambda o: _container(o)["args"].extend(["--port", "80x"]), r"Invalid value for '--port'"),
    (lambda o: _container(o)["args"].extend(["--port", "9000"]), r"router listens on 9000"),
    (lambda o: _container(o)["args"].extend(["--host", "127.0.0.1"]), r"must listen on 0.0.0.0"),
    (lambda o: _container(o)["ports"][0].__setitem__("containerPort", 8080), r"container declares \[8080\]"),
    (lambda o: _container(o)["livenessProbe"]["httpGet"].__setitem__("path", "/healthz"), r"probe /healthz"),
    (lambda o: _container(o)["env"][0].__setitem__("name", "MTFT_API_KEY"), r"MTFT_API_KEY is read nowhere"),
    (lambda o: _container(o)["env"].append({"name": "MTFT_ADMIN_KEY", "value": "hunter2"}), r"must come from a Secret"),
    (lambda o: _container(o).__setitem__("image", "mtft:tpu"), r"not built by deploy/Dockerfile"),
    (lambda o: _container(o)["resources"]["requests"].__setitem__("memory", "2Gi"), r"memory request 2.00 GiB"),
    (lambda o: _container(o)["args"].extend(["--base-model", "/opt/mtft/models/other"]), r"converts the base into"),
    (lambda o: o["spec"].__setitem__("replica", 2), r"Additional properties are not allowed \('replica'"),
    (lambda o: _container(o)["ports"][0].__setitem__("containerPort", "8000"), r"'8000' is not of type 'integer'"),
]


@pytest.mark.parametrize(("breakage", "expected"), BROKEN_DEPLOYMENTS, ids=[e for _, e in BROKEN_DEPLOYMENTS])
def test_a_broken_deployment_is_caught(breakage, expected):
    deployment = serve_deployment()
    breakage(deployment)
    problems = k8s_problems([deployment])
    assert any(re.search(expected, p) for p in problems), problems


def test_a_broken_training_job_is_caught():
    job = copy.deepcopy(next(o for o in render(K8S / "train") if o["kind"] == "Job"))
    _container(job)["command"][1] = "adaptors"
    assert any("no subcommand ['adaptors']" in p for p in k8s_problems([job]))
    _container(job)["command"][1] = "adapters"
    _container(job)["volumeMounts"][0]["readOnly"] = True
    assert any("read-only, but adapters publishes" in p for p in k8s_problems([job]))


def test_a_broken_compose_file_and_dockerfile_are_caught():
    broken = copy.deepcopy(compose())
    broken["services"]["train"]["command"][3] = "/app/train/demo/missing.yaml"
    broken["services"]["serve"]["volumes"] = ["registry:/registry-x"]
    problems = compose_problems(broken)
    assert any("missing.yaml is not in the repository's copy" in p for p in problems), problems
    assert any("registry /registry is not a mount path" in p for p in problems), problems
    text = (DEPLOY / "Dockerfile").read_text().replace('"--port", "8000"', '"--prot", "8000"', 1)
    text = text.replace("ARG BASE_IMAGE=python:3.11-slim", "ARG BASE_IMAGE=python")
    problems = dockerfile_problems(dockerfile_stages(text))
    assert any("No such option: --prot" in p for p in problems), problems
    assert any("FROM python is not pinned" in p for p in problems), problems


def test_a_compose_service_on_the_host_network_is_checked_for_it():
    broken = copy.deepcopy(compose())
    serve = broken["services"]["serve"]
    serve["ports"] = ["8000:8000"]
    serve["command"][serve["command"].index("--host") + 1] = "10.0.0.5"
    broken["services"]["other"] = {**copy.deepcopy(serve), "ports": [], "tmpfs": ["/state"]}
    problems = compose_problems(broken)
    assert any("compose serve: publishes ['8000:8000'], which Docker ignores" in p for p in problems), problems
    assert any("--host 10.0.0.5: on the host's network the router listens on 127.0.0.1" in p for p in problems), problems
    assert any("compose other: listens on port 8000 of the host, as serve does" in p for p in problems), problems
    assert any("compose other: tmpfs /state without uid=1000" in p for p in problems), problems
