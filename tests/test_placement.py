"""Adapter placement over N backends as tables: no HTTP, no vLLM, just `mtft.router.placement`."""

from __future__ import annotations

import pytest

from mtft.router.placement import BackendView, NoPlacement, Placement, Policy, evictions, home, place, rejoin

K2 = Policy(copies=2, spill_inflight=4)


def b(url: str, *loaded: str, inflight: int = 0, healthy: bool = True, slots: int = 8, busy=(), used=None,
      refused=()) -> BackendView:
    return BackendView(url, healthy, inflight, frozenset(loaded), slots, frozenset(busy), used or {},
                       frozenset(refused))


@pytest.mark.parametrize(("backends", "policy", "expected"), [
    # a holder, least loaded first
    ([b("a", "x", inflight=3), b("b", "x", inflight=1), b("c")], K2, Placement("b")),
    # ties go to the first URL, so placement is deterministic
    ([b("b", "x"), b("a", "x")], K2, Placement("a")),
    # bounded: one holder under the threshold keeps its adapter; the idle third is not touched
    ([b("a", "x", inflight=3), b("b"), b("c")], K2, Placement("a")),
    # spill-over: every holder busy past the threshold -> one more backend, loaded first
    ([b("a", "x", inflight=4), b("b", "x", inflight=5), b("c", inflight=1)], K2, Placement("c", load=True)),
    # ... but never onto a backend busier than the best holder
    ([b("a", "x", inflight=4), b("c", inflight=6)], K2, Placement("a")),
    # ... and at most once: k + 1 copies already
    ([b("a", "x", inflight=9), b("b", "x", inflight=9), b("c", "x", inflight=9), b("d")], K2, Placement("a")),
    # a pinned adapter is everywhere already: never spilled
    ([b("a", "x", inflight=9), b("b")], Policy(pinned=frozenset({"x"})), Placement("a")),
    # a dead holder is skipped; the adapter is loaded on a healthy backend
    ([b("a", "x", healthy=False), b("b", "y", inflight=2), b("c", inflight=1)], K2, Placement("c", load=True)),
    # held nowhere: the freest slots first, then the least loaded
    ([b("a", "y", "z", slots=2), b("b", "y", slots=2, inflight=3)], K2, Placement("b", load=True)),
    # a backend that refused the adapter (a lower --max-lora-rank) never gets it
    ([b("a", refused=["x"]), b("b", inflight=5)], K2, Placement("b", load=True)),
    # eviction: full of idle adapters -> the least recently used unpinned one goes
    ([b("a", "y", "z", "p", slots=3, used={"y": 5.0, "z": 2.0, "p": 1.0})], Policy(pinned=frozenset({"p"})),
     Placement("a", load=True, evict=("z",))),
    # an adapter with requests in flight is never evicted
    ([b("a", "y", "z", slots=2, busy=["z"], used={"y": 9.0, "z": 1.0})], K2, Placement("a", load=True, evict=("y",))),
])
def test_place(backends, policy, expected):
    assert place("x", backends, policy) == expected


def test_the_base_model_goes_to_the_least_loaded_healthy_backend():
    assert place(None, [b("a", inflight=2), b("b", inflight=1, healthy=False), b("c", inflight=2)], K2) == Placement("a")


@pytest.mark.parametrize(("backends", "exclude", "match"), [
    ([], frozenset(), "no backend is configured"),
    ([b("a", "x", healthy=False)], frozenset(), r"a \(down\)"),
    ([b("a", "x"), b("b", healthy=False)], frozenset({"a"}), r"a \(failed this request\), b \(down\)"),
    ([b("a", refused=["x"])], frozenset(), r"a \(refused x\)"),
    ([b("a", "y", slots=1, busy=["y"])], frozenset(), "slots hold adapters with requests in flight"),
])
def test_nowhere_to_place_says_why(backends, exclude, match):
    with pytest.raises(NoPlacement, match=match):
        place("x", backends, K2, exclude)


def test_a_retry_never_returns_to_the_backend_that_failed():
    assert place("x", [b("a", "x"), b("b", "x", inflight=7)], K2, frozenset({"a"})) == Placement("b")


