"""The emulation tier itself (tests/simt.py), and the launch machinery only it can show without a GPU.

* The tier reports what a GPU faults on or hangs at (divergent and partial barriers, shuffles with
  exited lanes, misaligned vector accesses, parameters beyond the parameter space) instead of
  running it quietly, and runs a correct kernel's every thread, shuffle and atomic.
* The emulated CUDA kernels give the CPU kernels' bits exactly (one FMA policy on both compilers:
  this machine's CPU kernels run their AVX2/AVX-512 clones, the emulation baseline x86-64), under
  every schedule: grids of 2 to 8 blocks, 1 to 3 worker threads, several seeds.
* A call is split over several launches when its groups or tensors outgrow one launch; a call that
  cannot launch one of its kernels changes nothing; an error that other code left in the CUDA
  runtime is not blamed on a step.
"""

from __future__ import annotations

import math

import pytest
import torch

import simt
from devices import requires_simt
from test_cuda import (
    CPU,
    OP_RICH,
    SHAPES,
    Target,
    call_op,
    copy_to,
    make_op_tensors,
    random_grads,
    scaled,
    scaling_args,
)

pytestmark = requires_simt

FAULTS = {
    "divergent_barrier": "divergent __syncthreads",
    "barrier_after_an_exit": "reached by 255 threads of 256; the others had exited",
    "shuffle_with_an_exited_lane": "names lane 5 of warp 0, which has exited",
    "misaligned_vector_load": "is not 16-byte aligned",
    "oversized_parameters": "more than the 32764 of the parameter space",
}
# cudaErrorMemoryAllocation, as a failed allocation of other code leaves it.
OTHER_CODES_ERROR = 2


@pytest.fixture
def emulation():
    with simt.emulated():
        yield simt.module()


def emulated_target() -> Target:
    return Target("simt", "cpu", simt.ops())


def fresh_buffer() -> torch.Tensor:
    return torch.zeros(4096, dtype=torch.int32)


@pytest.mark.parametrize("kernel, message", FAULTS.items(), ids=FAULTS.keys())
def test_a_faulty_kernel_fails_its_launch(emulation, kernel, message):
    error = emulation.run_fault_kernel(kernel, fresh_buffer())
    assert message in error, error


def test_a_correct_kernel_runs_every_thread_shuffle_and_atomic(emulation):
    buffer = fresh_buffer()
    assert emulation.run_fault_kernel("count_threads", buffer) == ""
    assert buffer[0].item() == 3 * 256
    buffer = fresh_buffer()
    assert emulation.run_fault_kernel("sum_lanes", buffer) == ""
    assert buffer[0].item() == 3 * sum(range(256))


def all_tensors(t) -> dict[str, list[torch.Tensor]]:
    return {**t.all_tensors(), "workspace": [t.workspace] if t.workspace is not None else []}


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_bitwise_equal(actual, expected, when: str) -> None:
    for kind, tensors in all_tensors(expected).items():
        for index, (a, e) in enumerate(zip(all_tensors(actual)[kind], tensors)):
            assert torch.equal(bytes_of(a), bytes_of(e)), f"{kind}[{index}], {when}"


MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("masters", [False, True], ids=["plain", "masters"])
@pytest.mark.parametrize("scaling", [None, "all"], ids=["unscaled", "scaled-clipped"])
@pytest.mark.parametrize("op", list(OP_RICH))
def test_emulated_kernels_give_the_cpu_kernels_bits_under_every_schedule(op, scaling, masters):
    dtypes = MIXED[:3] if masters else MIXED
    specs = [(shape, dtypes[i % len(dtypes)]) for i, shape in enumerate(SHAPES * 2)]
    cpu = make_op_tensors(op, OP_RICH[op], specs, seed=40, masters=masters)
    generator = torch.Generator().manual_seed(41)
    grads = [random_grads(cpu.params, generator) for _ in range(3)]
    expected = copy_to(cpu, CPU)
    for step_grads in grads:
        expected.grads = scaled(step_grads, scaling)
        call_op(op, expected, OP_RICH[op], **scaling_args(scaling, step_grads, "cpu"))
    for schedule in range(len(simt.SCHEDULES)):
        for workers in (1, 3):
            with simt.emulated(schedule, workers):
                emulated = copy_to(cpu, emulated_target())
                for step_grads in grads:
                    emulated.grads = scaled(step_grads, scaling)
                    call_op(op, emulated, OP_RICH[op], **scaling_args(scaling, step_grads, "cpu"))
            assert_bitwise_equal(emulated, expected, f"schedule {schedule}, {workers} workers")


