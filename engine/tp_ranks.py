"""The offline `LLM`'s tensor-parallel ranks 1..N-1, as child processes it starts, watches and
stops (rank 0 is the LLM's own process). Rank r runs on `cuda:r` (offset by the device's own
index) or on the CPU; the group rendezvous is a TCPStore on 127.0.0.1 hosted by rank 0, under a
prefix of its own, so several LLM objects (or replicas) coexist.

Children are daemonic (multiprocessing ends them when rank 0 exits), and a child whose rank 0
died (even by SIGKILL) sees the store or the group's connection close and exits.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.model_runner import load_hf_config
from tandem.engine.tensor_parallel import TensorParallelGroup, check_tensor_parallel
from tandem.engine.tp_runner import LockstepChannel, TensorParallelModelRunner, check_engine_config

SHUTDOWN_GRACE_S = 10.0


def rank_device(device: str, rank: int) -> str:
    """The device of rank `rank`: the CPU, or the rank-th GPU from the device's own index."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return device
    return f"cuda:{(dev.index or 0) + rank}"


def check_devices(device: str, world_size: int) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        first = dev.index or 0
        visible = torch.cuda.device_count()
        if first + world_size > visible:
            raise ValueError(f"tensor_parallel_size {world_size} from {device} needs GPUs {first}.."
                             f"{first + world_size - 1}, but {visible} are visible")


def _follower_main(config: EngineConfig, rank: int, world_size: int, port: int, prefix: str, timeout_s: float,
                   errors, follower_hook=None) -> None:
    try:
        from torch.distributed import TCPStore

        if config.device == "cpu":
            torch.set_num_threads(1)  # N ranks share the host's cores
        else:
            torch.cuda.set_device(config.device)  # Triton launches and graph captures use the current device
        store = TCPStore("127.0.0.1", port, world_size, False, timeout=timedelta(seconds=timeout_s))
        tp = TensorParallelGroup(store, rank, world_size, config.device, prefix, timeout_s)
        runner = TensorParallelModelRunner(config, load_hf_config(config.model), tp=tp)
        if follower_hook is not None:
            runner.hook = follower_hook(runner)
        runner.follow()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)


class TensorParallelRanks:
    """Starts ranks 1..N-1 and joins the group as rank 0; `runner_factory` builds rank 0's runner."""

    def __init__(self, config: EngineConfig, world_size: int, timeout_s: float = 300.0,
                 follower_hook: Callable | None = None) -> None:
        """`follower_hook(runner)`: each follower's `FollowerHook` (picklable: the followers are
        spawned), for a group whose engine moves KV (e.g. `workers.tp_disagg.prefill_follower`)."""
        from torch.distributed import TCPStore

        check_tensor_parallel(load_hf_config(config.model), world_size)
        check_engine_config(config)
        check_devices(config.device, world_size)
        self.world_size = world_size
        self.store = TCPStore("127.0.0.1", 0, world_size, True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        prefix = f"tp/{uuid.uuid4().hex[:12]}"
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        self.procs = [ctx.Process(target=_follower_main, daemon=True, name=f"tandem-tp-rank{rank}",
                                  args=(dataclasses.replace(config, device=rank_device(config.device, rank)),
                                        rank, world_size, self.store.port, prefix, timeout_s, self._errors,
                                        follower_hook))
                      for rank in range(1, world_size)]
        for proc in self.procs:
            proc.start()
        self.group = TensorParallelGroup(self.store, 0, world_size, rank_device(config.device, 0), prefix, timeout_s)
        self.channel = LockstepChannel(self.group)
        self.config = dataclasses.replace(config, device=rank_device(config.device, 0))

    @property
    def runner_factory(self):
        return functools.partial(TensorParallelModelRunner, tp=self.group, channel=self.channel)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def failure(self, error: BaseException) -> BaseException:
        """A clearer error than a broken collective's when a rank has died."""
        reports = []
        while not self._errors.empty():
            rank, tb = self._errors.get_nowait()
            reports.append(f"rank {rank}:\n{tb}")
        dead = [rank for rank, proc in enumerate(self.procs, start=1) if not proc.is_alive()]
        if not reports and not dead:
            return error
        detail = "\n".join(reports) or f"ranks {dead} exited"
        return RuntimeError(f"a tensor-parallel rank failed ({type(error).__name__}: {error}):\n{detail}")

    def shutdown(self) -> None:
        """Stop the followers (a STOP through the group, if it still works), then make sure."""
        try:
            if all(proc.is_alive() for proc in self.procs):
                self.channel.stop()
        except Exception:
            pass  # a broken group: the processes are ended below
        for proc in self.procs:
            proc.join(SHUTDOWN_GRACE_S)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(SHUTDOWN_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
