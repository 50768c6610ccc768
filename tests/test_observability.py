"""deploy/observability/: the Grafana dashboard and Prometheus scrape config agree with what the router exports.

Grafana and Prometheus do not run here: the dashboard is checked as Grafana's JSON model (panels with
targets, one datasource, unique ids, a grid without overlaps), and every series, label and label value
its PromQL names is looked up in the `/metrics` of a running router (the session stack, after traffic
that makes each labelled series exist).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy_checks import K8S, k8s_containers, render, probe_routes

pytest_plugins = ["serving"]

OBSERVABILITY = Path(__file__).parents[1] / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b(mtft_\w+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(model: dict) -> list[tuple[str, str, str]]:
    """Every PromQL the dashboard runs, as (where, expression, legend format)."""
    found = [(f"panel {p['id']} {p['title']!r}", t["expr"], t.get("legendFormat", ""))
             for p in model["panels"] for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["expr"], a.get("textFormat", "")) for a in model["annotations"]["list"]]
    found += [(f"variable {v['name']!r}", v["definition"], "") for v in model["templating"]["list"] if v["type"] == "query"]
    return found


def exported(text: str) -> dict[str, dict[str, set[str]]]:
    """A /metrics page as {sample name: {label: values seen}}."""
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return series


def query_problems(where: str, expr: str, legend: str, series: dict[str, dict[str, set[str]]]) -> list[str]:
    """What `expr` names that `series` lacks: a sample name, a label on each of its series, a label value."""
    expr = re.sub(r"label_values\((\w+),\s*(\w+)\)", r"\1 by (\2)", expr)  # a variable's query names a label too
    names = {m.group(1) for m in SELECTOR.finditer(expr)}
    labels = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    problems = [f"{where}: {name} is not exported" for name in sorted(names - series.keys())]
    for match in SELECTOR.finditer(expr):
        for label, op, value in MATCHER.findall(match.group(2) or ""):
            labels.add(label)
            seen = series.get(match.group(1), {}).get(label, set())
            if op == "=" and "$" not in value and value not in seen:
                problems.append(f"{where}: {match.group(1)} has no series with {label}={value!r} (seen: {sorted(seen)})")
    for name in sorted(names & series.keys()):
        problems += [f"{where}: {name} has no label {label!r}" for label in sorted(labels - series[name].keys())]
    return problems


def grid_problems(panels: list[dict]) -> list[str]:
    """Grafana's model: unique ids, a gridPos inside 24 columns that overlaps no other panel, and every
    panel but a row querying the one Prometheus datasource variable."""
    problems, cells = [], {}
    ids = [p["id"] for p in panels]
    problems += [f"panel id {i} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for p in panels:
        where, pos = f"panel {p['id']} {p.get('title')!r}", p.get("gridPos", {})
        if not all(isinstance(pos.get(k), int) and pos[k] >= 0 for k in "xywh") or pos["x"] + pos["w"] > 24:
            problems.append(f"{where}: gridPos {pos} is not inside Grafana's 24 columns")
            continue
        for cell in ((x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])):
            if cell in cells:
                problems.append(f"{where}: overlaps panel {cells[cell]} at {cell}")
                break
            cells[cell] = p["id"]
        if p["type"] == "row":
            continue
        targets = p.get("targets", [])
        if not targets or not all(t.get("expr") and t.get("refId") for t in targets):
            problems.append(f"{where}: needs targets, each with an expr and a refId")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"{where}: two targets share a refId")
        if p.get("datasource") != DATASOURCE or any(t.get("datasource") != DATASOURCE for t in targets):
            problems.append(f"{where}: datasource is not {DATASOURCE}")
    return problems


def test_the_dashboard_is_a_grafana_dashboard_model():
    model = dashboard()
    assert model["uid"] and model["title"] and isinstance(model["schemaVersion"], int)
    assert grid_problems(model["panels"]) == []
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert all(a["datasource"] == DATASOURCE for a in model["annotations"]["list"])
    titles = " | ".join(p["title"] for p in model["panels"])
    for subject in ("Requests/s", "Error", "p50", "p99", "tokens/s by task", "by adapter version", "Canary split",
                    "Backend health", "residency", "Hot-adds"):
        assert subject in titles, f"no panel for {subject}"


def test_a_broken_dashboard_is_caught():
    model = dashboard()
    panels = model["panels"]
    broken = [dict(panels[1], id=panels[2]["id"]), dict(panels[2], gridPos={**panels[2]["gridPos"], "x": 20}),
              dict(panels[3], targets=[]), dict(panels[4], datasource={"type": "prometheus", "uid": "other"})]
    found = "\n".join(grid_problems(broken))
    for expected in (f"panel id {panels[2]['id']} is used twice", "inside Grafana's 24 columns", "needs targets",
                     "datasource is not"):
        assert expected in found


@pytest.mark.slow
def test_every_series_and_label_the_dashboard_queries_is_exported_by_a_running_router(stack, client):
    for model in ("yesno", "echo"):  # labelled series exist once requests made them
        client.completions.create(model=model, prompt="the quick brown fox", max_tokens=4)
    with pytest.raises(openai.NotFoundError):  # an error, counted by its code
        client.completions.create(model="no-such-task", prompt="hello")
    series = exported(httpx.get(stack.url + "/metrics", timeout=10).text)
    problems = [p for where, expr, legend in queries(dashboard()) for p in query_problems(where, expr, legend, series)]
    assert problems == []
    # Controls: the same check on a misspelt series, label and label value.
    assert query_problems("x", "rate(mtft_request_total[5m])", "", series) == ["x: mtft_request_total is not exported"]
    assert query_problems("x", "sum by (tsk) (mtft_route_percent)", "", series) == [
        "x: mtft_route_percent has no label 'tsk'"]
    assert "kind='completions'" in query_problems("x", 'mtft_tokens_total{kind="completions"}', "", series)[0]
    # The table as served: each task's version answers 100 % (no canary), and went live once, at start.
    assert series["mtft_route_percent"]["adapter"] >= {"yesno-v1", "echo-v1"}
    assert {"yesno", "echo"} <= series["mtft_adapters_added_total"]["task"]


def test_prometheus_scrapes_the_routers_metrics_route_where_the_manifests_serve_it():
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert "/metrics" in probe_routes()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {job["metrics_path"] for job in jobs.values() if "metrics_path" in job} == {"/metrics"}
    assert any(c.get("role") == "pod" for job in jobs.values() for c in job.get("kubernetes_sd_configs", []))
    for folder in (K8S / "serve", K8S / "scale"):
        [router] = [o for o in render(folder) if o["kind"] == "Deployment"]
        notes = router["spec"]["template"]["metadata"]["annotations"]
        [container] = k8s_containers(router)
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == container.ports["http"], folder
