"""Test harness: one side of a disaggregated prefill as a real separate process, so the other
side (in the test's process) sees a real peer die (SIGKILL) or hang (SIGSTOP) at a chosen point
of a KV transfer.

- `PrefillProcess`: a `PrefillWorker` (outside Serve) whose `prefill_stream(PrefillRequest)` the
  test's `DecodeWorker` calls through `PrefillPool`, a stand-in for the prefill pool's Serve
  handle: each item of the call's stream (keep-alives, then the result) comes back over the pipe
  as the worker yields it, so a frozen process goes silent; a call in flight when the process
  dies raises Ray's `ActorDiedError`, as a Serve call to a dead replica does.
- `ReceiverProcess`: a decode worker's `KVReceiver` alone (its blocks are what the test's
  `PrefillWorker` sends to).

Once armed, each process stops at its failure point (it blocks there) and says so; the test
then kills or freezes it. The pipe between the test and its own child is trusted harness
plumbing; the two sides talk to each other only through kvtransfer and the stand-in handle."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

_CTX = None


def context():
    """forkserver with torch and the workers preloaded: each process starts in a second or two."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "zmq", "transformers", "tandem.workers.prefill_worker"])
    return _CTX


# ------------------------------------------------------------------------------ child sides
PREFILL_POINTS = ("before_begin", "mid_layers", "after_done")
RECEIVER_POINTS = ("mid_layers", "before_done")


def _prefill_main(conn, model: str, engine_kwargs: dict, transfer_kwargs: dict, point: str) -> None:
    from tandem.workers.prefill_worker import PrefillWorker

    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    worker = PrefillWorker(model, engine_kwargs, "cpu", transfer_kwargs)
    worker._ensure_publishing = lambda: None  # no Ray here: no metrics to export
    connector = worker._exporter  # the harness hooks the product's connector at its failure points
    armed = threading.Event()

    def stop_here(name: str) -> None:
        if armed.is_set() and name == point:
            send(("at", name))
            time.sleep(3600)  # the test kills or freezes this process now

    start_save, layer_computed, step_computed = connector.start_save, connector.layer_computed, connector.step_computed

    def hooked_start_save(seq) -> None:
        stop_here("before_begin")  # the decode side has registered its blocks; nothing sent
        start_save(seq)

    def hooked_layer_computed(layer: int) -> None:
        layer_computed(layer)
        if layer == 0:
            stop_here("mid_layers")  # layer 0 handed to the link thread, layer 1 never computed

    def hooked_step_computed() -> None:
        step_computed()
        stop_here("after_done")  # every layer handed over; the link thread gets the ack, no answer leaves

    connector.start_save, connector.layer_computed = hooked_start_save, hooked_layer_computed
    connector.step_computed = hooked_step_computed
    send(("ready", None))
    loop = asyncio.new_event_loop()

    def answer(request) -> None:
        async def relay() -> None:
            async for item in worker.prefill_stream(request):
                send(("item", request.transfer_id, item))

        try:
            asyncio.run_coroutine_threadsafe(relay(), loop).result()
            send(("end", request.transfer_id, None))
        except BaseException:  # noqa: BLE001 - reported to the test
            send(("exception", request.transfer_id, traceback.format_exc()))

    threading.Thread(target=loop.run_forever, daemon=True).start()
    while True:
        cmd, arg = conn.recv()
        if cmd == "arm":
            armed.set()
            send(("armed", None))
        elif cmd == "prefill":
            threading.Thread(target=answer, args=(arg,), daemon=True).start()


def _receiver_main(conn, shape, transfer_kwargs: dict, point: str) -> None:
    import torch

    from tandem.kvtransfer import KVReceiver, KVTransferConfig, TransferError

    receiver = KVReceiver(torch.zeros(shape), KVTransferConfig(**transfer_kwargs))
    armed = threading.Event()
    land = receiver._land  # the harness hooks the product's receiver where layers land

    def hooked_land(request, part, chunk, buf, stream) -> None:
        if armed.is_set():
            if point == "before_done" and chunk.layer_end == request.num_layers:
                conn.send(("at", point))  # every layer received, none of the last landed, no Done
                time.sleep(3600)
            land(request, part, chunk, buf, stream)
            if point == "mid_layers" and chunk.layer_end < request.num_layers:
                conn.send(("at", point))
                time.sleep(3600)
            return
        land(request, part, chunk, buf, stream)

    receiver._land = hooked_land
    handles = {}
    conn.send(("ready", receiver.address))
    while True:
        cmd, *args = conn.recv()
        if cmd == "arm":
            armed.set()
            conn.send(("armed", None))
        elif cmd == "expect":
            rid, dst, num_layers = args
            handles[rid] = receiver.expect(rid, dst, num_layers)
            conn.send(("ok", None))
        elif cmd == "wait":
            try:
                handles.pop(args[0]).wait(args[1])
                conn.send(("ok", None))
            except TransferError as error:
                conn.send(("error", str(error)))


