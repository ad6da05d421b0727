"""Security: the API key is enforced with a constant-time compare; bodies over the limit get a
413 (declared or streamed), checked after the key so an anonymous client cannot make the server
read a large body; prompt size limits; internal ports (the KV control channel and its
rendezvous store) listen only on the configured address, never on every interface; metrics are
served only on the API's own HTTP port."""
from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import requests
import torch

from tandem.kvtransfer import KVReceiver, KVTransferConfig
from tandem.router.openai_ingress import ApiError, IngressConfig, OpenAIIngress
from tests.reliability.conftest import EDGE_API_KEY, EDGE_MAX_BODY_BYTES
from tests.reliability.probes import (
    assert_openai_error, listening_addresses, post, replica_names, replica_pid,
)

AUTH = {"Authorization": f"Bearer {EDGE_API_KEY}"}
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", f"Basic {EDGE_API_KEY}", EDGE_API_KEY, f"Bearer {EDGE_API_KEY[:-1]}",
    f"Bearer {EDGE_API_KEY}x", f"Bearer {EDGE_API_KEY.upper()}", "Bearer " + "k" * 4096, "Bearer caf\xe9",
])
def test_requests_without_the_right_key_get_401(edge_app, header):
    headers = {} if header is None else {"Authorization": header}
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        error = assert_openai_error(post(f"{edge_app}{path}", body, headers), 401)
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert requests.get(f"{edge_app}/v1/models", headers=headers, timeout=10).status_code == 401


def test_the_right_key_is_accepted_whatever_the_scheme_case(edge_app):
    for scheme in ("Bearer", "bearer", "BEARER"):
        reply = post(f"{edge_app}/v1/completions", {"prompt": "hi", "max_tokens": 1},
                     {"Authorization": f"{scheme} {EDGE_API_KEY}"})
        assert reply.status_code == 200, reply.text
    assert requests.get(f"{edge_app}/health", timeout=10).status_code == 200  # probes need no key


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """Every check goes through `hmac.compare_digest` (whose time does not depend on where the
    strings differ), also for a wrong length, where a plain == would return at once."""
    import tandem.router.openai_ingress as ingress

    calls: list[tuple[bytes, bytes]] = []
    real = ingress.hmac.compare_digest
    monkeypatch.setattr(ingress.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    stub = SimpleNamespace(_config=IngressConfig(model="m", served_model_name="m", max_model_len=8, api_key="s3cret"))
    authorize = OpenAIIngress.func_or_class._authorize
    for token, ok in (("s3cret", True), ("s3creT", False), ("s", False), ("s3cret-and-more", False)):
        request = SimpleNamespace(headers={"authorization": f"Bearer {token}"})
        if ok:
            authorize(stub, request)
        else:
            with pytest.raises(ApiError) as raised:
                authorize(stub, request)
            assert raised.value.status == 401
        assert calls[-1] == (token.encode(), b"s3cret")
    assert len(calls) == 4


def test_bodies_over_the_limit_get_413_declared_or_streamed(edge_app):
    url = f"{edge_app}/v1/completions"
    big = b'{"prompt": "' + b"x" * (EDGE_MAX_BODY_BYTES + 1) + b'"}'
    assert_openai_error(post(url, big, AUTH), 413)

    def chunks():  # chunked transfer: no Content-Length, so only the running count can catch it
        yield b'{"prompt": "'
        for _ in range(EDGE_MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'
    reply = requests.post(url, data=chunks(), headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert_openai_error(reply, 413)
    assert post(url, {"prompt": "hi", "max_tokens": 1}, AUTH).status_code == 200


def test_an_anonymous_oversized_body_is_refused_before_it_is_read(edge_app):
    """The key is checked before the body: a client without it gets its 401 on the headers alone,
    even when it declares a body far over the limit and never sends it."""
    host, port = edge_app.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /edge/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        started = time.monotonic()
        reply = conn.recv(4096)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert time.monotonic() - started < 10


def test_prompt_size_limits(edge_app):
    url = f"{edge_app}/v1/completions"
    error = assert_openai_error(post(url, {"prompt": "hello " * 300}, AUTH), 400)
    assert error["code"] == "context_length_exceeded"
    assert_openai_error(post(url, {"prompt": [[5, 6]] * 17, "max_tokens": 1}, AUTH), 400)  # too many prompts
    error = assert_openai_error(post(url, {"prompt": "hi", "max_tokens": 10_000}, AUTH), 400)
    assert error["param"] == "max_tokens"


def _kv_cache() -> torch.Tensor:
    return torch.zeros(2, 2, 4, 4, 2, 8)


def test_kv_receiver_listens_on_loopback_by_default():
    before = set(listening_addresses())
    with KVReceiver(_kv_cache()) as receiver:
        opened = set(listening_addresses()) - before
        assert len(opened) == 2, opened  # the zmq control socket and the rendezvous store
        assert all(address == "127.0.0.1" for address, _ in opened), opened
        assert receiver.address.startswith("tcp://127.0.0.1:")
    assert set(listening_addresses()) - before == set()  # closed with the receiver


def test_kv_receiver_listens_only_on_the_configured_address():
    before = set(listening_addresses())
    with KVReceiver(_kv_cache(), KVTransferConfig(bind_host="127.0.0.2")) as receiver:
        opened = set(listening_addresses()) - before
        assert {address for address, _ in opened} == {"127.0.0.2"}, opened
        assert receiver.address.startswith("tcp://127.0.0.2:")


def _listeners_on(port: int) -> set[str]:
    """Addresses any process on this machine listens on at `port`."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_ip, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(hex_ip)
                found.add(socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def test_the_api_and_its_metrics_listen_only_where_configured(edge_app, ray_serve):
    """Metrics are a route of the API (`GET /metrics`), not a port of their own, and the API
    port listens only on the configured host (the harness's 127.0.0.1). Neither the ingress nor
    the engine replica opens a listener on that port. (Ray's own worker gRPC ports are Ray's;
    see docs/RELIABILITY.md.)"""
    api_port = int(ray_serve["url"].rsplit(":", 1)[1])
    assert _listeners_on(api_port) == {"127.0.0.1"}
    for name in replica_names("edge", "OpenAIIngress") + replica_names("edge", "LLMWorker"):
        assert api_port not in {port for _, port in listening_addresses(replica_pid(name))}
    metrics = requests.get(f"{edge_app}/metrics", timeout=10)
    assert metrics.status_code == 200 and "tandem_ingress_requests_total" in metrics.text
