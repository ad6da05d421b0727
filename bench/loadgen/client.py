"""One streaming request against an OpenAI-compatible server, timed.

Speaks `/v1/completions` and `/v1/chat/completions` with `stream: true` and
`stream_options.include_usage`, reads the SSE stream as bytes arrive, and records the first
token's chunk (TTFT), every gap between token chunks (ITL), the end (E2E) and the server's
`usage`. A token chunk is one whose choice carries text, even empty text (a special token, or
the first byte of a multi-byte character: vLLM's benchmark counts these too); a chat stream's
opening role chunk is not one, nor is a closing chunk with only a finish_reason. Failures become an `error_kind`, never an exception: "http_<status>", "timeout",
"connection" (refused, reset, or dropped mid-stream), "malformed_stream" (undecodable data, or
a stream that ends with neither [DONE] nor a finish_reason), "stream_error" (an error object sent
inside the stream, as vLLM does).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from tandem.bench.loadgen.request import BenchRequest, RequestResult
from tandem.bench.loadgen.text import TokenCounter

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # http://host:port (a trailing /v1 is accepted)
    model: str
    endpoint: str = "chat"  # "chat" | "completions"
    api_key: str | None = None
    request_timeout_s: float = 600.0
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM/SGLang extension: generate exactly max_tokens

    @property
    def root_url(self) -> str:
        return root_url(self.base_url)


def root_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class _StreamFailure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _SSEDecoder:
    """Splits a byte stream into SSE events' data payloads (multi-line data joined by newlines;
    comments and other fields ignored)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data_lines: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return events
            line = self._buffer[:newline].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buffer = self._buffer[newline + 1 :]
            self._take_line(line, events)

    def close(self) -> list[str]:
        events: list[str] = []
        if self._buffer:
            self._take_line(self._buffer.rstrip(b"\r").decode("utf-8", errors="replace"), events)
            self._buffer = b""
        self._take_line("", events)
        return events

    def _take_line(self, line: str, events: list[str]) -> None:
        if line == "":
            if self._data_lines:
                events.append("\n".join(self._data_lines))
                self._data_lines = []
        elif line.startswith("data:"):
            self._data_lines.append(line[5:].removeprefix(" "))


