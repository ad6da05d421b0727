"""The prefill call's keep-alives (`PrefillWorker.prefill_stream`, read by the decode side's
`workers.disagg._answer`): `PrefillAlive`s while the prefill works, then its result; a closed
stream cancels the prefill; a silent stream is given up after the liveness bound. The wrapper is
driven with a prefill of known duration in place of the engine (the real engine and transfer are
`test_stranded_blocks.py`'s)."""
from __future__ import annotations

import asyncio
import time

import pytest

from tandem.protocol.prefill import PrefillAlive, PrefillRequest, PrefillResult
from tandem.protocol.sampling_params import SamplingParams
from tandem.workers.disagg import DisaggConfig, _answer
from tandem.workers.prefill_worker import PrefillWorker


class TimedPrefill:
    """Stands in for the worker's `prefill`: answers after `seconds`, records a cancel."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cancelled = False

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return PrefillResult(request.transfer_id, first_token=7)


def request(keepalive_s: float | None) -> PrefillRequest:
    return PrefillRequest("t1", [1, 2, 3], SamplingParams(max_tokens=1), "tcp://127.0.0.1:1", [0], 0,
                          keepalive_s=keepalive_s)


def test_keep_alives_while_the_prefill_works_then_the_result():
    async def main():
        worker = TimedPrefill(0.5)
        return [item async for item in PrefillWorker.prefill_stream(worker, request(0.1))]

    items = asyncio.run(main())
    assert isinstance(items[-1], PrefillResult) and items[-1].first_token == 7
    alive = items[:-1]
    assert 2 <= len(alive) <= 5 and all(isinstance(a, PrefillAlive) and a.transfer_id == "t1" for a in alive)


def test_no_keep_alive_without_an_interval():
    async def main():
        return [item async for item in PrefillWorker.prefill_stream(TimedPrefill(0.2), request(None))]

    [only] = asyncio.run(main())
    assert isinstance(only, PrefillResult)


def test_closing_the_stream_cancels_the_prefill():
    async def main():
        worker = TimedPrefill(30)
        stream = PrefillWorker.prefill_stream(worker, request(0.05))
        assert isinstance(await stream.__anext__(), PrefillAlive)
        await stream.aclose()  # what Serve does when the decode side cancels the call
        return worker

    assert asyncio.run(main()).cancelled


def test_the_decode_side_waits_through_keep_alives_and_gives_up_on_silence():
    async def main():
        live = await _answer(PrefillWorker.prefill_stream(TimedPrefill(0.6), request(0.1)), liveness_s=0.3)
        assert live.first_token == 7  # longer than the bound, but never silent that long

        async def silent():
            await asyncio.sleep(30)
            yield None

        started = time.monotonic()
        with pytest.raises(TimeoutError, match="sent nothing for prefill_liveness_timeout_s=0.3s"):
            await _answer(silent(), liveness_s=0.3)
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0


def test_the_liveness_bound_must_be_positive():
    with pytest.raises(ValueError, match="timeouts must be > 0"):
        DisaggConfig(prefill_liveness_timeout_s=0)
