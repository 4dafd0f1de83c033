"""Measurement: times one case's implementations and a bandwidth probe in interleaved rounds.

Memory bandwidth on the benchmark machines wanders between levels over tens of seconds, so times taken at
different moments do not compare. Each round therefore times every implementation and the probe back to back,
in an order rotated from round to round, and every comparison is a ratio taken within one round; only the
spread of those ratios over the rounds is reported. Outside the rounds, one profiled step per implementation
counts its launches, and its optimizer state is weighed. Nothing here prints or writes: report.py does that.
"""

import contextlib
import gc
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import implementations
from .implementations import Case, Implementation
from .workloads import Workload

# The probe only needs to be far larger than any cache: at least 64 MB per buffer, beyond the L2 of any GPU
# and the last-level cache of most CPUs, even for a tiny workload; the cap keeps a 1B-param GPU workload
# from spending 8 GB on probe buffers beside several optimizers' worth of state.
PROBE_MIN_NUMEL = 2**24
PROBE_MAX_NUMEL = 2**28

# On CUDA a case whose tensors would fit in the L2 cache is stepped over several copies in rotation, enough
# to exceed the cache this many times, so that each step reads memory and not the cache.
L2_MULTIPLE = 4
MAX_INPUT_SETS = 16

# Progress is reported per unit of work: building an implementation, warming it up, one of its rounds.
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Contender:
    """Something timed in the rounds: an implementation's step or the probe. `variant` is "" for the case
    itself and the case's baseline label for an implementation's bare step; `held_bytes` are those of the
    tensors its pipeline keeps beside the optimizer's state."""
    name: str
    dtype: str
    numel: int
    bytes_per_param: int
    step: Callable[[], object] | None
    variant: str = ""
    optimizer: torch.optim.Optimizer | None = None
    held_bytes: int = 0
    status: str = "ok"
    note: str = ""
    round_ms: list[float] = field(default_factory=list)
    launches_per_step: int | None = None
    state_bytes_per_param: float | None = None

    @property
    def bytes_per_step(self) -> int:
        return self.numel * self.bytes_per_param

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})" if self.variant else self.name

    def drop(self, status: str, exc: Exception) -> None:
        """Takes the contender out of the measurement; releasing `step` lets its tensors be freed now."""
        self.status = status
        message = f"{type(exc).__name__}: {exc}" if status == "error" else str(exc)
        self.note = message.splitlines()[0] if message else type(exc).__name__
        self.step = None
        self.optimizer = None
        self.round_ms.clear()


@dataclass(frozen=True)
class Result:
    """One contender's statistics over the rounds; None where it failed or has nothing to compare with."""
    implementation: str
    variant: str
    status: str
    note: str
    dtype: str
    numel: int
    bytes_per_param: int
    launches_per_step: int | None = None
    state_bytes_per_param: float | None = None
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    floor_ms: float | None = None
    gbps: float | None = None
    frac_of_probe: float | None = None
    speedup_vs_fused_opt_median: float | None = None
    speedup_vs_fused_opt_min: float | None = None
    speedup_vs_fused_opt_max: float | None = None
    time_vs_baseline_median: float | None = None
    time_vs_baseline_min: float | None = None
    time_vs_baseline_max: float | None = None


def probe_numel(workload_numel: int) -> int:
    return min(max(workload_numel, PROBE_MIN_NUMEL), PROBE_MAX_NUMEL)


class Probe:
    """The bandwidth an in-place update can reach, timed in the same rounds as the optimizers.

    On CPU `a.add_(b)`: it reads a and b and writes a in place (12 B per fp32 element), as an optimizer
    updates its states; a copy into a separate buffer would pay a read-for-ownership of the destination and
    understate the ceiling. On CUDA a device-to-device copy (8 B per element), the figure GPU bandwidth is
    usually quoted in.
    """

    def __init__(self, numel: int, device: torch.device):
        self.numel = probe_numel(numel)
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


def launches_counted(device: torch.device) -> str:
    """What count_launches counts on the device, for the results' column label."""
    return "cuda kernels and copies" if device.type == "cuda" else "top-level cpu ops"


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native library logs each start and stop to file descriptor 2, over the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _is_top_level_op(event) -> bool:
    """An operator no other operator called; user annotations such as torch.optim's "Optimizer.step#..."
    are not operators."""
    if event.is_user_annotation:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if not parent.is_user_annotation:
            return False
        parent = parent.cpu_parent
    return True