class OpenAIClient:
    """Sends `BenchRequest`s; one aiohttp session (no connection cap) shared by all requests."""

    def __init__(self, config: ClientConfig, counter: TokenCounter) -> None:
        self.config = config
        self._counter = counter
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, read_bufsize=1 << 16)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use OpenAIClient as an async context manager")
        return self._session

    def _headers(self, request: BenchRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        if request.conversation_id:
            headers["X-Session-Id"] = request.conversation_id
        return headers

    def _payload(self, request: BenchRequest) -> dict[str, object]:
        payload: dict[str, object] = {
            "model": self.config.model,
            "max_tokens": request.max_tokens,
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.endpoint == "chat":
            if request.messages is not None:
                payload["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                payload["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            payload["prompt"] = request.prompt if request.prompt is not None else self._counter.render_chat(request.messages or ())
        if request.conversation_id:
            payload["user"] = request.conversation_id
        if self.config.ignore_eos:
            payload["ignore_eos"] = True
        return payload

    async def send(self, request: BenchRequest, request_index: int, warmup: bool, stage_origin: float) -> RequestResult:
        """Send one request and time it; `stage_origin` is the stage's `time.perf_counter()` zero."""
        url = self.config.root_url + ENDPOINTS[self.config.endpoint]
        payload = self._payload(request)
        result = RequestResult(
            request_index=request_index, kind=request.kind, conversation_id=request.conversation_id,
            turn_index=request.turn_index, warmup=warmup, start_s=0.0,
            input_tokens_estimate=request.input_tokens, max_tokens=request.max_tokens,
        )
        start = time.perf_counter()
        result.start_s = start - stage_origin
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                await self._stream(url, payload, self._headers(request), start, result)
        except _StreamFailure as failure:
            result.error_kind, result.error_detail = failure.kind, failure.detail
        except TimeoutError:
            result.error_kind, result.error_detail = "timeout", f"no complete answer within {self.config.request_timeout_s:g}s"
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            result.error_kind, result.error_detail = "connection", f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientError as exc:
            result.error_kind, result.error_detail = "client_error", f"{type(exc).__name__}: {exc}"
        result.e2e_s = time.perf_counter() - start
        return result

    async def _stream(self, url: str, payload: dict[str, object], headers: dict[str, str],
                      start: float, result: RequestResult) -> None:
        async with self.session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                body = (await response.text(errors="replace"))[:300]
                raise _StreamFailure(f"http_{response.status}", body)
            content_type = response.headers.get("Content-Type", "")
            if "event-stream" not in content_type:
                body = (await response.text(errors="replace"))[:200]
                raise _StreamFailure("malformed_stream", f"server did not stream (Content-Type {content_type!r}): {body}")
            decoder = _SSEDecoder()
            last_token_at: float | None = None
            finished = done = False
            text_parts: list[str] = []
            async for chunk in response.content.iter_any():
                arrived = time.perf_counter()
                for data in decoder.feed(chunk):
                    if data.strip() == "[DONE]":
                        done = True
                        continue
                    has_token, finished_here = self._take_event(data, result, text_parts)
                    finished = finished or finished_here
                    if has_token:
                        if last_token_at is None:
                            result.ttft_s = arrived - start
                        else:
                            result.itl_s.append(arrived - last_token_at)
                        last_token_at = arrived
                        result.output_chunks += 1
            for data in decoder.close():
                if data.strip() == "[DONE]":
                    done = True
                else:
                    finished = self._take_event(data, result, text_parts)[1] or finished
            result.text = "".join(text_parts)
            if not (done or finished):
                raise _StreamFailure("malformed_stream", "stream ended with neither [DONE] nor a finish_reason")

    @staticmethod
    def _take_event(data: str, result: RequestResult, text_parts: list[str]) -> tuple[bool, bool]:
        """Apply one SSE data payload; returns (carried a token, carried a finish_reason)."""
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise _StreamFailure("malformed_stream", f"undecodable event {data[:120]!r}: {exc}") from exc
        if not isinstance(event, dict):
            raise _StreamFailure("malformed_stream", f"event is not an object: {data[:120]!r}")
        if "error" in event or event.get("object") == "error":
            raise _StreamFailure("stream_error", json.dumps(event.get("error", event))[:300])
        usage = event.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                result.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                result.output_tokens = usage["completion_tokens"]
        has_token = finished = False
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            finish = choice.get("finish_reason")
            if finish:
                finished = True
            delta = choice.get("delta")
            if isinstance(delta, dict):  # chat: content, or reasoning tokens of reasoning models
                content = delta.get("content")
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if content:
                    text_parts.append(content)
                opening = bool(delta.get("role")) and not content  # the role chunk
                has_token = has_token or bool(content) or bool(reasoning) or (
                    isinstance(content, str) and not opening and not finish)
            elif isinstance(choice.get("text"), str):
                text_parts.append(choice["text"])
                has_token = has_token or bool(choice["text"]) or not finish
        return has_token, finished


@dataclass(frozen=True)
class ServedModel:
    """A model card from /v1/models: its id and, where the card says (vLLM's and Tandem's do),
    the model's context length and the folder (or hub name) it was loaded from."""

    id: str
    max_model_len: int | None = None
    root: str | None = None


async def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0,
                         model: str | None = None) -> ServedModel:
    """The card of `model` (default: the first model listed) at /v1/models; a model the list
    does not name gets a card with its id only."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.get(root_url(base_url) + "/v1/models", headers=headers) as response:
            response.raise_for_status()
            listing = await response.json()
    cards = [card for card in listing.get("data") or [] if isinstance(card, dict) and "id" in card]
    if not cards:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    card = cards[0] if model is None else next((c for c in cards if str(c["id"]) == model), {"id": model})
    max_model_len = card.get("max_model_len")
    root = card.get("root")
    return ServedModel(str(card["id"]),
                       max_model_len if isinstance(max_model_len, int) and max_model_len > 0 else None,
                       root if isinstance(root, str) and root else None)
