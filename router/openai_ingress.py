"""`OpenAIIngress`: the OpenAI-compatible HTTP API as a Ray Serve ingress (FastAPI).

Step 1 and the end of step 5 of DESIGN.md's request path: it checks the API key and its own
in-flight bound, validates the body (OpenAI-style JSON errors with the right 4xx), applies the
chat template, tokenizes, and calls the engine pool's `generate` through a streaming
`DeploymentHandle` with token ids (so the pool's `TandemRequestRouter` routes by prefix and
session). It turns the worker's deltas into a JSON reply or SSE chunks ending in
`data: [DONE]`. A client that goes away cancels the handle's stream, and the worker aborts the
engine request.

The handle is "the decode pool": in colocated mode the `LLMWorker` deployment; in
disaggregated mode the `DecodeWorker`, which calls the prefill pool itself. Either way it
takes a `WorkerRequest` and yields `WorkerDelta`s.
"""
# No `from __future__ import annotations`: FastAPI reads the route signatures of a Serve
# class-based ingress at run time, and string annotations there turn `Request` into a query field.
import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from tandem.router.continuation import MigrationPolicy, ResumableStream
from tandem.router.openai_metrics import get_stats_board, render_prometheus, replica_deployment
from tandem.router.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TopLogprob,
    Usage,
)
from tandem.router.prompt_tokenizer import THREAD_MIN_CHARS, PromptTokenizer
from tandem.router.stage_timing import IngressTrace, StageHistograms, route_stamps, timing_payload
from tandem.router.structured_output import StructuredOutputError, requested_structured_output
from tandem.router.tool_calls import (StreamedChoices, ToolCallError, ToolPlan, chat_message, chat_messages,
                                      plan_tools, template_tools, tool_call_format)
from tandem.protocol.sampling_params import StructuredOutput
from tandem.protocol.worker import TokenLogprob, WorkerDelta, WorkerRequest

logger = logging.getLogger("ray.serve")

REPLICA_HEADER = "x-tandem-replica"
SESSION_HEADER = "x-session-id"
HEALTH_PROBE_TIMEOUT_S = 1.0  # a /health before the engines are up asks the stats board this long at most


@dataclass(frozen=True)
class IngressConfig:
    """The ingress's one config object, built by `workers.app.build_app`."""

    model: str  # the model folder (tokenizer and chat template come from it)
    served_model_name: str
    max_model_len: int
    api_key: str | None = None
    max_in_flight: int = 256  # per ingress replica; more get 429
    max_n: int = 16
    max_prompts: int = 16  # prompts in one /v1/completions batch
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1
    # A request whose engine replica dies before any byte of the reply was sent is sent again
    # (Serve routes it to a live replica) this many times, then answered 503.
    replica_retries: int = 1
    # A stream whose engine replica dies after its first delta is continued on another replica
    # from the tokens already sent (router.continuation), at most this many times per prompt.
    max_migrations: int = 3
    # Chat prompts are tokenized piece by piece with an LRU of this many characters of text
    # (tandem.router.prompt_tokenizer: a follow-up turn tokenizes only its new messages); 0: off.
    tokenize_cache_chars: int = 64 << 20
    # The app's engine deployments; `/health` answers 503 until each has a replica whose engine
    # runs (it reports to the stats board), then 200.
    engine_deployments: tuple[str, ...] = ()


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        """OpenAI's error object, the one shape of every error reply and in-stream error: `code`
        is a string identifier or null (as OpenAI sends it), never the HTTP status."""
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


REPLICA_DIED = "replica_died"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


app = FastAPI(title="Tandem OpenAI-compatible API")


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error in the OpenAI ingress")
    return error_response(ApiError(500, f"internal error: {type(error).__name__}", "server_error"))


