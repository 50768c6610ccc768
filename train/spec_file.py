"""Reading a task spec file: its YAML into a validated `Spec`, every problem reported at once with its line.

Pydantic checks each field; the cross checks here need the whole spec (unique task names and
prefixes, data files that exist, trackers and bitsandbytes that are installed, per-task tables under `multitask`
naming exactly the spec's tasks). Each problem names the YAML line it came from.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from .quantization import installed_problems
from .spec import Spec, SpecError
from .trackers import tracker_problems


def load_spec(path: Path) -> Spec:
    """Parse and validate a spec; raise SpecError listing every problem with its YAML line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the spec: {exc.strerror}"]) from exc
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(where, [f"malformed YAML: {getattr(exc, 'problem', exc)}"]) from exc
    if not isinstance(raw, dict):
        raise SpecError(str(path), ["the spec must be a mapping with at least 'tasks'"])
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(str(path), [_describe(err, root, path) for err in exc.errors()]) from exc
    spec.source = path.resolve()
    problems = _cross_checks(spec, root, path)
    if problems:
        raise SpecError(str(path), problems)
    return spec


def _describe(err, root, path: Path) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    line = _line_of(root, err["loc"])
    where = f"{path}:{line}" if line else str(path)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key (misspelt?)"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{where}: {loc}: {message}"


def _line_of(node, loc) -> int | None:
    """The 1-based YAML line of the value at `loc` (or its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _cross_checks(spec: Spec, root, path: Path) -> list[str]:
    problems = []
    if not spec.tasks:
        problems.append(f"{path}: tasks: no tasks; add at least one")
    seen_names: dict[str, int] = {}
    seen_prefixes: dict[str, int] = {}
    for i, task in enumerate(spec.tasks):
        where = f"{path}:{_line_of(root, ('tasks', i))}: tasks.{i}"
        if task.name in seen_names:
            problems.append(f"{where}.name: {task.name!r} is also task {seen_names[task.name]}'s name")
        seen_names.setdefault(task.name, i)
        if task.prefix in seen_prefixes:
            other = spec.tasks[seen_prefixes[task.prefix]].name
            problems.append(
                f"{where}.prefix: {task.prefix!r} is also the prefix of task {other!r}; "
                "the router could not tell them apart"
            )
        seen_prefixes.setdefault(task.prefix, i)
        if task.labels is not None and task.metric != "accuracy":
            problems.append(f"{where}.labels: only used with metric: accuracy")
        for role in ("train", "eval"):
            data_path = getattr(task.data, role)
            if data_path is not None and not _data_exists(spec.resolve(data_path)):
                problems.append(f"{where}.data.{role}: {spec.resolve(data_path)} does not exist")
    if spec.training.report_to:
        where = f"{path}:{_line_of(root, ('training', 'report_to'))}: training.report_to"
        problems += [f"{where}: {problem}" for problem in tracker_problems(spec.training.report_to)]
    if spec.training.base_quantization is not None:
        where = f"{path}:{_line_of(root, ('training', 'base_quantization'))}: training.base_quantization"
        problems += [f"{where}: {problem}" for problem in installed_problems()]
    return problems + _multitask_checks(spec, root, path)


def _multitask_checks(spec: Spec, root, path: Path) -> list[str]:
    """Every task named under multitask must exist, and per-task tables must cover every task."""
    names = [t.name for t in spec.tasks]
    m = spec.multitask
    problems = []

    def where(*loc) -> str:
        return f"{path}:{_line_of(root, ('multitask', *loc))}: multitask.{'.'.join(loc)}"

    for loc, table in ((("mixing", "weights"), m.mixing.weights), (("loss", "weights"), m.loss.weights)):
        if table is None:
            continue
        unknown = sorted(set(table) - set(names))
        missing = [n for n in names if n not in table]
        if unknown:
            problems.append(f"{where(*loc)}: unknown tasks {unknown}; tasks are {names}")
        if missing:
            problems.append(f"{where(*loc)}: no weight for tasks {missing}; give one per task")
    order = m.sequential.order
    if order is not None:
        unknown = [n for n in order if n not in names]
        if unknown:
            problems.append(f"{where('sequential', 'order')}: unknown tasks {unknown}; tasks are {names}")
        if len(set(order)) != len(order):
            problems.append(f"{where('sequential', 'order')}: a task is named twice in {order}")
    if m.mixing.strategy == "dynamic" and m.mixing.signal == "eval" and spec.training.eval_every is None:
        problems.append(f"{where('mixing', 'signal')}: signal eval needs training.eval_every (steps between evaluations)")
    return problems


def _data_exists(path: Path) -> bool:
    return Path(str(path).split("#", 1)[0]).exists()