# ----------------------------------------------------------------------------- parent sides
class _Child:
    def __init__(self, target, args) -> None:
        self._conn, child = context().Pipe()
        self.proc = context().Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.reached = threading.Event()  # the failure point, once armed
        self.frozen = False

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def close(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)


class ReceiverProcess(_Child):
    def __init__(self, shape, transfer_kwargs: dict, point: str) -> None:
        assert point in RECEIVER_POINTS + ("before_begin",)
        super().__init__(_receiver_main, (shape, transfer_kwargs, point))
        self.address = self._reply(120, "ready")

    def _reply(self, timeout: float, kind: str):
        while True:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the receiver process did not answer {kind!r} within {timeout}s")
            msg = self._conn.recv()
            if msg[0] == "at":
                self.reached.set()
                continue
            assert msg[0] == kind, msg
            return msg[1]

    def call(self, *cmd, timeout: float = 30):
        self._conn.send(cmd)
        return self._reply(timeout, "ok")

    def arm(self) -> None:
        self._conn.send(("arm",))
        self._reply(30, "armed")

    def wait_reached(self, timeout: float) -> None:
        """Reads the pipe until the process says it stopped at its failure point."""
        deadline = time.monotonic() + timeout
        while not self.reached.is_set():
            left = deadline - time.monotonic()
            assert left > 0, "the receiver never reached its failure point"
            if self._conn.poll(min(left, 0.1)):
                msg = self._conn.recv()
                assert msg[0] == "at", msg
                self.reached.set()


class PrefillProcess(_Child):
    """The prefill replica. `pool` is the stand-in Serve handle to hand a `DecodeWorker`."""

    def __init__(self, model: str, engine_kwargs: dict, transfer_kwargs: dict, point: str) -> None:
        assert point in PREFILL_POINTS
        super().__init__(_prefill_main, (model, engine_kwargs, transfer_kwargs, point))
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._replies: dict[str, object] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._ready.wait(120), "the prefill process did not start"

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):  # the process died: its calls fail as Serve's would
                break
            kind = msg[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "at":
                self.reached.set()
            elif kind in ("item", "end", "exception"):
                _, transfer_id, value = msg
                if kind == "exception":
                    value = RuntimeError(f"prefill process raised:\n{value}")
                self._deliver(transfer_id, _END if kind == "end" else value, last=kind != "item")
            else:
                with self._lock:
                    self._replies[kind] = msg[1]
        from ray.exceptions import ActorDiedError

        with self._lock:
            pending = list(self._pending)
        for transfer_id in pending:
            self._deliver(transfer_id, ActorDiedError(), last=True)

    def _deliver(self, transfer_id: str, item, last: bool) -> None:
        with self._lock:
            entry = self._pending.pop(transfer_id, None) if last else self._pending.get(transfer_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the test's loop is gone: nobody reads this call any more
            pass

    def call(self, request) -> "_Stream":
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            dead = not self._reader.is_alive()
            if not dead:
                self._pending[request.transfer_id] = (asyncio.get_running_loop(), queue)
        if dead:
            from ray.exceptions import ActorDiedError

            queue.put_nowait(ActorDiedError())
        else:
            self._conn.send(("prefill", request))
        return _Stream(queue)

    def arm(self) -> None:
        self._conn.send(("arm", None))
        deadline = time.monotonic() + 30
        while "armed" not in self._replies:
            assert time.monotonic() < deadline, "the prefill process did not arm"
            time.sleep(0.01)


_END = object()  # the call's stream ended


class _Stream:
    """What `handle.options(stream=True).prefill_stream.remote(request)` gives: an async iterator
    of the call's items, with `cancel()` (the child's prefill is not stopped: the stand-in only
    stops reading)."""

    def __init__(self, queue: asyncio.Queue) -> None:
        self._queue = queue

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    def cancel(self) -> None:
        pass


class PrefillPool:
    """A stand-in for the prefill pool's `DeploymentHandle`:
    `pool.options(stream=True).prefill_stream.remote(request)` goes to the current
    `PrefillProcess` (the test swaps it between cases)."""

    def __init__(self) -> None:
        self.process: PrefillProcess | None = None
        self.prefill_stream = self

    def options(self, stream: bool = False) -> "PrefillPool":
        assert stream, "the decode side streams its prefill calls"
        return self

    def remote(self, request) -> _Stream:
        return self.process.call(request)
