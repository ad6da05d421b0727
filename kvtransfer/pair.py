"""One sender↔receiver pair's communicator, made without a global torch.distributed world.

Both sides build `ProcessGroup{Gloo,NCCL}(PrefixStore(f"pair/{sender}-{receiver}/{epoch}",
store), rank, 2, timeout)` over the receiver's TCPStore: sender is rank 0, receiver rank 1. A
broken pair is aborted and the next use makes a new one under epoch + 1; other pairs never see it.
Also here: waiting on a posted op with a deadline, and the wake-up mailbox the I/O threads poll.
"""
from __future__ import annotations

import os
import queue
import time
from datetime import timedelta
from typing import Callable

import torch
from torch.distributed import PrefixStore, Store

SENDER_RANK = 0
RECEIVER_RANK = 1


def pair_prefix(sender_id: str, receiver_id: str, epoch: int) -> str:
    return f"pair/{sender_id}-{receiver_id}/{epoch}"


def make_pair_group(store: Store, prefix: str, rank: int, device: torch.device,
                    timeout_s: float):
    """Blocks until the other side joins (or the store times out)."""
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        # Our own deadline (`wait_work`) fires first and aborts the group; NCCL's watchdog
        # timeout is kept well above it so it never takes the process down first.
        return ProcessGroupNCCL(PrefixStore(prefix, store), rank, 2, timedelta(seconds=3 * timeout_s))
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(PrefixStore(prefix, store), rank, 2, timedelta(seconds=timeout_s))


def abort_group(group) -> None:
    if group is None:
        return
    for name in ("abort", "_abort", "shutdown"):
        method = getattr(group, name, None)
        if method is None:
            continue
        try:
            method()
        except Exception:  # already broken; nothing else to release
            pass
        return


def wait_work(work, deadline: float, is_cuda: bool,
              on_idle: Callable[[], None] | None = None) -> None:
    """Completes a posted send/recv or raises (TimeoutError at `deadline`, time.monotonic).

    Gloo's p2p work only completes inside `wait`, so it gets a blocking wait with the time left
    (a timed-out gloo wait closes the pair, which is what we want then). NCCL work is polled, so
    the I/O thread keeps serving its socket (`on_idle`) and our deadline, not NCCL's watchdog,
    decides; `wait()` then orders the current stream after the op."""
    if not is_cuda:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("send/recv did not complete in time")
        work.wait(timedelta(seconds=left))
        return
    pause = 0.0
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError("send/recv did not complete in time")
        if on_idle is not None:
            on_idle()
        time.sleep(pause)
        pause = min(0.001, pause + 0.00005)
    work.wait()


class Mailbox:
    """A queue another thread can post to, with a pipe fd a zmq.Poller can wait on."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    @property
    def fd(self) -> int:
        return self._read_fd

    def put(self, item) -> None:
        self._items.put(item)
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):  # pipe full (reader is behind) or closed
            pass

    def drain(self) -> list:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