def test_grad_norm_repeats_its_bits_for_a_given_grid(emulation):
    """The grid decides the order of the sums; block and thread orders must not."""
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (70001, 5, 33)]
    ops = simt.ops()
    norms = []
    for seed in range(4):
        emulation.configure(device=6, workers=2, seed=seed)
        norm, found_inf = torch.zeros(()), torch.zeros(())
        workspace = torch.zeros(4096)
        ops.grad_norm_(grads, norm, found_inf, workspace)
        norms.append(norm.item())
        # The arrival counter after the per-block partials (launch.h), rewound for the next call.
        assert found_inf.item() == 0.0 and workspace[4000].view(torch.int32).item() == 0
    assert len(set(norms)) == 1
    exact = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    assert abs(norms[0] - exact) <= 2e-7 * exact


def launches_of(emulation, fn) -> list[tuple[str, int, int]]:
    emulation.take_launch_log()
    fn()
    return emulation.take_launch_log()


def test_forty_groups_take_three_launches_of_sixteen_groups_at_most(emulation):
    options = OP_RICH["adam"]  # decoupled decay: groups with and without decay share launches
    cpu = make_op_tensors("adam", options, [((5 + g,), torch.float32) for g in range(40)], seed=42)
    emulated = copy_to(cpu, emulated_target())
    groups = [(1, {"lr": 0.01 * (1 + g % 3), "weight_decay": 0.1 * (g % 2)}) for g in range(40)]
    cpu.grads = random_grads(cpu.params, torch.Generator().manual_seed(43))
    emulated.grads = [g.clone() for g in cpu.grads]
    launches = launches_of(emulation, lambda: call_op("adam", emulated, options, groups=groups))
    call_op("adam", cpu, options, groups=groups)
    assert [simt.kernel_name(launch) for launch in launches] == ["multi_tensor_kernel"] * 3
    assert_bitwise_equal(emulated, cpu, "after one call of three launches")


def test_more_tensors_than_one_table_holds_take_more_launches(emulation):
    options = OP_RICH["rmsprop"]
    cpu = make_op_tensors("rmsprop", options, [((1 + t % 7,), torch.float32) for t in range(2000)],
                          seed=44)
    emulated = copy_to(cpu, emulated_target())
    cpu.grads = random_grads(cpu.params, torch.Generator().manual_seed(45))
    emulated.grads = [g.clone() for g in cpu.grads]
    launches = launches_of(emulation, lambda: call_op("rmsprop", emulated, options))
    call_op("rmsprop", cpu, options)
    device_blocks = emulation.config()["device"] + 1
    assert len(launches) > 2 and all(blocks <= device_blocks for _, blocks, _ in launches)
    assert_bitwise_equal(emulated, cpu, f"after one call of {len(launches)} launches")


def test_a_call_that_cannot_launch_one_of_its_kernels_changes_nothing(emulation):
    """Adam with L2 decay in one group and none in another needs two kernels. When the device
    has no image of the second, the call raises before the first launches."""
    options = {**OP_RICH["adam"], "decoupled_weight_decay": False}
    groups = [(3, {"weight_decay": 0.1}), (2, {"weight_decay": 0.0})]
    cpu = make_op_tensors("adam", options, [(s, torch.float32) for s in SHAPES], seed=46)
    emulated = copy_to(cpu, emulated_target())
    emulated.grads = random_grads(cpu.params, torch.Generator().manual_seed(47))
    # A device no other test uses: its occupancy cache is cold, so both kernels are queried.
    emulation.configure(device=50, workers=2, seed=1)
    emulation.fail_occupancy_query_after(1)
    before = {kind: [t.clone() for t in ts] for kind, ts in emulated.all_tensors().items()}
    with pytest.raises(RuntimeError, match="no kernel image"):
        call_op("adam", emulated, options, groups=groups)
    for kind, tensors in emulated.all_tensors().items():
        for index, (t, b) in enumerate(zip(tensors, before[kind])):
            assert torch.equal(t, b), f"{kind}[{index}] changed by a call that failed"
    cpu.grads = [g.clone() for g in emulated.grads]
    call_op("adam", emulated, options, groups=groups)
    call_op("adam", cpu, options, groups=groups)
    assert_bitwise_equal(emulated, cpu, "after the call that could launch")


def test_an_error_left_by_other_code_is_not_blamed_on_a_step(emulation):
    cpu = make_op_tensors("sgd", OP_RICH["sgd"], [(s, torch.float32) for s in SHAPES], seed=48)
    emulated = copy_to(cpu, emulated_target())
    cpu.grads = random_grads(cpu.params, torch.Generator().manual_seed(49))
    emulated.grads = [g.clone() for g in cpu.grads]
    emulation.set_pending_error(OTHER_CODES_ERROR)
    try:
        call_op("sgd", emulated, OP_RICH["sgd"])
        # Still there for the code that caused it to find.
        assert emulation.pending_error() == OTHER_CODES_ERROR
    finally:
        emulation.set_pending_error(0)
    call_op("sgd", cpu, OP_RICH["sgd"])
    assert_bitwise_equal(emulated, cpu, "after the step")
