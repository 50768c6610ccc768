"""Faults, end to end (real vLLM, real router): a flood of malformed requests beside good traffic, and a
registry that is read-only or full while a new version is published.

A full disk and a registry remounted read-only are simulated at the OS boundary of the
publishing process (the system call raises ENOSPC or EROFS, as the kernel would): a real
full or read-only filesystem needs a mount the router's process can also see, which an
unprivileged test cannot make, and chmod does not stop root.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from serving import Load, answer

from mtft.registry import Registry, RegistryError

pytest_plugins = ["serving"]
pytestmark = pytest.mark.slow
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def chunked(total: int) -> Iterator[bytes]:
    """A body without a Content-Length, so the router must count what it reads."""
    yield b'{"prompt": "'
    for _ in range(total // 65536):
        yield b"x" * 65536
    yield b'"}'


# (what, path, body: bytes or JSON, X-Task header, status). Every one must be refused in OpenAI's shape.
MALFORMED = [
    ("oversized body", COMPLETIONS, b'{"prompt": "' + b"x" * (2 << 20) + b'"}', None, 413),
    ("oversized body without a length", COMPLETIONS, chunked, None, 413),
    ("invalid JSON", COMPLETIONS, b"{not json", None, 400),
    ("invalid UTF-8", COMPLETIONS, b'{"prompt": "\xff\xfe"}', None, 400),
    ("JSON nested past the parser's depth", COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, None, 400),
    ("a JSON list, not an object", CHAT, b"[1, 2]", None, 400),
    ("an empty body", COMPLETIONS, b"", None, 400),
    ("prompt of the wrong type", COMPLETIONS, {"model": "yesno", "prompt": 3}, None, 400),
    ("messages of the wrong type", CHAT, {"model": "base", "messages": "hi"}, None, 400),
    ("a message of the wrong type", CHAT, {"model": "echo", "messages": [1]}, None, 400),
    ("stream of the wrong type", COMPLETIONS, {"prompt": "yesno: hi", "stream": [1]}, None, 400),
    ("max_tokens of the wrong type", COMPLETIONS, {"model": "base", "prompt": "hi", "max_tokens": "many"}, None, 400),
    ("huge max_tokens, base", COMPLETIONS, {"model": "base", "prompt": "hi", "max_tokens": 10**9}, None, 400),
    ("huge max_tokens, task", COMPLETIONS, {"model": "yesno", "prompt": "hi", "max_tokens": 10**9}, None, 400),
    ("huge max_tokens, chat to a task", CHAT, {"model": "echo", "messages": HI, "max_tokens": 10**9}, None, 400),
    ("negative max_tokens", CHAT, {"model": "base", "messages": HI, "max_tokens": -5}, None, 400),
    ("negative n, base", COMPLETIONS, {"model": "base", "prompt": "hi", "n": -1}, None, 400),
    ("negative n, task", COMPLETIONS, {"model": "yesno", "prompt": "hi", "n": -1}, None, 400),
    ("unknown task", COMPLETIONS, {"model": "nope", "prompt": "hi"}, None, 404),
    ("unknown task in X-Task", COMPLETIONS, {"prompt": "hi"}, "nope", 404),
    ("unknown version", COMPLETIONS, {"model": "yesno@v99", "prompt": "hi"}, None, 404),
    ("path-like task name", COMPLETIONS, {"model": "../../../etc/passwd", "prompt": "hi"}, None, 404),
    ("path-like task in a pin", CHAT, {"model": "yesno@../v1", "messages": HI}, None, 404),
    ("path-like X-Task", COMPLETIONS, {"prompt": "hi"}, "../yesno", 404),
    ("encoded header injection in X-Task", COMPLETIONS, {"prompt": "hi"}, "yesno%0d%0aX-Injected:%201", 404),
    ("non-ASCII X-Task", COMPLETIONS, {"prompt": "hi"}, "yesno\u00ff".encode("latin-1"), 404),
]
# Raw header bytes a client library refuses to send: a bare CR or LF or a NUL inside X-Task, a folded
# line. Uvicorn's HTTP parser answers these itself (a plain-text 400, then it closes the connection):
# they never reach the router's code, so they cannot get OpenAI's error shape. (A full CRLF is no
# malformation on the wire: "X-Task: yesno\r\nX-Injected: 1" arrives as two valid headers.)
INJECTED = [b"yesno\rX-Injected: 1", b"yesno\nX-Injected: 1", b"yesno\x00", b"yesno\r\n X-Folded: 1"]


def send_malformed(client: httpx.Client, case) -> httpx.Response:
    what, path, body, task, _ = case
    headers = {"Content-Type": "application/json", **({"X-Task": task} if task else {})}
    content = body(2 << 20) if callable(body) else body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers=headers)


def send_injected(url: str, key: str, header: bytes) -> bytes:
    """One request with `header` as X-Task's raw value; the whole answer."""
    address = urlsplit(url)
    body = b'{"prompt": "hi"}'
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer " + key.encode() +
                     b"\r\nX-Task: " + header +
                     b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def series(text: str) -> int:
    return sum(line.startswith(("mtft_requests_total{", "mtft_errors_total{")) for line in text.splitlines())


