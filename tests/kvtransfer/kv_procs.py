"""Test harness: KV sender/receiver workers as real separate processes, driven over a Pipe.

The Pipe between the test and its own child processes is trusted harness plumbing; the workers
talk to each other only through kvtransfer (zmq + msgpack control, gloo data)."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import time
import traceback

import torch

SHAPE = (4, 2, 24, 4, 2, 8)  # layers, K/V, blocks, block_size, kv heads, head_dim

_CTX = None


def context():
    """forkserver with torch preloaded: each worker starts in well under a second."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "zmq", "tandem.kvtransfer", "kv_procs"])
    return _CTX


def make_cache(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    """Random values bounded away from zero, so a missing copy can never look right."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=g) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (magnitude * sign).to(dtype)


def _serve(conn, role: str, seed: int, shape, dtype, config_kwargs: dict, kv_scales=()) -> None:
    from tandem.kvtransfer import KVReceiver, KVSender, KVTransferConfig, TransferError

    cache = make_cache(seed, shape, dtype)
    config = KVTransferConfig(**config_kwargs)
    worker = (KVReceiver if role == "receiver" else KVSender)(cache, config, kv_scales)
    conn.send(getattr(worker, "address", worker.worker_id))
    handles: dict = {}
    jobs: dict = {}
    lock = threading.Lock()

    def stream(rid, peer, src, dst, layer_groups, delay_s):
        t0 = time.monotonic()
        try:
            session = worker.begin(rid, peer, src, dst)
            for start, end in layer_groups:
                session.send_layers(start, end)
                if delay_s:
                    time.sleep(delay_s)
            session.finish()
            return ("ok", time.monotonic() - t0)
        except TransferError as exc:
            return ("error", str(exc), time.monotonic() - t0)

    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "stop":
                worker.close()
                conn.send("stopped")
                return
            if cmd == "expect":
                rid, dst, num_layers = args
                handles[rid] = worker.expect(rid, dst, num_layers)
                conn.send("ok")
            elif cmd == "abort":
                worker.abort(args[0])
                conn.send("ok")
            elif cmd == "wait":
                rid, timeout = args
                t0 = time.monotonic()
                try:
                    handles.pop(rid).wait(timeout)
                    conn.send(("ok", time.monotonic() - t0))
                except TransferError as exc:
                    conn.send(("error", str(exc), time.monotonic() - t0))
            elif cmd == "layers_received":
                conn.send(handles[args[0]].layers_received)
            elif cmd == "send":  # runs in the background; "join" collects the result
                rid = args[0]
                box: dict = {}

                def run(args=args, box=box):
                    box["result"] = stream(*args)
                thread = threading.Thread(target=run, daemon=True)
                with lock:
                    jobs[rid] = (thread, box)
                thread.start()
                conn.send("started")
            elif cmd == "join":
                thread, box = jobs.pop(args[0])
                thread.join(args[1])
                conn.send(box.get("result", ("error", "join timed out", args[1])))
            elif cmd == "cache":
                conn.send(cache.clone())
            elif cmd == "metrics":
                conn.send(dataclasses.asdict(worker.metrics()))
            else:
                conn.send(("bad-command", cmd))
        except Exception:
            conn.send(("exception", traceback.format_exc()))


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, role: str, seed: int, shape=SHAPE, dtype=torch.float32, kv_scales=(), **config_kwargs):
        self.role = role
        self.seed = seed
        self.shape = shape
        self.dtype = dtype
        self._conn, child = context().Pipe()
        self.proc = context().Process(target=_serve, args=(child, role, seed, shape, dtype, config_kwargs, kv_scales),
                                      daemon=True)
        self.proc.start()
        child.close()
        self.address = self._recv(60)

    def _recv(self, timeout: float):
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.role} worker did not answer within {timeout}s")
        reply = self._conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "exception":
            raise RuntimeError(f"{self.role} worker raised:\n{reply[1]}")
        return reply

    def call(self, *cmd, timeout: float = 30):
        self._conn.send(cmd)
        return self._recv(timeout)

    def initial_cache(self) -> torch.Tensor:
        return make_cache(self.seed, self.shape, self.dtype)

    def kill(self) -> None:
        os.kill(self.proc.pid, 9)
        self.proc.join(5)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", timeout=10)
            except Exception:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
