"""The scale-out layout in deploy/ (a router over N vLLM backends) agrees with itself and the code.

tests/test_deploy.py already renders every kustomization (deploy/k8s/scale and gpu/scale
included), validates every object against the Kubernetes schema and checks each container's
mtft-serve command line, ports, probes, mounts, keys and memory. This file adds what only the
scale-out layout has: the router's --backend URLs name the StatefulSet's pods through its
headless Service on the port vLLM listens on, one URL per ordinal; a NetworkPolicy admits only
the router's pods to vLLM's port; router and backends agree on the settings both read (rank cap,
slots, base model, zero adapter); every command line passes mtft-serve's own config validation;
and in compose the backends publish no host port. Offline: no Docker engine, no cluster.
"""

from __future__ import annotations

import copy
import re
from urllib.parse import urlparse

import pytest
from compose_checks import compose, compose_problems, service_command
from deploy_checks import K8S, k8s_containers, k8s_problems, parse_cli, render

from mtft.serve.config import ServeConfigError, load_config

# Settings read both by the router's plan and by each backend's: they must be the same.
SHARED = ("base_model", "max_loras", "max_lora_rank", "max_cpu_loras", "base_workaround")


def serve_params(argv: list[str]) -> dict:
    return parse_cli(argv)[1] if argv[:1] == ["mtft-serve"] else {}


def config_problems(where: str, argv: list[str]) -> list[str]:
    """mtft-serve's own validation of the options (the typer parse alone does not run it)."""
    if argv[:1] != ["mtft-serve"]:
        return []
    params = {k: v for k, v in serve_params(argv).items() if k != "config"}
    try:
        load_config(None, params)
    except ServeConfigError as exc:
        return [f"{where}: {exc}"]
    return []


