"""The route table and `route(request, table) -> Route`: which adapter answers a request.

Pure and synchronous, so the whole routing policy is tested without HTTP.
A `RouteTable` is immutable: a hot-add builds a new one and swaps a single
reference, so a request sees either the old table or the new one, never half.

Order: (a) `model` names a task (`task@vN` pins the served version) or the base
model; any other name that is not an alias ('auto', 'mtft': "let the router choose")
is a 404 `model_not_found`, as OpenAI answers a misspelt model, unless the table routes
unknown names; (b) the `X-Task` header; (c) the text starts with a task prefix, the
longest one winning; (d) learned: the served task (among those the key may use)
whose training inputs the text is most like (`learned.py`), if its score reaches
the threshold; (e) the configured default (a task or the base model);
otherwise `NotFound` listing the tasks. Prefix lookup probes one dict per
distinct prefix length, so it costs the same with 3 tasks or 3,000.

A task with a canary sends a fixed share of its requests to a second version,
chosen by a stable hash of the request's key (the `user` field, else the API
key, else the text): the same client keeps getting the same version.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from mtft.registry import AdapterRecord, RoutingProfile

from .errors import APIError
from .learned import LearnedIndex

BASE = "base"
ALIASES = ("auto", "mtft")
Match = Literal["model", "version", "header", "prefix", "learned", "default", "base"]


@dataclass(frozen=True)
class Split:
    """A canary: `record` answers `percent` % of its task's requests."""

    record: AdapterRecord
    percent: float

    def takes(self, key: str | None) -> bool:
        digest = hashlib.blake2b((key or "").encode(), digest_size=8, person=b"mtft-canary").digest()
        return int.from_bytes(digest, "big") / 2**64 * 100 < self.percent


@dataclass(frozen=True)
class RouteTable:
    current: Mapping[str, AdapterRecord] = field(default_factory=dict)
    """task -> the adapter version serving it now."""
    base_names: frozenset[str] = frozenset({BASE})
    """`model` values meaning the base model: 'base' and the base model's own name."""
    base_target: str = BASE
    """the vLLM model that answers base traffic (the zero adapter, or the base itself)."""
    default: str | None = None
    """a task name or 'base', used when nothing else matches."""
    canaries: Mapping[str, Split] = field(default_factory=dict)
    """task -> a second version answering a share of its requests."""
    profiles: Mapping[str, RoutingProfile] = field(default_factory=dict)
    """adapter name -> its routing profile (versions published without one have none)."""
    learned_threshold: float | None = None
    """the least learned score that routes; None: learned routing is off."""
    aliases: frozenset[str] = frozenset(ALIASES)
    """`model` values that ask the router to choose (X-Task, prefix, learned route, default)."""
    route_unknown_models: bool = False
    """route any other unknown `model` like an alias, instead of answering 404."""
    known_tasks: frozenset[str] = frozenset()
    """every task this router has seen in the registry: a `model` naming one that is not served now
    (withdrawn, rejected, removed) asked for that task, so it is never learned-routed to another."""
    prefixes: Mapping[str, str] = field(default_factory=dict, init=False)
    prefix_lengths: tuple[int, ...] = field(default=(), init=False)
    learned: LearnedIndex = field(default=None, init=False)

    def __post_init__(self):
        prefixes = {record.prefix: task for task, record in self.current.items()}
        object.__setattr__(self, "current", MappingProxyType(dict(self.current)))
        object.__setattr__(self, "canaries", MappingProxyType(
            {t: c for t, c in self.canaries.items() if t in self.current and c.record.name != self.current[t].name}))
        object.__setattr__(self, "prefixes", MappingProxyType(prefixes))
        object.__setattr__(self, "prefix_lengths", tuple(sorted({len(p) for p in prefixes}, reverse=True)))
        names = {r.name for r in self.records()}
        object.__setattr__(self, "profiles", MappingProxyType({n: p for n, p in self.profiles.items() if n in names}))
        served = {t: self.profiles[r.name] for t, r in self.current.items() if r.name in self.profiles}
        object.__setattr__(self, "learned", LearnedIndex(served if self.learned_threshold is not None else {}))

    @property
    def tasks(self) -> list[str]:
        return sorted(self.current)

    @property
    def learned_names(self) -> frozenset[str]:
        """The served adapters learned routing can choose."""
        return frozenset(self.current[t].name for t in self.learned.tasks)

    def prefix_owner(self, record: AdapterRecord) -> str | None:
        """Another task already routed by this record's prefix (a hot-add must not steal it)."""
        owner = self.prefixes.get(record.prefix)
        return owner if owner not in (None, record.task) else None

    def with_adapter(self, record: AdapterRecord, profile: RoutingProfile | None = None) -> RouteTable:
        """A new table where `record` serves its task (replacing any other version; a promoted canary
        stops being one); with a profile, requests that name no task can be routed to it."""
        profiles = {**self.profiles, record.name: profile} if profile is not None else self.profiles
        return replace(self, current={**self.current, record.task: record}, profiles=profiles)

    def with_canary(self, task: str, split: Split | None) -> RouteTable:
        canaries = {t: c for t, c in self.canaries.items() if t != task}
        return replace(self, canaries=canaries | ({task: split} if split else {}))

    def without_task(self, task: str) -> RouteTable:
        """No new request reaches the task's adapters; in-flight ones finish on them."""
        return replace(self, current={t: r for t, r in self.current.items() if t != task})

    def records(self) -> list[AdapterRecord]:
        """Every version that answers requests: the served ones and the canaries."""
        return [*self.current.values(), *(c.record for c in self.canaries.values())]

    def answering(self, task: str, key: str | None) -> AdapterRecord:
        """The version of a served task that answers a request with this key."""
        split = self.canaries.get(task)
        return split.record if split is not None and split.takes(key) else self.current[task]


