"""A small OpenAI-compatible streaming server with known, injected behaviour: a test fixture for
the load generator (the real endpoint it stands in for is any vLLM-style server).

It answers `/v1/completions` and `/v1/chat/completions` in vLLM's SSE format (a role-only first
chunk on chat, one chunk per token, `usage` in a final chunk with empty choices when asked for,
then `[DONE]`), sleeping `ttft_s` before the first token and `token_delay_s` between tokens.
The n-th request it receives (0-based, in arrival order) can be made to fail as listed in
`failures`. `/metrics` exposes Prometheus counters: prefix-cache queries/hits (in words, the
longest prefix shared with any earlier prompt) and KV-transfer bytes (a fixed amount per request).
"""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

FAILURE_MODES = ("500", "429", "drop", "malformed", "stream_error", "hang", "truncated")


@dataclass
class FakeBehavior:
    ttft_s: float = 0.05
    ttft_by_request: list[float] | None = None  # per request number; overrides ttft_s
    token_delay_s: float = 0.01
    send_usage: bool = True  # when the request asks for it (stream_options.include_usage)
    failures: dict[int, str] = field(default_factory=dict)  # request number -> one of FAILURE_MODES
    metric_prefix: str = "tandem_"
    kv_bytes_per_request: int = 4096
    # The first this-many tokens of each answer stream with empty text, as a model's special
    # tokens or the first half of a multi-byte character do.
    empty_tokens: int = 0


@dataclass(frozen=True)
class ReceivedRequest:
    number: int
    path: str
    payload: dict
    session_header: str | None
    answer: str  # the full text the server streamed back (when it did)


def _prompt_words(payload: dict) -> list[str]:
    if "prompt" in payload:
        return str(payload["prompt"]).split()
    return " ".join(f"<{m['role']}> {m['content']}" for m in payload.get("messages", [])).split()


class FakeOpenAIServer:
    """Runs in its own thread and event loop, so synchronous callers (the CLI's `run(args)`,
    which owns its own loop) can use it too."""

    def __init__(self, behavior: FakeBehavior | None = None) -> None:
        self.behavior = behavior or FakeBehavior()
        self.received: list[ReceivedRequest] = []
        self._count = 0
        self._seen_prompts: list[list[str]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.kv_bytes = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Idempotent: a test may stop a server early (to get a refused port)."""
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- handlers -----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        p = self.behavior.metric_prefix
        body = (
            f"# HELP {p}prefix_cache_queries_total Prompt tokens looked up in the prefix cache.\n"
            f"# TYPE {p}prefix_cache_queries_total counter\n"
            f'{p}prefix_cache_queries_total{{model_name="fake-model",replica="0"}} {self.prefix_queries}\n'
            f'{p}prefix_cache_hits_total{{model_name="fake-model",replica="0"}} {self.prefix_hits}\n'
            f"{p}prefix_cache_hits_created 1.7e9\n"
            f"# TYPE {p}kv_transfer_bytes_total counter\n"
            f"{p}kv_transfer_bytes_total {self.kv_bytes}.0\n"
        )
        return web.Response(text=body, content_type="text/plain")

    def _account_prefix(self, words: list[str]) -> None:
        best = 0
        for seen in self._seen_prompts:
            shared = 0
            for a, b in zip(seen, words):
                if a != b:
                    break
                shared += 1
            best = max(best, shared)
        self._seen_prompts.append(words)
        self.prefix_queries += len(words)
        self.prefix_hits += best
        self.kv_bytes += self.behavior.kv_bytes_per_request

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        number = self._count
        self._count += 1
        payload = await request.json()
        failure = self.behavior.failures.get(number)
        chat = request.path.endswith("/chat/completions")
        session_header = request.headers.get("X-Session-Id")
        if failure == "500":
            self.received.append(ReceivedRequest(number, request.path, payload, session_header, ""))
            return web.json_response({"error": {"message": "injected failure", "type": "server_error"}}, status=500)
        if failure == "429":
            self.received.append(ReceivedRequest(number, request.path, payload, session_header, ""))
            return web.json_response({"error": {"message": "too many requests"}}, status=429)
        self._account_prefix(_prompt_words(payload))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        request_id = f"cmpl-{number}"

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": request_id, "object": kind, "created": 0, "model": payload.get("model"), "choices": [choice]}

        if failure == "hang":
            await asyncio.sleep(30)
        if chat:
            await send(chunk(None, role=True))  # vLLM's role-only first chunk: not a token
        ttft_schedule = self.behavior.ttft_by_request
        await asyncio.sleep(ttft_schedule[number] if ttft_schedule is not None else self.behavior.ttft_s)
        max_tokens = int(payload.get("max_tokens", 16))
        pieces = []
        for i in range(max_tokens):
            if i > 0:
                await asyncio.sleep(self.behavior.token_delay_s)
            piece = "" if i < self.behavior.empty_tokens else f" w{number}_{i}"
            pieces.append(piece)
            finish = "length" if i == max_tokens - 1 else None
            await send(chunk(piece, finish))
            if failure == "drop" and i == 1:
                request.transport.abort()  # connection lost mid-stream
                return response
            if failure == "malformed" and i == 1:
                await response.write(b'data: {"choices": [{"text": "unterminated\n\n')
            if failure == "truncated" and i == 1:
                await response.write_eof()  # a clean end with neither finish_reason nor [DONE]
                return response
            if failure == "stream_error" and i == 1:
                await send({"error": {"message": "engine died", "code": 500}})
        answer = "".join(pieces)
        self.received.append(ReceivedRequest(number, request.path, payload, session_header, answer))
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        if include_usage and self.behavior.send_usage:
            prompt_tokens = len(_prompt_words(payload))
            await send({"id": request_id, "object": kind, "created": 0, "model": payload.get("model"), "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                                  "total_tokens": prompt_tokens + max_tokens}})
        await send("[DONE]")
        await response.write_eof()
        return response
