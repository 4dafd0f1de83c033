"""Measurement: times one case's implementations and a bandwidth probe in interleaved rounds.

Memory bandwidth on the benchmark machines wanders between levels over tens of seconds, so times taken at
different moments do not compare. Each round therefore times every implementation and the probe back to back,
in an order rotated from round to round, and every comparison is a ratio taken within one round; only the
spread of those ratios over the rounds is reported. Nothing here prints or writes: report.py does that.
"""

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import implementations
from .implementations import Case
from .workloads import Workload

# The probe only needs to be far larger than any cache; the cap keeps a 1B-param GPU workload from spending
# 8 GB on probe buffers beside four optimizers' worth of state.
PROBE_MAX_NUMEL = 2**28


@dataclass
class Contender:
    """Something timed in the rounds: an optimizer's step or the probe."""
    name: str
    dtype: str
    numel: int
    bytes_per_param: int
    step: Callable[[], object] | None
    status: str = "ok"
    note: str = ""
    round_ms: list[float] = field(default_factory=list)

    @property
    def bytes_per_step(self) -> int:
        return self.numel * self.bytes_per_param

    def drop(self, status: str, exc: Exception) -> None:
        """Takes the contender out of the measurement; releasing `step` lets its tensors be freed now."""
        self.status = status
        message = f"{type(exc).__name__}: {exc}" if status == "error" else str(exc)
        self.note = message.splitlines()[0]
        self.step = None
        self.round_ms.clear()


@dataclass(frozen=True)
class Result:
    """One contender's statistics over the rounds; None where it failed or has nothing to compare with."""
    implementation: str
    status: str
    note: str
    dtype: str
    numel: int
    bytes_per_param: int
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    gbps: float | None = None
    frac_of_probe: float | None = None
    speedup_vs_fused_opt_median: float | None = None
    speedup_vs_fused_opt_min: float | None = None
    speedup_vs_fused_opt_max: float | None = None


class Probe:
    """The bandwidth an in-place update can reach, timed in the same rounds as the optimizers.

    On CPU `a.add_(b)`: it reads a and b and writes a in place (12 B per fp32 element), as an optimizer
    updates its states; a copy into a separate buffer would pay a read-for-ownership of the destination and
    understate the ceiling. On CUDA a device-to-device copy (8 B per element), the figure GPU bandwidth is
    usually quoted in.
    """

    def __init__(self, numel: int, device: torch.device):
        self.numel = min(numel, PROBE_MAX_NUMEL)
        a = torch.randn(self.numel, device=device)
        b = torch.randn(self.numel, device=device)
        # The closures hold the buffers, not self, so that dropping the Probe frees them without a cycle.
        if device.type == "cuda":
            self.name, self.bytes_per_element = "probe-d2d-copy", 8
            self._step = lambda: a.copy_(b)
        else:
            self.name, self.bytes_per_element = "probe-inplace-add", 12
            self._step = lambda: a.add_(b)

    def contender(self) -> Contender:
        """A fresh contender per case, so each case is compared with the probe's times from its own rounds."""
        return Contender(self.name, "fp32", self.numel, self.bytes_per_element, self._step)


class Clock:
    """Per-step wall time on CPU. On CUDA, events recorded on the stream around each step, so the host
    need not synchronize between steps; a step that is slow to launch still shows, as idle time between
    its events."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step_ms(self, step: Callable[[], object], steps: int) -> list[float]:
        if not self.cuda:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def rotated(items: list, shift: int) -> list:
    """`items` starting at position `shift` (mod len): round r of A B C P runs B C P A when r = 1."""
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def build_contenders(case: Case, workload: Workload, device: torch.device, fused_opt,
                     seed: int) -> list[Contender]:
    """The case's implementations, each over its own copy of the same seeded params and grads."""
    params, grads = implementations.make_tensors(workload, case.torch_dtype, device, seed)
    contenders = []
    for name in implementations.implementation_names(fused_opt):
        contender = Contender(name, case.dtype, workload.numel, case.bytes_per_param, step=None)
        try:
            contender.step = implementations.build(name, case, params, grads, fused_opt).step
        except implementations.Unsupported as exc:
            contender.drop("skipped", exc)
        except Exception as exc:
            contender.drop("error", exc)
        contenders.append(contender)
    return contenders


def run_rounds(contenders: list[Contender], clock: Clock, rounds: int, steps: int, warmup: int) -> None:
    """Warms every contender up, then records per round the median time of `steps` consecutive steps.

    A contender that raises is dropped from all rounds, so the survivors' round_ms stay aligned by round.
    """
    active = [c for c in contenders if c.status == "ok"]
    for contender in active:
        try:
            for _ in range(warmup):
                contender.step()
            clock.synchronize()
        except Exception as exc:
            contender.drop("error", exc)
    active = [c for c in active if c.status == "ok"]
    for round_index in range(rounds):
        for contender in rotated(active, round_index):
            if contender.status != "ok":
                continue
            try:
                contender.round_ms.append(statistics.median(clock.step_ms(contender.step, steps)))
            except Exception as exc:
                contender.drop("error", exc)


def summarize(contenders: list[Contender], probe: Contender) -> list[Result]:
    """Statistics over rounds. GB/s comes from the median time; the fraction of the probe's bandwidth and
    the speed-up of fused_opt (this contender's time / fused_opt's time) are medians of per-round ratios."""
    reference = next((c for c in contenders if c.name == implementations.REFERENCE and c.status == "ok"), None)
    results = []
    for contender in contenders:
        identity = dict(implementation=contender.name, status=contender.status, note=contender.note,
                        dtype=contender.dtype, numel=contender.numel, bytes_per_param=contender.bytes_per_param)
        if contender.status != "ok":
            results.append(Result(**identity))
            continue
        times = contender.round_ms
        ms_median = statistics.median(times)
        frac_of_probe = None
        if probe.status == "ok":
            frac_of_probe = statistics.median(
                (contender.bytes_per_step / ms) / (probe.bytes_per_step / probe_ms)
                for ms, probe_ms in zip(times, probe.round_ms))
        speedups = None
        if reference is not None and contender is not probe:
            speedups = [ms / reference_ms for ms, reference_ms in zip(times, reference.round_ms)]
        results.append(Result(
            **identity,
            ms_median=ms_median, ms_min=min(times), ms_max=max(times),
            gbps=contender.bytes_per_step / ms_median / 1e6,
            frac_of_probe=frac_of_probe,
            speedup_vs_fused_opt_median=statistics.median(speedups) if speedups else None,
            speedup_vs_fused_opt_min=min(speedups) if speedups else None,
            speedup_vs_fused_opt_max=max(speedups) if speedups else None,
        ))
    return results


def measure_case(case: Case, workload: Workload, device: torch.device, probe: Probe, fused_opt, *,
                 rounds: int, steps: int, warmup: int, seed: int) -> list[Result]:
    """Builds the case's implementations, measures them with the probe, and frees them: only plain numbers
    leave this function, so the next case starts from the memory this one found."""
    contenders = build_contenders(case, workload, device, fused_opt, seed)
    probe_contender = probe.contender()
    contenders.append(probe_contender)
    run_rounds(contenders, Clock(device), rounds, steps, warmup)
    results = summarize(contenders, probe_contender)
    del contenders, probe_contender
    # torch.optim's for-loop optimizers sit in reference cycles, which only the collector frees.
    gc.collect()
    return results