def count_launches(step: Callable[[], object], device: torch.device) -> int | None:
    """Kernels and copies one step puts on a CUDA device, or on CPU the operators it dispatches at the top
    level (one fused op, or one per foreach call, or one per tensor and operation), from torch.profiler.

    None where the profiler sees nothing although the step ran: a library calling its native code past
    torch's dispatcher (DeepSpeed's CPUAdam), or a CUDA profiler without access to the device.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _native_stderr_silenced(), profile(activities=activities) as profiler:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = profiler.events()
    if cuda:
        return sum(1 for event in events if event.device_type == DeviceType.CUDA) or None
    return sum(1 for event in events if _is_top_level_op(event)) or None


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int, held_bytes: int = 0) -> float:
    """Bytes of every tensor in the optimizer's state (step counters included), plus `held_bytes` a pipeline
    keeps beside it, per parameter."""
    total = sum(stored_bytes(value) for state in optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor))
    return (total + held_bytes) / numel


def stored_bytes(tensor: torch.Tensor) -> int:
    """What a tensor keeps in memory: for a wrapper subclass (torchao's 8-bit states, whose nbytes are those
    of the float32 tensor it stands for), the tensors it wraps."""
    if hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.nbytes


def rotated(items: list, shift: int) -> list:
    """`items` starting at position `shift` (mod len): round r of A B C P runs B C P A when r = 1."""
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def input_set_count(device: torch.device, bytes_per_step: int) -> int:
    """How many copies of a case's tensors a contender steps through in turn (see L2_MULTIPLE)."""
    if device.type != "cuda" or bytes_per_step <= 0:
        return 1
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_MULTIPLE * l2_bytes / bytes_per_step)))


def _in_turn(steps: list[Callable[[], object]]) -> Callable[[], object]:
    if len(steps) == 1:
        return steps[0]
    turn = itertools.cycle(steps)
    return lambda: next(turn)()


def build_contenders(case: Case, workload: Workload, device: torch.device,
                     candidates: list[Implementation], seed: int,
                     progress: Callable[[str], None]) -> list[Contender]:
    """The case's implementations (each also as its bare step when the case has a baseline), each over its
    own copies of the same seeded params (and grads, where the step writes them), as many copies as
    input_set_count asks for."""
    sets = input_set_count(device, workload.numel * case.bytes_per_param)
    tensor_sets = [implementations.make_tensors(workload, case.torch_dtype, device, seed + index)
                   for index in range(sets)]
    contenders = []
    for candidate in candidates:
        for variant in case.variants:
            bare = variant != ""
            contender = Contender(candidate.name, case.dtype, workload.numel,
                                  candidate.bytes_per_param(case, bare=bare), step=None, variant=variant)
            progress(f"building {contender.label}")
            try:
                prepared = [implementations.prepare(candidate, case, params, grads, bare=bare)
                            for params, grads in tensor_sets]
                contender.step = _in_turn([p.step for p in prepared])
                contender.optimizer = prepared[0].optimizer
                contender.held_bytes = sum(tensor.nbytes for tensor in prepared[0].held)
            except implementations.Unsupported as exc:
                contender.drop("skipped", exc)
            except Exception as exc:
                contender.drop("error", exc)
            contenders.append(contender)
    return contenders


def warm_up(contenders: list[Contender], clock: Clock, warmup: int, device: torch.device,
            progress: Callable[[str], None], launches: bool = True) -> None:
    """Untimed steps, then (with `launches`) one profiled step that counts launches; the state is weighed
    after both, when every implementation has made its state."""
    for contender in contenders:
        if contender.status != "ok":
            continue
        progress(f"warming up {contender.label}")
        try:
            for _ in range(warmup):
                contender.step()
            clock.synchronize()
            if launches:
                contender.launches_per_step = count_launches(contender.step, device)
        except Exception as exc:
            contender.drop("error", exc)
            continue
        if contender.optimizer is not None:
            contender.state_bytes_per_param = state_bytes_per_param(contender.optimizer, contender.numel,
                                                                    contender.held_bytes)


def run_rounds(contenders: list[Contender], clock: Clock, rounds: int, steps: int,
               progress: Callable[[str], None]) -> None:
    """Records per round the median time of `steps` consecutive steps of every contender.

    A contender that raises is dropped from all rounds, so the survivors' round_ms stay aligned by round.
    """
    active = [c for c in contenders if c.status == "ok"]
    for round_index in range(rounds):
        for contender in rotated(active, round_index):
            if contender.status != "ok":
                continue
            progress(f"round {round_index + 1}/{rounds}: {contender.label}")
            try:
                contender.round_ms.append(statistics.median(clock.step_ms(contender.step, steps)))
            except Exception as exc:
                contender.drop("error", exc)