@dataclass(frozen=True)
class RouteRequest:
    """What routing looks at: the `model` field, the `X-Task` header, the prompt or last user message."""

    model: str | None = None
    task_header: str | None = None
    text: str | None = None
    key: str | None = None
    """what keeps a client on one side of a canary split; None: the text."""
    allowed: frozenset[str] | None = None
    """the tasks the caller's key may use (None: any): learned routing chooses among these only."""


@dataclass(frozen=True)
class Route:
    matched: Match
    upstream_model: str
    """the `model` sent to vLLM: an adapter name, or the base target."""
    record: AdapterRecord | None = None
    """None for the base model."""
    text: str | None = None
    """task routes: the input without its task prefix, to render with the record's template."""
    score: float | None = None
    """the learned score of the request's nearest task, where learned routing looked at it."""

    @property
    def task(self) -> str:
        return self.record.task if self.record else BASE

    @property
    def adapter(self) -> str:
        return self.record.name if self.record else self.upstream_model


class NotFound(APIError):
    def __init__(self, what: str, table: RouteTable, param: str | None, code: str = "unknown_task"):
        super().__init__(404, f"{what}; known tasks: {table.tasks} (or 'base' for the base model)", code, param)


class ModelNotFound(NotFound):
    """OpenAI's answer to a model it does not have (404 `model_not_found`), with the nearest name if one is close."""

    def __init__(self, model: str, table: RouteTable, what: str | None = None):
        if what is None and model in table.known_tasks:
            what = f"task {model!r} is not served now"
        elif what is None:
            near = difflib.get_close_matches(model, [*table.tasks, BASE, *table.aliases], n=1, cutoff=0.6)
            what = f"the model {model!r} does not exist" + (f" (did you mean {near[0]!r}?)" if near else "")
        choose = " or ".join(repr(a) for a in sorted(table.aliases))
        super().__init__(f"{what}; {choose} lets the router choose" if choose else what, table, "model",
                         "model_not_found")


def route(request: RouteRequest, table: RouteTable) -> Route:
    model = request.model
    if model:
        if model in table.current:
            return _task_route("model", table, model, request)
        if "@" in model:
            # A pin only matches a version served now (or a canary): a client that pinned
            # v1 gets a 404 after v2 replaces it, never a silently different answer.
            task, _, version = model.partition("@")
            record = next((r for r in table.records() if r.task == task and version == f"v{r.version}"), None)
            if record is None:
                raise ModelNotFound(model, table, f"model {model!r} names no served adapter version")
            return Route("version", record.name, record, _strip(record, request.text))
        if model in table.base_names:
            return Route("base", table.base_target)
        if model not in table.aliases and not table.route_unknown_models:
            raise ModelNotFound(model, table)
    if request.task_header:
        record = table.current.get(request.task_header)
        if record is None:
            raise NotFound(f"X-Task header names unknown task {request.task_header!r}", table, None)
        return _task_route("header", table, record.task, request)
    if request.text:
        for length in table.prefix_lengths:
            task = table.prefixes.get(request.text[:length])
            if task is not None:
                return _task_route("prefix", table, task, request)
    score = None
    if request.text and len(table.learned) and model not in table.known_tasks:
        decision = table.learned.classify(request.text, request.allowed)
        if decision is not None and decision.score >= table.learned_threshold:
            return replace(_task_route("learned", table, decision.task, request), score=decision.score)
        score = decision.score if decision is not None else None
    if table.default == BASE:
        return Route("default", table.base_target, score=score)
    if table.default in table.current:
        return replace(_task_route("default", table, table.default, request), score=score)
    raise NotFound(f"no task matches model {model!r}, the X-Task header or a task prefix", table, "model")


def _task_route(matched: Match, table: RouteTable, task: str, request: RouteRequest) -> Route:
    key = request.key if request.key is not None else request.text
    record = table.answering(task, key)
    return Route(matched, record.name, record, _strip(record, request.text))


def _strip(record: AdapterRecord, text: str | None) -> str:
    text = text or ""
    return text[len(record.prefix):] if text.startswith(record.prefix) else text
