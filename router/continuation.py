"""Continuing a request whose engine replica died mid-stream, so its client never notices.

The ingress wraps each prompt's worker stream in a `ResumableStream` once its first delta has
arrived. The wrapper keeps what the client has been given of each output: its tokens, the
characters of its text, whether it finished. When the stream fails because its replica is gone
(the actor died or is unreachable: Ray's `RayActorError`, which a SIGKILL, a failed health check,
or a drain that ran out of time all end in), it sends each unfinished output to the pool again as
a continuation (`protocol.worker.Continuation`): the original prompt plus that output's tokens as
the prompt, the same sampling fields (max_tokens and min_tokens still count from the original
prompt; the engine replays a seeded generator's draws and the detokenizer's text). Serve routes
it to a live replica; the wrapper goes on yielding its deltas, rewritten so the client sees one
stream: each output's own index, the first attempt's prompt and cached-token counts, the whole
request's output tokens. Nothing already streamed is streamed again, and nothing is skipped.

A request with n > 1 outputs continues each unfinished output as its own request (n = 1, seed +
index, which is the generator the engine gives output `index`), merged back into one stream.

At most `max_migrations` continuations are sent per prompt; past that, or when no replica takes
the continuation, the wrapper raises the replica error, and the ingress reports it as before (an
SSE error event, or for a request nothing of which was sent yet, its own retry).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from tandem.protocol.worker import Continuation, OutputDelta, WorkerDelta, WorkerRequest

logger = logging.getLogger("ray.serve")

# Errors that mean "the replica serving this stream is gone", not "the request is bad": the
# actor died (ActorDiedError) or cannot be reached (ActorUnavailableError); both subclass this.
REPLICA_LOST = (RayActorError,)


@dataclass(frozen=True)
class MigrationPolicy:
    """How hard the ingress tries to keep a stream alive; one object per ingress."""

    max_migrations: int = 3
    """Continuations sent per prompt at most (0: a replica's death ends its streams)."""
    retry_delay_s: float = 0.2
    """Pause before sending a continuation again when the previous one failed before its first
    delta (Serve may not have dropped the dead replica from its routing yet)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_migrations, int) or self.max_migrations < 0:
            raise ValueError(f"max_migrations must be an integer >= 0, got {self.max_migrations!r}")
        if not self.retry_delay_s >= 0:
            raise ValueError(f"retry_delay_s must be >= 0, got {self.retry_delay_s!r}")


@dataclass
class _Output:
    """What the client has of one output."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    finished: bool = False


@dataclass(eq=False)
class _Leg:
    """One worker stream carrying some of the request's outputs: `indices[i]` is the request's
    index of the stream's output i."""

    stream: AsyncIterator[WorkerDelta]
    indices: list[int]
    started: bool = False  # its first delta arrived


class ResumableStream:
    """The worker deltas of one prompt, continued on another replica when its replica dies.
    An async iterator of `WorkerDelta` (after `first`, which the caller has already used) with
    the handle response's `cancel()`."""

    def __init__(self, submit: Callable[[WorkerRequest], AsyncIterator[WorkerDelta]], request: WorkerRequest,
                 first: WorkerDelta, stream: AsyncIterator[WorkerDelta], policy: MigrationPolicy,
                 on_migration: Callable[[], None] = lambda: None) -> None:
        """`submit(request)` sends a request to the pool (`handle.generate.remote`); `first` is
        the first delta of `stream`."""
        self._submit = submit
        self._request = request
        self._policy = policy
        self._on_migration = on_migration
        self._outputs = [_Output() for _ in range(request.n)]
        self._num_prompt_tokens = first.num_prompt_tokens
        self._num_cached_tokens = first.num_cached_tokens
        self._legs = [_Leg(stream, list(range(request.n)), started=True)]
        self._pending: dict[_Leg, asyncio.Future] = {}
        self._lost: BaseException | None = None  # the first replica error: raised when giving up
        self.migrations = 0
        self._observe(first, self._legs[0])

    def __aiter__(self) -> "ResumableStream":
        return self

    async def __anext__(self) -> WorkerDelta:
        while self._legs:
            leg, delta, error = await self._next_of_any()
            if error is None and delta is None:  # that leg ended
                self._legs.remove(leg)
                continue
            if error is not None:
                # A continuation no replica could take yet (all busy) is tried again too.
                if not (isinstance(error, REPLICA_LOST) or (self._lost and not leg.started
                                                            and isinstance(error, BackPressureError))):
                    raise error
                await self._migrate(leg, error)
                continue
            if delta.error is not None:  # a continuation refused: nothing ran; do not retry it
                raise RuntimeError(f"a continuation was refused: {delta.error}")
            leg.started = True
            return self._observe(delta, leg)
        raise StopAsyncIteration

    def cancel(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        for leg in self._legs:
            leg.stream.cancel()

    # ------------------------------------------------------------------ internals
    async def _next_of_any(self) -> tuple[_Leg, WorkerDelta | None, BaseException | None]:
        """The next delta of whichever leg has one (one leg: awaited directly, no task)."""
        if len(self._legs) == 1 and not self._pending:
            leg = self._legs[0]
            try:
                return leg, await leg.stream.__anext__(), None
            except StopAsyncIteration:
                return leg, None, None
            except Exception as error:  # noqa: BLE001 - sorted by the caller
                return leg, None, error
        for leg in self._legs:
            if leg not in self._pending:
                self._pending[leg] = asyncio.ensure_future(leg.stream.__anext__())
        done, _ = await asyncio.wait(self._pending.values(), return_when=asyncio.FIRST_COMPLETED)
        leg = next(leg for leg, future in self._pending.items() if future in done)
        future = self._pending.pop(leg)
        try:
            return leg, future.result(), None
        except StopAsyncIteration:
            return leg, None, None
        except Exception as error:  # noqa: BLE001
            return leg, None, error

    def _observe(self, delta: WorkerDelta, leg: _Leg) -> WorkerDelta:
        """Record what the client gets of `delta` and rewrite it in the request's terms."""
        if self.migrations:  # a continuation: its output 0 is the request's output leg.indices[0]
            delta.outputs = [dataclasses.replace(out, index=leg.indices[out.index]) for out in delta.outputs]
        else:  # the original stream: its counts are the request's
            self._num_cached_tokens = delta.num_cached_tokens
        for out in delta.outputs:
            record = self._outputs[out.index]
            record.token_ids += out.token_ids
            record.num_chars += len(out.text)
            record.finished = record.finished or out.finish_reason is not None
        delta.num_prompt_tokens = self._num_prompt_tokens
        delta.num_cached_tokens = self._num_cached_tokens
        delta.num_output_tokens = sum(len(o.token_ids) for o in self._outputs)
        delta.finished = all(o.finished for o in self._outputs)
        delta.request_id = self._request.request_id
        return delta

    async def _migrate(self, leg: _Leg, error: BaseException) -> None:
        """`leg`'s replica is gone: send its unfinished outputs elsewhere, or raise the first
        replica error."""
        self._lost = self._lost or error
        self._legs.remove(leg)
        leg.stream.cancel()
        indices = [i for i in leg.indices if not self._outputs[i].finished]
        if not indices:
            return
        if self.migrations >= self._policy.max_migrations:
            logger.warning("request %s lost its replica %d times; giving up (%r)", self._request.request_id,
                           self.migrations + 1, error)
            raise self._lost
        if not leg.started and self._policy.retry_delay_s:
            await asyncio.sleep(self._policy.retry_delay_s)
        self.migrations += 1
        self._on_migration()
        logger.warning("request %s lost its replica (%r); continuing %d output(s) elsewhere after %s tokens",
                       self._request.request_id, error, len(indices),
                       "/".join(str(len(self._outputs[i].token_ids)) for i in indices))
        for i in indices:
            request = self.continuation(i)
            self._legs.append(_Leg(self._submit(request), [i]))

    def continuation(self, index: int) -> WorkerRequest:
        """The request that continues output `index` from what the client has of it."""
        original, output = self._request, self._outputs[index]
        changes: dict = {"request_id": f"{original.request_id}.m{self.migrations}"}
        if original.n > 1:
            changes.update(request_id=f"{changes['request_id']}.{index}", n=1,
                           seed=None if original.seed is None else original.seed + index)
        if output.token_ids:
            changes.update(prompt_token_ids=list(original.prompt_token_ids) + output.token_ids,
                           continuation=Continuation(len(output.token_ids), output.num_chars))
        return dataclasses.replace(original, **changes)
