"""The GPU benchmark's measuring helpers: device synchronisation, freeing memory and reading its peak, the
median, and :class:`Probe` (per-step wall-clock stamps, losses and one step's counted FLOPs).

A training run is ``warmup`` untimed steps, ``steps`` timed steps (wall clock from the end of the last
warm-up step to the end of the last timed step, the device synchronised), then one more step under
``torch.utils.flop_counter.FlopCounterMode`` to count its FLOPs. Peak memory is
``torch.cuda.max_memory_allocated`` (None on the CPU).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any


def sync(device: Any) -> None:
    """Wait for the device (CUDA) to finish its queued work; nothing on the CPU."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def free_memory(device: Any) -> None:
    """Drop garbage and the CUDA cache, then start a fresh peak-memory window."""
    import torch

    gc.collect()
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: Any) -> int | None:
    """The peak CUDA memory allocated since the last :func:`free_memory` (None on the CPU)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class Probe:
    """Called after every optimizer step (caspec's ``progress`` callback, or by the reference loop):
    synchronises the device, stamps the time and the loss, and counts the FLOPs of step ``flop_step``
    (entering ``FlopCounterMode`` after step ``flop_step - 1``, leaving it after ``flop_step``)."""

    def __init__(self, device: Any, flop_step: int) -> None:
        self.device, self.flop_step = device, flop_step
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.phases: list[int] = []
        self.flops: int | None = None
        self._fc: Any = None

    def __call__(self, done: int, _total: int, info: dict[str, Any]) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._fc is not None and done == self.flop_step:
            self._fc.__exit__(None, None, None)
            self.flops = int(self._fc.get_total_flops())
            self._fc = None
        self.stamps.append(now)
        self.losses.append(float(info["loss"]))
        self.phases.append(int(info.get("phase", 0)))
        if done == self.flop_step - 1:
            from torch.utils.flop_counter import FlopCounterMode

            self._fc = FlopCounterMode(display=False)
            self._fc.__enter__()

    def close(self) -> None:
        if self._fc is not None:
            self._fc.__exit__(None, None, None)
            self._fc = None

    def summary(self, batch: int, warmup: int, steps: int) -> dict[str, Any]:
        if len(self.stamps) < warmup + steps:
            raise RuntimeError(f"only {len(self.stamps)} steps ran, {warmup + steps} needed")
        seconds = self.stamps[warmup + steps - 1] - self.stamps[warmup - 1]
        if seconds <= 0:
            raise RuntimeError("the timed steps took no time")
        step_s = seconds / steps
        out: dict[str, Any] = {
            "timed_steps": steps,
            "timed_s": seconds,
            "step_ms": 1000.0 * step_s,
            "samples_per_s": batch * steps / seconds,
            "losses": list(self.losses),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "loss_mean": sum(self.losses) / len(self.losses),
            "flops_per_step": self.flops,
            "gflop_per_sample": None if self.flops is None else self.flops / batch / 1e9,
            "effective_tflops": None if self.flops is None else self.flops / step_s / 1e12,
        }
        return out