@dataclass
class _Choice:
    """One output being assembled: text, tokens, logprobs, and how it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Started:
    """A worker stream whose first delta has arrived (so the request was accepted)."""

    prompt_index: int
    first: WorkerDelta
    stream: AsyncIterator[WorkerDelta]


class _UsageTotals:
    """Token counts over a request's prompts: the latest delta of each prompt has its totals."""

    def __init__(self, num_prompts: int) -> None:
        self._prompt = [0] * num_prompts
        self._cached = [0] * num_prompts
        self._output = [0] * num_prompts

    def add(self, prompt_index: int, delta: WorkerDelta) -> None:
        self._prompt[prompt_index] = delta.num_prompt_tokens
        self._cached[prompt_index] = delta.num_cached_tokens
        self._output[prompt_index] = delta.num_output_tokens

    def usage(self) -> Usage:
        prompt, output = sum(self._prompt), sum(self._output)
        return Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached)))


async def _off_loop_if(long: bool, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, in a thread when `long`: rendering or tokenizing a long prompt on
    the event loop would stall every stream this replica serves (Serve runs them on one loop)."""
    return await asyncio.to_thread(fn, *args, **kwargs) if long else fn(*args, **kwargs)


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, decode_pool: DeploymentHandle, config: IngressConfig) -> None:
        from transformers import AutoTokenizer

        self._config = config
        self._pool = decode_pool.options(stream=True)
        self._tokenizer = AutoTokenizer.from_pretrained(config.model)
        self._prompt_tokenizer = PromptTokenizer(self._tokenizer, config.tokenize_cache_chars)
        self._tool_format = tool_call_format(self._tokenizer.chat_template)  # router/tool_calls.py
        self._vocab_size = len(self._tokenizer)
        self._model_names = {config.served_model_name, config.model}
        self._in_flight = 0
        self._counters: dict[str, float] = {"tandem_ingress_requests_total": 0, "tandem_ingress_rejected_total": 0,
                                            "tandem_ingress_client_errors_total": 0,
                                            "tandem_ingress_replica_retries_total": 0}
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = "default"
        self._app_name = app_name
        self._engines_ready = not config.engine_deployments
        self._board = get_stats_board(app_name)
        self._migration = MigrationPolicy(config.max_migrations)
        self._counters["tandem_ingress_migrations_total"] = 0
        self._stage_histograms = StageHistograms()
        self._route_stamps = route_stamps()

    # ----------------------------------------------------------------- routes
    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once every engine pool has a running engine; until then 503 at once (no waiting
        for an engine), saying which pools it waits for. Needs no API key."""
        waiting = await self._engines_starting()
        if not waiting:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "starting", "waiting_for": waiting,
                             "message": f"the engines are starting: no running replica of {', '.join(waiting)} yet"},
                            status_code=503, headers={"Retry-After": str(self._config.retry_after_s)})

    async def _engines_starting(self) -> list[str]:
        """The engine deployments none of whose replicas has reported to the stats board yet
        (a worker reports once its engine runs); [] from the first time all have (a latch:
        later, Serve replaces a replica that fails its health check)."""
        if self._engines_ready:
            return []
        try:
            snapshot = await asyncio.wait_for(self._board.snapshot.remote(), timeout=HEALTH_PROBE_TIMEOUT_S)
        except Exception:  # the board did not answer in time: not ready yet, and say so quickly
            snapshot = {}
        reporting = {deployment for app, deployment in map(replica_deployment, snapshot) if app == self._app_name}
        waiting = [name for name in self._config.engine_deployments if name not in reporting]
        self._engines_ready = not waiting
        return waiting

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        try:
            per_replica = await asyncio.wait_for(self._board.snapshot.remote(), timeout=5.0)
        except Exception as error:  # a view: serve the ingress's own numbers without it
            logger.warning("stats board did not answer: %r", error)
            per_replica = {}
        ingress = dict(self._counters, tandem_ingress_requests_in_flight=self._in_flight)
        return PlainTextResponse(render_prometheus(per_replica, self._config.served_model_name, ingress,
                                                   self._stage_histograms),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        card = ModelCard(id=self._config.served_model_name, root=self._config.model,
                         max_model_len=self._config.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, self._complete)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, self._chat)

    # --------------------------------------------------------- request intake
    async def _serve(self, request: Request, model_cls, handler) -> Response:
        trace = IngressTrace()
        self._counters["tandem_ingress_requests_total"] += 1
        try:
            self._authorize(request)
            body = await self._read_json(request, trace)
            try:
                parsed = model_cls.model_validate(body)
            except ValidationError as error:
                first = error.errors()[0]
                param = ".".join(str(part) for part in first["loc"]) or None
                raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
            trace.mark("parsed")
            self._check_model(parsed.model)
            if self._in_flight >= self._config.max_in_flight:
                self._counters["tandem_ingress_rejected_total"] += 1
                raise ApiError(429, f"the server has {self._in_flight} requests in flight; retry later",
                               "rate_limit_error", code="overloaded",
                               headers={"Retry-After": str(self._config.retry_after_s)})
        except ApiError as error:
            if 400 <= error.status < 500:
                self._counters["tandem_ingress_client_errors_total"] += 1
            return error_response(error)
        self._in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight -= 1

        try:
            response = await handler(parsed, request, release, trace)
        except ApiError as error:
            release()
            if 400 <= error.status < 500:
                self._counters["tandem_ingress_client_errors_total"] += 1
            return error_response(error)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):
            release()
        return response

    def _authorize(self, request: Request) -> None:
        expected = self._config.api_key
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")

    async def _read_json(self, request: Request, trace: IngressTrace) -> object:
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        trace.mark("body_read")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self._model_names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self._config.served_model_name!r}", "not_found_error", "model", "model_not_found")

    # ------------------------------------------------------ turning into work
    def _check_common(self, req: SamplingFields) -> None:
        if req.n > self._config.max_n:
            raise ApiError(400, f"n must be at most {self._config.max_n}, got {req.n}", param="n")
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.stop_token_ids and any(not 0 <= t < self._vocab_size for t in req.stop_token_ids):
            raise ApiError(400, "stop_token_ids must be token ids of this model", param="stop_token_ids")

    def _worker_request(self, req: SamplingFields, prompt_token_ids: list[int], max_tokens: int | None,
                        logprobs: int | None, session_id: str | None, prompt_param: str,
                        structured_output: StructuredOutput | None = None) -> WorkerRequest:
        max_model_len = self._config.max_model_len
        if not prompt_token_ids:
            raise ApiError(400, "the prompt is empty", param=prompt_param)
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self._vocab_size:  # min/max loop in C
            raise ApiError(400, f"prompt token ids must be in [0, {self._vocab_size})", param=prompt_param)
        if len(prompt_token_ids) >= max_model_len:
            raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                                f"has {len(prompt_token_ids)} tokens", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is not None and len(prompt_token_ids) + max_tokens > max_model_len:
            raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; you asked for "
                                f"{len(prompt_token_ids) + max_tokens} ({len(prompt_token_ids)} in the prompt, "
                                f"{max_tokens} in the completion)", param="max_tokens",
                           code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        worker_request = WorkerRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prompt_token_ids, session_id=session_id, n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0, seed=req.seed, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, structured_output=structured_output,
        )
        try:
            worker_request.sampling_params()  # the engine's own checks, here, as a 400
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return worker_request

    async def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return await _off_loop_if(len(text) >= THREAD_MIN_CHARS, self._tokenizer.encode, text,
                                      add_special_tokens=add_special_tokens)
        except (TypeError, ValueError):  # e.g. a lone surrogate, sent as "\ud800" in the JSON
            raise ApiError(400, "the text is not valid Unicode (lone surrogate?)", param=param) from None

    @staticmethod
    def _structured_output(req: SamplingFields) -> StructuredOutput | None:
        """The request's structured-output constraint (router/structured_output.py); 400 if bad."""
        try:
            return requested_structured_output(req)
        except StructuredOutputError as error:
            raise ApiError(400, str(error), param=error.param) from None

    def _tool_plan(self, req: ChatCompletionRequest) -> ToolPlan | None:
        try:
            return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self._tool_format)
        except ToolCallError as error:
            raise ApiError(400, str(error), param=error.param) from None

    @staticmethod
    def _session_id(req: SamplingFields, request: Request) -> str | None:
        return request.headers.get(SESSION_HEADER) or req.user

    async def _complete(self, req: CompletionRequest, request: Request, release, trace: IngressTrace) -> Response:
        self._check_common(req)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of must equal n (beam search is not supported)", param="best_of")
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [await self._encode(prompt, True, "prompt")]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [await self._encode(p, True, "prompt") for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        if not prompts:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompts) > self._config.max_prompts:
            raise ApiError(400, f"at most {self._config.max_prompts} prompts per request", param="prompt")
        if len(prompts) * req.n > self._config.max_n:
            raise ApiError(400, f"prompts × n must be at most {self._config.max_n}", param="n")
        trace.mark("tokenized")
        session_id = self._session_id(req, request)
        structured = self._structured_output(req)
        work = [self._worker_request(req, ids, req.max_tokens, req.logprobs, session_id, "prompt", structured)
                for ids in prompts]
        return await self._run(work, req, request, release, trace, chat=False, top_logprobs=req.logprobs)

    async def _chat(self, req: ChatCompletionRequest, request: Request, release, trace: IngressTrace) -> Response:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools = self._tool_plan(req)
        structured = self._structured_output(req)
        if tools is not None:
            if structured is not None:
                raise ApiError(400, "response_format and guided decoding cannot be combined with tools "
                                    "(unless tool_choice is none)", param="response_format")
            structured = tools.structural_tag()
        messages = chat_messages(req.messages, self._tool_format, tools)
        try:
            long = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)) >= THREAD_MIN_CHARS
            text = await _off_loop_if(long, self._tokenizer.apply_chat_template, messages,
                                      tools=template_tools(self._tool_format, tools),
                                      add_generation_prompt=req.add_generation_prompt, tokenize=False)
        except Exception as error:  # template errors are the request's fault (roles, order)
            raise ApiError(400, f"could not apply the chat template: {error}", param="messages") from None
        try:
            ids = await self._prompt_tokenizer.encode(text)
        except (TypeError, ValueError):  # e.g. a lone surrogate, sent as "\ud800" in the JSON
            raise ApiError(400, "the text is not valid Unicode (lone surrogate?)", param="messages") from None
        trace.mark("tokenized")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        work = [self._worker_request(req, ids, max_tokens, logprobs, self._session_id(req, request), "messages",
                                     structured)]
        return await self._run(work, req, request, release, trace, chat=True, top_logprobs=logprobs, tools=tools)

    # ---------------------------------------------------------------- running
    async def _start(self, work: list[WorkerRequest], trace: IngressTrace) -> list[_Started]:
        """Send every prompt and wait for each first delta: refused input raises a 400 here,
        before any byte of the reply is sent. The trace follows the first prompt."""
        trace.mark("dispatched")
        streams = [self._pool.generate.remote(w) for w in work]

        async def first(i: int) -> _Started:
            delta = await streams[i].__anext__()
            if i == 0:
                trace.mark("first_delta")
                trace.add_route(self._route_stamps.take(work[0].request_id))
                trace.add_worker(delta.timing, delta.replica_id)
            return _Started(i, delta, streams[i])

        try:
            started = await asyncio.gather(*(first(i) for i in range(len(streams))))
        except BaseException as error:
            for stream in streams:
                stream.cancel()
            if isinstance(error, BackPressureError):
                raise ApiError(503, "the engine pool is overloaded; retry later", "server_error", code="overloaded",
                               headers={"Retry-After": str(self._config.retry_after_s)}) from None
            if isinstance(error, DeploymentUnavailableError):
                raise ApiError(503, "the engine pool is unavailable", "server_error", code="unavailable") from None
            if isinstance(error, RayActorError):
                raise self._replica_died() from None
            raise
        refused = next((s.first.error for s in started if s.first.error), None)
        if refused is not None:
            for stream in streams:
                stream.cancel()
            raise ApiError(400, refused)
        return [_Started(s.prompt_index, s.first, self._resumable(work[s.prompt_index], s)) for s in started]

    def _resumable(self, request: WorkerRequest, started: _Started) -> ResumableStream:
        """The prompt's stream, continued on another replica if its replica dies (router.continuation)."""
        def migrated() -> None:
            self._counters["tandem_ingress_migrations_total"] += 1

        return ResumableStream(self._pool.generate.remote, request, started.first, started.stream, self._migration,
                               migrated)

    def _replica_died(self) -> ApiError:
        return ApiError(503, "the engine replica serving this request died; retry the request", "server_error",
                        code=REPLICA_DIED, headers={"Retry-After": str(self._config.retry_after_s)})

    async def _deltas(self, started: list[_Started]) -> AsyncIterator[tuple[int, WorkerDelta]]:
        """(prompt index, delta) from every stream, first deltas first, then as they come."""
        for s in started:
            yield s.prompt_index, s.first
        live = [s for s in started if not s.first.finished]
        if len(live) == 1:
            async for delta in live[0].stream:
                yield live[0].prompt_index, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(s: _Started) -> None:
            try:
                async for delta in s.stream:
                    await queue.put((s.prompt_index, delta))
                await queue.put((s.prompt_index, None))
            except BaseException as error:
                await queue.put((s.prompt_index, error))

        tasks = [asyncio.create_task(pump(s)) for s in live]
        try:
            remaining = len(live)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _run(self, work: list[WorkerRequest], req: SamplingFields, request: Request, release,
                   trace: IngressTrace, *, chat: bool, top_logprobs: int | None, tools: ToolPlan | None = None) -> Response:
        for attempt in range(self._config.replica_retries + 1):
            try:
                return await self._run_once(work, req, release, trace, chat=chat, top_logprobs=top_logprobs,
                                            tools=tools)
            except ApiError as error:
                if error.code != REPLICA_DIED or attempt == self._config.replica_retries:
                    raise
                logger.warning("an engine replica died under a request; sending it again")
                self._counters["tandem_ingress_replica_retries_total"] += 1
                work = [dataclasses.replace(w, request_id=uuid.uuid4().hex) for w in work]
        raise AssertionError("unreachable")

    async def _run_once(self, work: list[WorkerRequest], req: SamplingFields, release, trace: IngressTrace, *,
                        chat: bool, top_logprobs: int | None, tools: ToolPlan | None = None) -> Response:
        started = await self._start(work, trace)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        replicas = ",".join(dict.fromkeys(s.first.replica_id for s in started))
        headers = {REPLICA_HEADER: replicas, "x-request-id": response_id}
        n = req.n
        model = self._config.served_model_name
        if req.stream:
            body = self._sse(started, response_id, model, n, chat, top_logprobs,
                             bool(req.stream_options and req.stream_options.include_usage), release,
                             trace, req.tandem_timing, tools)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)

        choices = [_Choice() for _ in range(len(work) * n)]
        usage = _UsageTotals(len(work))
        finished = False
        try:
            async for prompt_index, delta in self._deltas(started):
                usage.add(prompt_index, delta)
                for out in delta.outputs:
                    choice = choices[prompt_index * n + out.index]
                    choice.text += out.text
                    choice.token_ids += out.token_ids
                    choice.logprobs += out.logprobs or []
                    if out.finish_reason is not None:
                        choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
            finished = True
        except RayActorError:  # nothing has been sent yet: `_run` may send the request again
            raise self._replica_died() from None
        finally:
            if not finished:  # the client left (handler cancelled) or a worker failed
                for s in started:
                    s.stream.cancel()
        if chat:
            messages = [chat_message(c.text, c.finish_reason, tools) for c in choices]  # (message, finish reason)
            body = ChatCompletionResponse(id=response_id, model=model, usage=usage.usage(), choices=[
                ChatChoice(index=i, message=message, finish_reason=finish_reason, stop_reason=c.stop_reason,
                           logprobs=self._chat_logprobs(c.logprobs) if top_logprobs is not None else None)
                for i, (c, (message, finish_reason)) in enumerate(zip(choices, messages))])
        else:
            body = CompletionResponse(id=response_id, model=model, usage=usage.usage(), choices=[
                CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                 logprobs=self._completion_logprobs(c.logprobs, 0) if top_logprobs is not None else None)
                for i, c in enumerate(choices)])
        payload = body.model_dump()
        timing = self._first_token_sent(trace, req.tandem_timing)
        if timing is not None:
            payload["tandem_timing"] = timing
        return JSONResponse(payload, headers=headers)

    def _first_token_sent(self, trace: IngressTrace, want_timing: bool) -> dict | None:
        """Stamp the first token leaving, record the request's stages; the reply's
        `tandem_timing` when it asked for it."""
        trace.mark("first_token_sent")
        self._stage_histograms.observe(trace.intervals_ms())
        return timing_payload(trace) if want_timing else None

    async def _sse(self, started: list[_Started], response_id: str, model: str, n: int, chat: bool,
                   top_logprobs: int | None, include_usage: bool, release, trace: IngressTrace,
                   want_timing: bool, tools: ToolPlan | None = None) -> AsyncIterator[str]:
        created = int(time.time())
        streamed = StreamedChoices(tools, len(started) * n)  # content, or content and tool-call deltas
        sent_token = False
        usage = _UsageTotals(len(started))
        text_offsets = [0] * (len(started) * n)
        finished = False
        # SSE lines held back to leave with the next ones: the same bytes in fewer HTTP body
        # messages, each of which is one more Serve message to the proxy (the role chunk rides
        # with the first token's).
        pending = ""
        try:
            if chat:
                role = ChatCompletionChunk(id=response_id, created=created, model=model, choices=[
                    ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                    for i in range(len(started) * n)])
                pending = _sse_line(role.model_dump())
            async for prompt_index, delta in self._deltas(started):
                usage.add(prompt_index, delta)
                lines = [pending] if pending else []
                for out in delta.outputs:
                    if not out.token_ids and not out.text and out.finish_reason is None:
                        continue
                    index = prompt_index * n + out.index
                    want_logprobs = top_logprobs is not None
                    if chat:
                        delta_body, finish_reason = streamed.delta(index, out.text, out.finish_reason)
                        chunk = ChatCompletionChunk(id=response_id, created=created, model=model, choices=[
                            ChatChunkChoice(index=index, delta=delta_body, finish_reason=finish_reason,
                                            logprobs=self._chat_logprobs(out.logprobs or []) if want_logprobs else None)])
                    else:
                        chunk = CompletionResponse(id=response_id, created=created, model=model, choices=[
                            CompletionChoice(index=index, text=out.text, finish_reason=out.finish_reason,
                                             stop_reason=out.stop_reason,
                                             logprobs=self._completion_logprobs(out.logprobs or [], text_offsets[index])
                                             if want_logprobs else None)])
                        text_offsets[index] += len(out.text)
                    if not sent_token:
                        sent_token = True
                        payload = chunk.model_dump()
                        timing = self._first_token_sent(trace, want_timing)
                        if timing is not None:
                            payload["tandem_timing"] = timing
                        lines.append(_sse_line(payload))
                    else:  # pydantic-core writes the JSON itself: a third of dump + json.dumps
                        lines.append(f"data: {chunk.model_dump_json()}\n\n")
                if len(lines) > bool(pending):
                    pending = ""
                    yield "".join(lines)
            if include_usage:
                cls = ChatCompletionChunk if chat else CompletionResponse
                pending += _sse_line(cls(id=response_id, created=created, model=model, choices=[],
                                         usage=usage.usage()).model_dump())
            yield pending + "data: [DONE]\n\n"
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except RayActorError:  # headers are sent: report in the stream; the client retries
            logger.warning("stream %s lost its engine replica", response_id)
            yield pending + _sse_line(self._replica_died().body().model_dump())
        except Exception as error:  # headers are sent: report in the stream, as vLLM does
            logger.exception("stream %s failed", response_id)
            failed = ApiError(500, f"internal error: {type(error).__name__}", "server_error")
            yield pending + _sse_line(failed.body().model_dump())
        finally:
            if not finished:  # client disconnect: stop the engine work now
                for s in started:
                    s.stream.cancel()
            release()

    # --------------------------------------------------------------- logprobs
    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for entry in entries:
            token = self._token_text(entry.token_id)
            content.append(ChatTokenLogprob(
                token=token, logprob=entry.logprob, bytes=list(token.encode("utf-8")),
                top_logprobs=[TopLogprob(token=(t := self._token_text(tid)), logprob=lp, bytes=list(t.encode("utf-8")))
                              for tid, lp in entry.top]))
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for entry in entries:
            token = self._token_text(entry.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({self._token_text(tid): lp for tid, lp in entry.top})
            result.text_offset.append(offset)
            offset += len(token)
        return result