def agreement_problems(router: tuple[str, dict], backends: list[tuple[str, dict]]) -> list[str]:
    return [f"{where}: --{name.replace('_', '-')} {params.get(name)} but the router {router[0]} has {router[1].get(name)}"
            for where, params in backends for name in SHARED if params.get(name) != router[1].get(name)]


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def scale_problems(objects: list[dict]) -> list[str]:
    """Router Deployment, vLLM StatefulSet, headless Service and NetworkPolicy agree with each other."""
    problems = []
    sets = [o for o in objects if o["kind"] == "StatefulSet"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    routers = [(o, c) for o in objects if o["kind"] == "Deployment" for c in k8s_containers(o)
               if serve_params(c.argv).get("replicas") == 0]
    if not routers or not sets:
        return ["no router Deployment (mtft-serve --replicas 0) or no vLLM StatefulSet"]
    backends: dict[str, tuple[int, str]] = {}  # the URL each backend pod is reached at -> (its port, where)
    for sts in sets:
        name, pod_labels = sts["metadata"]["name"], sts["spec"]["template"]["metadata"]["labels"]
        container = k8s_containers(sts)[0]
        params = serve_params(container.argv)
        problems += config_problems(container.where, container.argv)
        if not params.get("vllm_only"):
            problems.append(f"{container.where}: runs {container.argv[:2]}, not mtft-serve --vllm-only")
            continue
        port = params["port"]
        service = services.get(sts["spec"]["serviceName"])
        if service is None or service["spec"].get("clusterIP") != "None":
            problems.append(f"{container.where}: serviceName {sts['spec']['serviceName']} is no headless Service")
            continue
        if not labels_match(service["spec"]["selector"], pod_labels):
            problems.append(f"Service/{service['metadata']['name']}: its selector misses the StatefulSet's pods")
        named = {p.get("name"): p for p in service["spec"]["ports"]}
        service_ports = [p["port"] for p in service["spec"]["ports"]
                         if container.ports.get(p["targetPort"], p["targetPort"]) == port]
        if not service_ports:
            problems.append(f"Service/{service['metadata']['name']}: no port targets vLLM's --port {port}: {named}")
        for i in range(sts["spec"]["replicas"]):
            for service_port in service_ports:
                backends[f"http://{name}-{i}.{service['metadata']['name']}:{service_port}"] = (port, container.where)
        # Only the router's pods may reach vLLM's port (runtime adapter loading is open on it).
        guarding = [p for p in policies if labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)
                    and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not guarding:
            problems.append(f"{container.where}: no NetworkPolicy restricts who reaches vLLM's port {port}")
        router_labels = [o["spec"]["template"]["metadata"]["labels"] for o, _ in routers]
        for policy in guarding:
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                if not peers or any(set(peer) != {"podSelector"} or not any(
                        labels_match(peer["podSelector"].get("matchLabels", {}), labels) for labels in router_labels)
                        for peer in peers):
                    problems.append(f"NetworkPolicy/{policy['metadata']['name']}: admits {peers or 'everyone'}, "
                                    "not only the router's pods")
                if [p.get("port") for p in rule.get("ports", [])] != [port]:
                    problems.append(f"NetworkPolicy/{policy['metadata']['name']}: ports {rule.get('ports')}, "
                                    f"vLLM listens on {port} only")
    for obj, router in routers:
        params = serve_params(router.argv)
        problems += config_problems(router.where, router.argv)
        urls = [url.rstrip("/") for url in params["backends"]]
        problems += [f"{router.where}: --backend {url} is no StatefulSet pod's address: {sorted(backends)}"
                     for url in urls if url not in backends]
        problems += [f"{router.where}: no --backend for {url}" for url in backends if url not in urls]
        problems += agreement_problems((router.where, params), [(where, serve_params(c.argv)) for sts in sets
                                                                for c in k8s_containers(sts) for where in [c.where]])
        if obj["spec"].get("replicas", 1) != 1 or obj["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{router.where}: more than one router at a time would fight over the backends' slots")
    return problems


def scale_compose_problems(services: dict) -> list[str]:
    """The router's --backend URLs are the --vllm-only services at their port (on the host's network:
    127.0.0.1, else the service's name); those publish nothing."""
    problems = []
    backends = {}
    for name, service in services.items():
        params = serve_params(service_command(service))
        problems += config_problems(f"compose {name}", service_command(service))
        if params.get("vllm_only"):
            host = "127.0.0.1" if service.get("network_mode") == "host" else name
            backends[f"http://{host}:{params['port']}"] = (name, params)
            if service.get("ports"):
                problems.append(f"compose {name}: publishes {service['ports']}: vLLM's adapter loading would be "
                                "reachable from outside")
    routers = {name: serve_params(service_command(s)) for name, s in services.items()
               if serve_params(service_command(s)).get("replicas") == 0}
    if not routers or len(backends) < 2:
        return problems + [f"compose: routers {sorted(routers)}, vLLM backends {sorted(backends)}: want one and two"]
    for name, params in routers.items():
        urls = [url.rstrip("/") for url in params["backends"]]
        problems += [f"compose {name}: --backend {url} is no --vllm-only service at its port: {sorted(backends)}"
                     for url in urls if url not in backends]
        problems += [f"compose {name}: no --backend for {url}" for url in backends if url not in urls]
        problems += agreement_problems((f"compose {name}", params), [(f"compose {b}", p) for b, p in backends.values()])
    return problems


def scale_objects(folder=K8S / "scale") -> list[dict]:
    return copy.deepcopy(list(render(folder)))


def scale_compose() -> dict:
    return copy.deepcopy(compose("compose.scale.yaml"))


def _get(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def _args(obj: dict) -> list[str]:
    return obj["spec"]["template"]["spec"]["containers"][0]["args"]


# ---- the specification -----------------------------------------------------------------------

@pytest.mark.parametrize("folder", [K8S / "scale", K8S / "gpu" / "scale"], ids=["scale", "gpu/scale"])
def test_the_router_reaches_every_backend_and_only_it_does(folder):
    objects = scale_objects(folder)
    assert scale_problems(objects) == []
    urls = serve_params(k8s_containers(_get(objects, "Deployment"))[0].argv)["backends"]
    assert urls == ["http://mtft-vllm-0.mtft-vllm:8001", "http://mtft-vllm-1.mtft-vllm:8001"]


def test_the_gpu_scale_overlay_gives_the_backends_a_gpu_and_the_router_none():
    objects = scale_objects(K8S / "gpu" / "scale")
    backend, router = _get(objects, "StatefulSet"), _get(objects, "Deployment")
    assert backend["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in router["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in router["spec"]["template"]["spec"]
    assert {c["image"] for o in (backend, router) for c in o["spec"]["template"]["spec"]["containers"]} == {"mtft:gpu"}
    assert "--no-base-workaround" in _args(backend) and "--no-base-workaround" in _args(router)


def test_the_scale_compose_file_agrees_with_the_code_and_publishes_only_the_router():
    services = scale_compose()["services"]
    assert compose_problems(scale_compose()) == []
    assert scale_compose_problems(services) == []
    assert all(s["network_mode"] == "host" and not s.get("ports") for s in services.values())
    assert [n for n, s in services.items() if "127.0.0.1" not in service_command(s)] == ["train"]  # all listen on loopback
    assert services["train"]["profiles"] == ["train"]
    assert "registry:/registry" in services["train"]["volumes"]  # training publishes into the shared volume


# ---- negative controls: the same checks catch a broken copy ----------------------------------

BROKEN_SCALE = [
    (lambda o: _args(_get(o, "Deployment")).__setitem__(3, "http://mtft-vllm-1.mtft-vllm:8000"),
     r"no --backend for http://mtft-vllm-0"),
    (lambda o: _args(_get(o, "Deployment")).extend(["--backend", "http://mtft-vllm-2.mtft-vllm:8001"]),
     r"--backend http://mtft-vllm-2.mtft-vllm:8001 is no StatefulSet pod"),
    (lambda o: _get(o, "StatefulSet")["spec"].__setitem__("replicas", 3), r"no --backend for http://mtft-vllm-2"),
    (lambda o: _args(_get(o, "StatefulSet")).extend(["--port", "8002"]), r"no port targets vLLM's --port 8002"),
    (lambda o: _args(_get(o, "StatefulSet")).remove("--vllm-only"), r"not mtft-serve --vllm-only"),
    (lambda o: _args(_get(o, "StatefulSet")).extend(["--max-loras", "4"]), r"--max-loras 4 but the router"),
    (lambda o: _args(_get(o, "Deployment")).remove("--no-base-workaround"), r"--base-workaround False but the router"),
    (lambda o: _args(_get(o, "StatefulSet")).extend(["--backend", "http://x:1"]), r"it takes no --backend"),
    (lambda o: o.remove(_get(o, "NetworkPolicy")), r"no NetworkPolicy restricts"),
    (lambda o: _get(o, "NetworkPolicy")["spec"]["ingress"][0].pop("from"), r"admits everyone"),
    (lambda o: _get(o, "NetworkPolicy")["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
     r"not only the router's pods"),
    (lambda o: _get(o, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0].__setitem__("port", 8000),
     r"vLLM listens on 8001 only"),
    (lambda o: _get(o, "Deployment")["spec"].__setitem__("replicas", 2), r"more than one router"),
    (lambda o: next(s for s in o if s["metadata"]["name"] == "mtft-vllm" and s["kind"] == "Service")["spec"]
     .pop("clusterIP"), r"is no headless Service"),
]


@pytest.mark.parametrize(("breakage", "expected"), BROKEN_SCALE, ids=[e for _, e in BROKEN_SCALE])
def test_a_broken_scale_out_layout_is_caught(breakage, expected):
    objects = scale_objects()
    breakage(objects)
    problems = scale_problems(objects)
    assert any(re.search(expected, p) for p in problems), problems


def test_a_router_only_container_is_checked_like_any_other():
    """The shared checks (test_deploy.py) see the router-only and vLLM-only pods too."""
    objects = scale_objects()
    _get(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/ready"
    _get(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "64Mi"
    _get(objects, "Service")["spec"]["ports"][0]["targetPort"] = "grpc"
    problems = k8s_problems(objects)
    assert any("probe /ready is not a keyless GET route of vLLM" in p for p in problems), problems
    assert any("memory request 0.06 GiB < measured 0.25 GiB" in p for p in problems), problems
    assert any("targetPort grpc matches no pod port" in p for p in problems), problems


def test_a_broken_scale_compose_file_is_caught():
    broken = scale_compose()["services"]
    broken["vllm-1"] = {**broken["vllm-1"], "ports": ["8002:8002"]}
    broken["router"]["command"][4] = "http://127.0.0.1:8003"
    problems = scale_compose_problems(broken)
    assert any("compose vllm-1: publishes" in p for p in problems), problems
    assert any("--backend http://127.0.0.1:8003 is no --vllm-only service" in p for p in problems), problems
    assert any("no --backend for http://127.0.0.1:8001" in p for p in problems), problems
    assert urlparse(service_command(broken["router"])[6]).port == 8002
    broken["vllm-0"]["command"][broken["vllm-0"]["command"].index("--host") + 1] = "0.0.0.0"
    problems = compose_problems({**scale_compose(), "services": broken})
    assert any("compose vllm-0: --host 0.0.0.0: on the host's network vLLM must listen on 127.0.0.1" in p
               for p in problems), problems
