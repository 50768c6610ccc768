"""Which backend answers a request and which adapters live where: pure functions over backend views.

The router issues every adapter load and unload itself, so it knows exactly which adapters
each vLLM holds (vLLM's own metrics forget an idle loaded adapter, vllm#45325). These
functions decide from that knowledge, without I/O, so the policy is tested as tables
(tests/test_placement.py):

- `place`: where one request goes. A healthy backend that holds its adapter, least loaded
  first. When every holder has `Policy.spill_inflight` requests or more in flight, one more
  backend, loaded first (the adapter then lives on at most `copies + 1`). An adapter that no
  healthy backend holds is loaded where slots are freest.
- `home`: where a hot-added adapter, or a task's new version, is loaded before it goes live:
  every healthy backend for a pinned adapter, else `copies` of them (the old version's first).
- `rejoin`: what a backend that (re)joins loads before it takes traffic: the pinned adapters,
  those it held before, then those with fewer than `copies` healthy holders, most used first.
- A full backend (`slots`: vLLM's --max-cpu-loras, the adapters it keeps in host memory; past
  that vLLM evicts by itself and reads from disk again) first unloads its least recently used
  unpinned adapters that have nothing in flight there.

Adapters are vLLM names (`task-vN`, the zero adapter); `None` is the base model itself, which
every backend serves without loading anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackendView:
    """One backend as placement sees it: a snapshot, never mutated."""

    url: str
    healthy: bool = True
    """in rotation: answering, and (after a restart) reloaded."""
    inflight: int = 0
    loaded: frozenset[str] = frozenset()
    """exactly the adapters the router loaded there (or found there when it joined)."""
    slots: int = 8
    busy: frozenset[str] = frozenset()
    """adapters with requests in flight there: never evicted."""
    last_used: Mapping[str, float] = field(default_factory=dict)
    refused: frozenset[str] = frozenset()
    """adapters this backend failed to load: never placed there again."""


@dataclass(frozen=True)
class Policy:
    copies: int = 2
    """k: backends an unpinned adapter is loaded on before it goes live."""
    spill_inflight: int = 4
    """in-flight requests on each of an adapter's backends from which it spills onto one more."""
    pinned: frozenset[str] = frozenset()
    """adapters on every backend, never evicted (the zero adapter, `--pin` tasks)."""


@dataclass(frozen=True)
class Placement:
    backend: str
    load: bool = False
    """load the adapter there before sending anything."""
    evict: tuple[str, ...] = ()
    """adapters to unload there first, to free a slot."""


class NoPlacement(Exception):
    """No healthy backend can take the adapter; the message says why."""


def place(adapter: str | None, backends: Sequence[BackendView], policy: Policy,
          exclude: frozenset[str] = frozenset()) -> Placement:
    """The backend for one request (`exclude`: backends this request already failed on)."""
    healthy = [b for b in backends if b.healthy and b.url not in exclude and adapter not in b.refused]
    if not healthy:
        raise NoPlacement(_none_healthy(adapter, backends, exclude))
    if adapter is None:
        return Placement(_least_loaded(healthy).url)
    holders = [b for b in healthy if adapter in b.loaded]
    if not holders:
        target = _load_target(adapter, healthy, policy)
        if target is None:
            raise NoPlacement(f"every healthy backend's slots hold adapters with requests in flight; "
                              f"{adapter} waits for one to finish")
        return target
    best = _least_loaded(holders)
    if best.inflight < policy.spill_inflight or adapter in policy.pinned or len(holders) > policy.copies:
        return Placement(best.url)
    quieter = [b for b in healthy if adapter not in b.loaded and b.inflight < best.inflight]
    return _load_target(adapter, quieter, policy) or Placement(best.url)


def home(adapter: str, backends: Sequence[BackendView], policy: Policy,
         prefer: frozenset[str] = frozenset(), keep: frozenset[str] = frozenset()) -> list[Placement]:
    """Where `adapter` is loaded before it goes live; `prefer`: backends holding the version it
    replaces (its traffic stays where it was), `keep`: adapters no eviction may touch (that version)."""
    healthy = [b for b in backends if b.healthy]
    if not healthy:
        raise NoPlacement(_none_healthy(adapter, backends, frozenset()))
    chosen: list[Placement] = []
    ranked = sorted(healthy, key=lambda b: (b.url not in prefer, len(b.loaded) >= b.slots, len(b.loaded),
                                            b.inflight, b.url))
    wanted = len(healthy) if adapter in policy.pinned else policy.copies
    for backend in ranked:
        if len(chosen) == wanted:
            break
        if adapter in backend.loaded:
            chosen.append(Placement(backend.url))
            continue
        evict = evictions(backend, policy, keep)
        if evict is not None:
            chosen.append(Placement(backend.url, load=True, evict=evict))
        elif adapter in policy.pinned:
            raise NoPlacement(f"pinned {adapter} does not fit on {backend.url}: its {backend.slots} slots hold "
                              "pinned adapters or adapters with requests in flight")
    if not chosen:
        raise NoPlacement(f"no healthy backend has a slot for {adapter}: all hold pinned adapters or "
                          "adapters with requests in flight")
    return chosen


def rejoin(backend: BackendView, backends: Sequence[BackendView], policy: Policy, previous: frozenset[str],
           wanted: Sequence[str]) -> list[str]:
    """The adapters `backend` loads before it takes traffic, in order, within its free slots.

    `previous`: what it held before it left; `wanted`: the adapters served now, most used first.
    """
    others = [b for b in backends if b.healthy and b.url != backend.url]
    order = [a for a in wanted if a in policy.pinned]
    order += [a for a in wanted if a in previous and a not in order]
    order += [a for a in wanted if a not in order and sum(a in b.loaded for b in others) < policy.copies]
    free = max(backend.slots - len(backend.loaded), 0)
    return [a for a in order if a not in backend.loaded and a not in backend.refused][:free]


def evictions(backend: BackendView, policy: Policy, keep: frozenset[str] = frozenset()) -> tuple[str, ...] | None:
    """What `backend` must unload to take one more adapter, least recently used first; None: it cannot."""
    excess = len(backend.loaded) + 1 - backend.slots
    if excess <= 0:
        return ()
    idle = sorted(backend.loaded - policy.pinned - backend.busy - keep,
                  key=lambda a: (backend.last_used.get(a, 0.0), a))
    return tuple(idle[:excess]) if len(idle) >= excess else None


def _load_target(adapter: str, candidates: Sequence[BackendView], policy: Policy) -> Placement | None:
    """The candidate to load `adapter` onto: a free slot first, then the least loaded."""
    for backend in sorted(candidates, key=lambda b: (len(b.loaded) >= b.slots, b.inflight, len(b.loaded), b.url)):
        evict = evictions(backend, policy)
        if evict is not None:
            return Placement(backend.url, load=True, evict=evict)
    return None


def _least_loaded(backends: Sequence[BackendView]) -> BackendView:
    return min(backends, key=lambda b: (b.inflight, b.url))


def _none_healthy(adapter: str | None, backends: Sequence[BackendView], exclude: frozenset[str]) -> str:
    if not backends:
        return "no backend is configured"
    what = adapter or "the base model"
    return f"no healthy backend can serve {what}: " + ", ".join(
        f"{b.url} ({_why_not(b, adapter, exclude)})" for b in backends)


def _why_not(backend: BackendView, adapter: str | None, exclude: frozenset[str]) -> str:
    if backend.url in exclude:
        return "failed this request"
    if adapter in backend.refused:
        return f"refused {adapter}"
    return "healthy" if backend.healthy else "down"
