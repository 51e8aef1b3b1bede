"""Process-level state: the device and threads, data-parallel rank/world (from torchrun / deepspeed env
vars), metric reduction across ranks, and RNG state capture for exact resume."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from klbench.errors import KlbenchError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KlbenchError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    return torch.device(name)


def set_threads(n: int | None) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)


_EARLIER_PEAK = 0  # the peak resident memory before the current window (bytes)


def _high_water_mark() -> int | None:
    """The kernel's peak resident memory of this process since the last reset (Linux), bytes."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory over its whole life so far, bytes."""
    hwm = _high_water_mark()
    if hwm is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
    return max(_EARLIER_PEAK, hwm)


def start_memory_window() -> None:
    """Start a window for `window_peak_rss_bytes` (on Linux the kernel's high-water mark is reset;
    where it cannot be, windows report the lifetime peak)."""
    global _EARLIER_PEAK
    _EARLIER_PEAK = peak_rss_bytes()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def window_peak_rss_bytes() -> int:
    """Peak resident memory since `start_memory_window()`, bytes."""
    hwm = _high_water_mark()
    return peak_rss_bytes() if hwm is None else hwm


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global list (its length must divide by `world`)."""
        if self.world == 1:
            return items
        if len(items) % self.world:
            raise ValueError(f"{len(items)} prompts per step do not split over {self.world} processes")
        per = len(items) // self.world
        return items[self.rank * per : (self.rank + 1) * per]

    def _reduce(self, x, op) -> float:
        v = float(x.item() if torch.is_tensor(x) else x)
        if self.world == 1:
            return v
        import torch.distributed as dist

        t = torch.tensor([v], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _comm_device(self):
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def mean(self, x) -> float:
        import torch.distributed as dist

        return self._reduce(x, dist.ReduceOp.SUM if self.world > 1 else None) / self.world

    def sum(self, x) -> float:
        import torch.distributed as dist

        return self._reduce(x, dist.ReduceOp.SUM if self.world > 1 else None)

    def max(self, x) -> float:
        import torch.distributed as dist

        return self._reduce(x, dist.ReduceOp.MAX if self.world > 1 else None)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def single_process() -> Dist:
    return Dist()


def from_env() -> Dist:
    """Join the process group a launcher (torchrun, deepspeed) set up through env vars."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
