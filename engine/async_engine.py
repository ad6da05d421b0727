"""The engine behind a server: one background thread runs `LLMEngine.step()` in a loop while
callers on an asyncio loop submit requests and read their outputs as streams.

The engine is touched only by its thread; `generate()` validates the request in the caller
(so bad input raises there, at once; a structured-output request's grammar is compiled in a
worker thread) and hands it over through a queue. Leaving the stream
early (client gone, task cancelled) aborts the request and frees its blocks.
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import KVConnector
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.protocol.worker import Continuation, EngineStats
from tandem.engine.outputs import RequestOutput, merge_outputs
from tandem.protocol.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


@dataclass
class EngineTiming:
    """When the engine thread reached one request (`time.perf_counter()` of this process), for the
    serving path's stage timing (`router.stage_timing`). Written by the engine thread only."""

    added: float | None = None  # `add_validated` done: the scheduler has it
    first_step: float | None = None  # the first engine step that began after it was added
    first_output: float | None = None  # its first output was handed to the caller's stream


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    timing: EngineTiming | None = None

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class IdleNap:
    """How long an idle rank of an expert-parallel group waits for a command before its next
    (collective) step: 2 ms right after work, doubling per idle step up to 20 ms. A request that
    lands on an idle group then waits at most ~20 ms for the group's next step, and an idle group
    makes at most ~50 all-reduces a second instead of ~500 (by construction; not measured)."""

    FIRST_S = 0.002
    MAX_S = 0.02

    def __init__(self) -> None:
        self._current = self.FIRST_S

    def next(self) -> float:
        wait, self._current = self._current, min(self._current * 2, self.MAX_S)
        return wait

    def reset(self) -> None:
        self._current = self.FIRST_S


# Engines whose loop thread may still run. The thread is a daemon (a forgotten engine must not
# keep the process alive), and a daemon thread still inside a step while the interpreter tears
# down can crash the process at exit; `_shutdown_all` stops them first.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _shutdown_all() -> None:
    # A short wait each: a step ends in milliseconds, but an expert-parallel rank whose peers are
    # gone may sit in a collective until its group timeout, and exit must not wait for that.
    for llm in list(_LIVE):
        llm.shutdown(timeout_s=2.0)


atexit.register(_shutdown_all)  # atexit runs before the interpreter's finalization


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._unstepped: list[EngineTiming] = []  # added since the last step began (engine thread)
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @classmethod
    def from_config(cls, config: EngineConfig, kv_connector: KVConnector | None = None) -> "AsyncLLM":
        return cls(LLMEngine(config, kv_connector=kv_connector))

    @property
    def is_dead(self) -> bool:
        """True once the engine loop has died; health checks report it."""
        return self._error is not None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -------------------------------------------------------------- public
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str | None = None, timing: EngineTiming | None = None,
                       continuation: Continuation | None = None,
                       coalesce: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (each carries the text/tokens so far and the delta).
        `timing`, when given, is filled in by the engine thread before the first output arrives.
        `continuation`: the prompt ends with the request's earlier output (`LLMEngine.validate`).
        `coalesce`: when the reader is behind the engine, the outputs already waiting leave as
        one (`merge_outputs`: the deltas joined), so a slow reader pays its per-output cost
        once per read instead of once per engine step."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}")
        # `validate` is pure: safe outside the engine thread. Compiling a request's grammar takes
        # milliseconds (first time per schema): not on the caller's event loop either.
        if getattr(sampling_params, "structured_output", None) is not None:
            validated = await asyncio.to_thread(self.engine.validate, prompt, sampling_params, continuation)
        else:
            validated = self.engine.validate(prompt, sampling_params, continuation)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), timing)
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, validated))
        finished = False
        held: BaseException | None = None  # an error that arrived behind outputs being merged
        try:
            while True:
                item = held if held is not None else await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                while coalesce and not item.finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    if isinstance(following, BaseException):
                        held = following
                        break
                    item = merge_outputs(item, following)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its last step."""
        return self._stats

    def call_in_engine(self, fn, *args):
        """Run `fn(engine, *args)` on the engine thread at a step boundary; returns a future."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, args, fut))
        return fut

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=timeout_s)
        _LIVE.discard(self)

    # --------------------------------------------------------- engine thread
    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, request_id, validated = cmd
            stream = self._streams.get(request_id)
            if stream is None:
                return  # the caller already left
            try:
                self.engine.add_validated(request_id, validated)
            except ValueError as e:
                stream.put(e)
                return
            if stream.timing is not None:
                stream.timing.added = time.perf_counter()
                self._unstepped.append(stream.timing)
        elif kind == "abort":
            out = self.engine.abort_request(cmd[1])
            stream = self._streams.get(cmd[1])
            if out is not None and stream is not None:
                stream.put(out)
        elif kind == "call":
            _, fn, args, fut = cmd
            try:
                fut.set_result(fn(self.engine, *args))
            except Exception as e:  # reported to the caller, the loop goes on
                fut.set_exception(e)

    def _loop(self) -> None:
        try:
            # Expert parallel: the ranks of a group step together even when idle (each step
            # begins with a collective), so an idle rank only naps between steps, longer the
            # longer the group stays idle (IdleNap); back to the shortest once any rank has work.
            nap = IdleNap() if self.engine.collective else None
            while not self._stopped.is_set():
                idle = not self.engine.must_step()
                if nap is not None and not idle:
                    nap.reset()
                try:
                    # idle: sleep until a command arrives; busy: take what is queued, then step
                    if idle:
                        self._handle(self._commands.get(timeout=nap.next() if nap is not None else 0.5))
                    else:
                        self._handle(self._commands.get_nowait())
                    while True:
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if not self.engine.must_step() and not self.engine.collective:
                    self.engine.runner.idle()
                    self._stats = self.engine.stats()
                    continue
                if self._unstepped:
                    started = time.perf_counter()
                    for timing in self._unstepped:
                        timing.first_step = started
                    self._unstepped.clear()
                for out in self.engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        if stream.timing is not None and stream.timing.first_output is None:
                            stream.timing.first_output = time.perf_counter()
                        stream.put(out)
                self._stats = self.engine.stats()
        except BaseException as e:  # the engine is broken: fail every open stream loudly
            self._error = e
            for stream in list(self._streams.values()):
                stream.put(EngineDeadError(f"the engine loop died: {e!r}"))
            raise