def test_a_flood_of_malformed_requests_gets_openai_errors_and_leaves_good_traffic_and_memory_alone(client, stack):
    jobs = [(task, text) for task in ("yesno", "echo", "base") for text in ("hello world", "the quick brown fox")]
    alone = {job: answer(client, *job) for job in jobs}
    router_pid = stack.state()["router_pid"]
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    refused: list[tuple[str, int, dict]] = []
    with httpx.Client(base_url=stack.url, headers=auth, timeout=60) as flood:
        def one_round() -> None:
            for case in MALFORMED:
                response = send_malformed(flood, case)
                refused.append((case[0], response.status_code, response.json()))
            for header in INJECTED:
                refused.append((repr(header), int(send_injected(stack.url, stack.api_key, header).split()[1]), {}))

        one_round()  # warms the router's allocator up: the memory bound is on growth after it
        before, metrics_before = rss_mib(router_pid), series(flood.get("/metrics").text)
        with Load(client, jobs, threads=3) as load:
            # At least 4 rounds, and on until 12 good answers came back beside them (at most 20 rounds):
            # on a slow machine the good traffic must still be served during the flood, not after it.
            for rounds in range(20):
                one_round()
                if rounds >= 3 and len(load.answers) >= 12:
                    break
        after, metrics_after = rss_mib(router_pid), series(flood.get("/metrics").text)
    rounds = len(refused) // (len(MALFORMED) + len(INJECTED))
    print(f"{len(refused)} malformed requests in {rounds} rounds beside {len(load.answers)} good ones; "
          f"router RSS {before:.1f} -> {after:.1f} MiB")
    expected = {case[0]: case[4] for case in MALFORMED} | {repr(h): 400 for h in INJECTED}
    assert [(what, status) for what, status, _ in refused] == [(what, expected[what]) for what, _, _ in refused]
    shaped = [body for what, _, body in refused if what in {case[0] for case in MALFORMED}]
    assert all(set(body["error"]) == {"message", "type", "param", "code"} for body in shaped)
    assert not load.failures and len(load.answers) >= 12
    assert all(alone[job] == (text, adapter) for job, text, adapter in load.answers)
    assert after - before < 16, f"router RSS grew {after - before:.1f} MiB over the flood"
    assert metrics_after == metrics_before, "malformed requests must not add metric series"


# (the fault, the system call that fails, its errno, what the publisher is told)
DISK_FAULTS = [
    ("registry read-only", "open", errno.EROFS, r"registry .* is not writable \(Read-only file system\)"),
    ("disk full copying the weights", "sendfile", errno.ENOSPC,
     r"cannot publish yesno into registry .*: No space left on device \(.*adapter_\w+\.\w+\); nothing was published"),
    ("disk full writing the record", "fsync", errno.ENOSPC,
     r"cannot publish yesno into registry .*: No space left on device; nothing was published"),
    ("registry remounted read-only before the rename", "rename", errno.EROFS,
     r"cannot publish yesno into registry .*: Read-only file system \(.*/yesno/v2\); nothing was published"),
]


@pytest.mark.parametrize(("fault", "call", "code", "message"), DISK_FAULTS, ids=[f[0] for f in DISK_FAULTS])
def test_a_publish_the_disk_refuses_fails_clearly_and_the_served_version_stays(client, stack, monkeypatch,
                                                                                fault, call, code, message):
    registry = Registry(stack.registry)
    versions, served = registry.versions("yesno"), answer(client, "yesno", "hello world")
    real = getattr(os, call)

    def refused(*args, **kwargs):
        # open: only the registry's own files (other threads open files too)
        if call != "open" or str(args[0]).startswith(str(stack.registry)):
            # Named as the kernel's errors are: rename's with both paths, an fd's with none.
            names = {"open": (str(args[0]),), "rename": (str(args[0]), None, str(args[-1]))}.get(call, ())
            raise OSError(code, os.strerror(code), *names)
        return real(*args, **kwargs)

    with Load(client, [("yesno", "hello world")], threads=2) as load:
        time.sleep(0.2)
        monkeypatch.setattr(os, call, refused)
        with pytest.raises(RegistryError, match=message):
            stack.publish_copy("yesno")
        monkeypatch.undo()
        time.sleep(1.2)  # two registry polls: nothing new may go live
    assert registry.versions("yesno") == versions
    assert not any((stack.registry / ".staging").iterdir())  # no half-written version left behind either
    assert not load.failures and load.answers
    assert {(text, adapter) for _, text, adapter in load.answers} == {served}
    assert not stack.admin("GET").json()["rejected"]