def _spread(ratios: list[float]) -> tuple[float | None, float | None, float | None]:
    """Median, min and max of per-round ratios; Nones when there are none."""
    if not ratios:
        return None, None, None
    return statistics.median(ratios), min(ratios), max(ratios)


def summarize(contenders: list[Contender], probe: Contender | None) -> list[Result]:
    """Statistics over rounds. GB/s comes from the median time; the floor (this contender's bytes at the
    probe's bandwidth), the fraction of the probe's bandwidth, the speed-up of fused_opt (this contender's
    time / fused_opt's time in the same variant) and the time against the baseline (this contender's time
    / its own bare step's time) are medians of per-round values. Without a probe (steps too small for
    their bytes to matter) there is no floor."""
    ok = [c for c in contenders if c.status == "ok"]
    references = {c.variant: c for c in ok if c.name == implementations.REFERENCE}
    baselines = {c.name: c for c in ok if c.variant}
    results = []
    for contender in contenders:
        identity = dict(implementation=contender.name, variant=contender.variant, status=contender.status,
                        note=contender.note, dtype=contender.dtype, numel=contender.numel,
                        bytes_per_param=contender.bytes_per_param, launches_per_step=contender.launches_per_step,
                        state_bytes_per_param=contender.state_bytes_per_param)
        if contender.status != "ok":
            results.append(Result(**identity))
            continue
        times = contender.round_ms
        ms_median = statistics.median(times)
        floor_ms = frac_of_probe = None
        if probe is not None and probe.status == "ok":
            floors = [probe_ms * contender.bytes_per_step / probe.bytes_per_step for probe_ms in probe.round_ms]
            floor_ms = statistics.median(floors)
            frac_of_probe = statistics.median(floor / ms for floor, ms in zip(floors, times))
        reference = references.get(contender.variant) if contender is not probe else None
        speedups = [] if reference is None else [ms / reference_ms
                                                 for ms, reference_ms in zip(times, reference.round_ms)]
        baseline = baselines.get(contender.name) if not contender.variant and contender is not probe else None
        against_baseline = [] if baseline is None else [ms / baseline_ms
                                                        for ms, baseline_ms in zip(times, baseline.round_ms)]
        speedup_median, speedup_min, speedup_max = _spread(speedups)
        baseline_median, baseline_min, baseline_max = _spread(against_baseline)
        results.append(Result(
            **identity,
            ms_median=ms_median, ms_min=min(times), ms_max=max(times), floor_ms=floor_ms,
            gbps=contender.bytes_per_step / ms_median / 1e6,
            frac_of_probe=frac_of_probe,
            speedup_vs_fused_opt_median=speedup_median, speedup_vs_fused_opt_min=speedup_min,
            speedup_vs_fused_opt_max=speedup_max,
            time_vs_baseline_median=baseline_median, time_vs_baseline_min=baseline_min,
            time_vs_baseline_max=baseline_max,
        ))
    return results


def case_units(contenders: int, rounds: int) -> int:
    """Units of progress a case reports: a build and a warm-up per contender (the probe aside), a warm-up of
    the probe, and one unit per contender per round."""
    return 2 * contenders + 1 + rounds * (contenders + 1)


def measure_case(case: Case, workload: Workload, device: torch.device, probe: Probe,
                 candidates: list[Implementation], *, rounds: int, steps: int, warmup: int, seed: int,
                 progress: ProgressCallback | None = None, launches: bool = True) -> list[Result]:
    """Builds the case's implementations, measures them with the probe, and frees them: only plain numbers
    leave this function, so the next case starts from the memory this one found. Without `launches` no
    step is profiled (the profiler takes seconds over a for-loop's ops on thousands of tensors).

    `progress(label, done, total)` is called before each unit of work (see case_units); units skipped
    because an implementation dropped out are not reported, so `done` may end below `total`.
    """
    total = case_units(len(candidates) * len(case.variants), rounds)
    done = itertools.count()

    def step_progress(label: str) -> None:
        if progress is not None:
            progress(label, next(done), total)

    contenders = build_contenders(case, workload, device, candidates, seed, step_progress)
    probe_contender = probe.contender()
    contenders.append(probe_contender)
    clock = Clock(device)
    warm_up(contenders, clock, warmup, device, step_progress, launches)
    run_rounds(contenders, clock, rounds, steps, step_progress)
    results = summarize(contenders, probe_contender)
    del contenders, probe_contender
    # torch.optim's for-loop optimizers sit in reference cycles, which only the collector frees.
    gc.collect()
    return results
