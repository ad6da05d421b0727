"""The GPU routing benchmark's streaming client: TTFT is the first token's chunk (what the
ingress stamps as first_token_sent), even when that token's text is empty, and the role-only
chunk before it does not count."""
from __future__ import annotations

import pytest

from tandem.bench.routing_gpu_bench import chat_stream


@pytest.mark.parametrize("empty_tokens", [0, 3, 5])
def test_ttft_is_the_first_token_chunk_whatever_its_text(fake_server, empty_tokens):
    server = fake_server(ttft_s=0.05, token_delay_s=0.1, empty_tokens=empty_tokens)
    port = int(server.url.rsplit(":", 1)[1])
    reply = chat_stream(port, "m", [{"role": "user", "content": "hi"}], 5, timeout=10)
    # The first token left at ~0.05 s; the first non-empty one would be 0.1 s later per empty token.
    assert 0.05 <= reply.ttft_s < 0.09
    assert reply.completion_tokens == 5
    assert reply.text == "".join(f" w0_{i}" for i in range(empty_tokens, 5))