@pytest.mark.parametrize(("backends", "policy", "prefer", "expected"), [
    # bounded k: 2 of 3, the emptiest first
    ([b("a", "y", "z"), b("b"), b("c", "y")], K2, frozenset(), ["b", "c"]),
    # a new version goes where the old one is served
    ([b("a", "x1"), b("b"), b("c", "x1")], K2, frozenset({"a", "c"}), ["a", "c"]),
    # pinned: every healthy backend
    ([b("a", "y"), b("b"), b("c", healthy=False)], Policy(pinned=frozenset({"x"})), frozenset(), ["a", "b"]),
    # k larger than the pool: all there is
    ([b("a")], Policy(copies=3), frozenset(), ["a"]),
    # a backend full of busy adapters is skipped
    ([b("a", "y", slots=1, busy=["y"]), b("b", "z", slots=1), b("c", "w", slots=1, busy=["w"])], K2, frozenset(), ["b"]),
])
def test_home(backends, policy, prefer, expected):
    assert sorted(p.backend for p in home("x", backends, policy, prefer)) == expected


def test_home_never_evicts_the_version_being_replaced():
    full = b("a", "x1", "y", slots=2, used={"x1": 0.0, "y": 9.0})
    assert home("x2", [full], K2, frozenset({"a"}), keep=frozenset({"x1"})) == [Placement("a", True, ("y",))]


@pytest.mark.parametrize(("backends", "match"), [
    ([b("a", healthy=False)], r"a \(down\)"),
    ([b("a", "y", slots=1, busy=["y"])], "no healthy backend has a slot"),
])
def test_home_nowhere_says_why(backends, match):
    with pytest.raises(NoPlacement, match=match):
        home("x", backends, K2)


def test_a_pinned_adapter_that_does_not_fit_somewhere_is_refused():
    with pytest.raises(NoPlacement, match="pinned x does not fit on b"):
        home("x", [b("a"), b("b", "p", slots=1)], Policy(pinned=frozenset({"x", "p"})))


@pytest.mark.parametrize(("joining", "others", "previous", "expected"), [
    # restarted empty: pinned first, then what it held, most used first, then what no backend holds (w)
    (b("a", slots=8), [b("b", "zero", "y", "x")], {"x", "y"}, ["zero", "y", "x", "w"]),
    # a new backend: pinned, then adapters with fewer than k healthy holders (w is on two already)
    (b("a", slots=8), [b("b", "zero", "y", "w"), b("c", "zero", "w")], set(), ["zero", "y", "x"]),
    # a holder that is down does not count as a copy
    (b("a", slots=8), [b("b", "zero", "y", "w"), b("c", "zero", "w", healthy=False)], set(), ["zero", "y", "w", "x"]),
    # within its free slots; what it still holds is not loaded again
    (b("a", "zero", slots=3), [b("b", "zero", "y", "x")], {"x", "y"}, ["y", "x"]),
    (b("a", slots=2), [b("b", "zero", "y", "x")], {"x", "y"}, ["zero", "y"]),
    # an adapter it refused is not tried again
    (b("a", refused=["y"]), [b("b", "zero", "y", "x")], {"x", "y"}, ["zero", "x", "w"]),
])
def test_rejoin(joining, others, previous, expected):
    wanted = ["zero", "y", "w", "x"]  # most used first
    assert rejoin(joining, [joining, *others], Policy(pinned=frozenset({"zero"})), frozenset(previous), wanted) == expected


@pytest.mark.parametrize(("backend", "expected"), [
    (b("a", "y", slots=2), ()),
    (b("a", "y", "z", slots=2, used={"y": 2.0, "z": 1.0}), ("z",)),
    (b("a", "y", "z", "w", slots=2, used={"y": 3.0, "z": 1.0, "w": 2.0}), ("z", "w")),  # slots shrank: two go
    (b("a", "y", "p", slots=2, busy=["y"]), None),  # busy and pinned: nothing can go
])
def test_evictions(backend, expected):
    assert evictions(backend, Policy(pinned=frozenset({"p"}))) == expected
