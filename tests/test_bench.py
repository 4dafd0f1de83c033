"""Tests of the benchmark package (fused_opt.bench): byte counts, workloads, interleaving, launch counting,
peers, the result row schema, the progress bar, the plot, and tiny end-to-end runs on CPU."""

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from fused_opt import _quantize as quantize
from fused_opt.bench import harness, implementations, peers, plot, report, sweep
from fused_opt.bench.__main__ import main, parse_args
from fused_opt.bench.implementations import CASES, Case, Unsupported, select_cases, step_bytes_per_param
from fused_opt.bench.progress import ProgressBar
from fused_opt.bench.workloads import (MANY_SMALL_MAX_NUMEL, gpt2_shapes, llama_shapes, make_workload,
                                       many_small_shapes)
from fused_opt.optimizer import MASTER_KEY
from optim_helpers import load_repo_script

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CORE = "fused_opt,torch-forloop,torch-foreach,torch-fused"

# From the field notes' table: each tensor counted once per read and once per write, by the step alone.
FIELD_NOTES_BYTES = {
    ("adam", "fp32"): 28,
    ("adam-amsgrad", "fp32"): 36,
    ("adamw", "fp32"): 28,
    ("sgd-momentum", "fp32"): 20,
    ("sgd-nesterov", "fp32"): 20,
    ("adagrad", "fp32"): 20,
    ("rmsprop", "fp32"): 20,
    ("rmsprop-centered-momentum", "fp32"): 36,
    ("adamw", "bf16"): 14,
    ("adamw-amp-clip", "fp32"): 28,
    ("adamw-scaled", "fp32"): 28,
    ("adamw-bf16-states", "fp32"): 28,
    ("adamw-8bit-states", "fp32"): 28,
    ("adamw-8bit", "fp32"): 28,
    ("adamw-stochastic", "bf16"): 14,
    ("adamw-kahan", "bf16"): 14,
    ("adamw-bf16-master", "bf16"): 28,
}

# With each implementation's way of running the case's pipeline (field notes): AMP with a separate unscale_ and
# clip_grad_norm_ around the fused step ~48 B, fused one read-only grad pass + the step 32 B; torch's fused
# kernel writes the unscaled grads back (+4 B); torch's master copies: fp32 grads written and read, masters
# read again (+12 B). A case's baseline row is its bare step: the step's bytes alone.
PIPELINE_BYTES = {
    ("adamw-amp-clip", "fused_opt"): 32,
    ("adamw-amp-clip", "torch-fused"): 48,
    ("adamw-scaled", "fused_opt"): 28,
    ("adamw-scaled", "torch-fused"): 32,
    ("adamw-bf16-states", "fused_opt"): 20,  # bf16 states: 2*4 + 4 + 2*2*2
    ("adamw-8bit-states", "fused_opt"): 16,  # 8-bit states: 2*4 + 4 + 2*2*1 (and the block maxima)
    ("adamw-8bit", "fused_opt"): 16,
    ("adamw-stochastic", "fused_opt"): 14,
    ("adamw-kahan", "fused_opt"): 18,  # the bf16 compensation read and written: + 2*2
    ("adamw-bf16-master", "fused_opt"): 28,
    ("adamw-bf16-master", "torch-foreach"): 40,
    ("adamw-bf16-master", "torch-fused"): 40,
}
NEW_CASES = ("adamw-amp-clip,adamw-scaled,adamw-bf16-states,adamw-8bit-states,adamw-8bit,adamw-stochastic,"
             "adamw-kahan,adamw-bf16-master")

OPTIONAL_STR = (str, type(None))
OPTIONAL_FLOAT = (float, type(None))
OPTIONAL_INT = (int, type(None))
ROW_TYPES = {
    "timestamp": str, "device": str, "device_name": str, "torch_version": str,
    "fused_opt_version": OPTIONAL_STR, "git_commit": OPTIONAL_STR, "command": str,
    "load_average": OPTIONAL_FLOAT,
    "workload": str, "workload_note": str, "num_tensors": int, "case": str, "case_note": str, "optimizer": str,
    "implementation": str, "variant": str, "status": str, "note": str, "dtype": str, "numel": int,
    "bytes_per_param": int,
    "rounds": int, "steps_per_round": int, "warmup_steps": int,
    "launches_per_step": OPTIONAL_INT, "launches_counted": str, "state_bytes_per_param": OPTIONAL_FLOAT,
    "ms_median": OPTIONAL_FLOAT, "ms_min": OPTIONAL_FLOAT, "ms_max": OPTIONAL_FLOAT, "floor_ms": OPTIONAL_FLOAT,
    "gbps": OPTIONAL_FLOAT, "frac_of_probe": OPTIONAL_FLOAT, "speedup_vs_fused_opt_median": OPTIONAL_FLOAT,
    "speedup_vs_fused_opt_min": OPTIONAL_FLOAT, "speedup_vs_fused_opt_max": OPTIONAL_FLOAT,
    "time_vs_baseline_median": OPTIONAL_FLOAT, "time_vs_baseline_min": OPTIONAL_FLOAT,
    "time_vs_baseline_max": OPTIONAL_FLOAT,
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def case_named(name: str) -> Case:
    """The case of that name; "adamw" is in two dtypes, "adamw:bf16" names the second."""
    name, _, dtype = name.partition(":")
    return next(case for case in CASES if case.name == name and (not dtype or case.dtype == dtype))


def expected_bytes(row: dict) -> int:
    if row["variant"]:
        return FIELD_NOTES_BYTES[(row["case"], row["dtype"])]
    return PIPELINE_BYTES.get((row["case"], row["implementation"]), FIELD_NOTES_BYTES[(row["case"], row["dtype"])])


def expected_state_bytes(case: Case, implementation: str, variant: str = "",
                         workload: str = "large") -> float:
    if case.pipeline == implementations.BF16_STATES and not variant:
        return case.n_states * 2
    if case.pipeline == implementations.EIGHT_BIT_STATES and not variant:
        # Codes and block maxima, from 4,096 elements on; smaller tensors keep float32 states.
        shapes = make_workload(workload, "cpu", tiny=True).shapes
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(quantize.state_bytes(n) if n >= quantize.MIN_NUMEL else 4 * n for n in sizes)
        return case.n_states * total / sum(sizes)
    if case.pipeline == implementations.KAHAN and not variant:
        return case.n_states * 2 + 2  # and the bf16 compensation
    if case.pipeline == implementations.MASTER_WEIGHTS:
        # fp32 states and a master copy; torch's loop also keeps the masters' fp32 grads.
        return case.n_states * 4 + 4 + (0 if implementation == implementations.REFERENCE else 4)
    return case.n_states * case.torch_dtype.itemsize


def core(names: str = CORE) -> dict[str, implementations.Implementation]:
    wanted = names.split(",")
    return {impl.name: impl for impl in implementations.core_implementations(implementations.load_fused_opt())
            if impl.name in wanted}


def tiny_tensors(dtype: torch.dtype = torch.float32):
    return implementations.make_tensors(make_workload("gpt2", "cpu", tiny=True), dtype, CPU, 0)


# ---------------------------------------------------------------------------------------------------------
# What is measured


def test_step_bytes_count_each_tensor_read_and_written():
    assert step_bytes_per_param(n_states=2, element_size=4) == 28
    assert step_bytes_per_param(n_states=1, element_size=4) == 20
    assert step_bytes_per_param(n_states=3, element_size=4) == 36
    assert step_bytes_per_param(n_states=2, element_size=2) == 14
    # Stateless SGD moves what the a.add_(b) probe moves: read p and g, write p.
    assert step_bytes_per_param(n_states=0, element_size=4) == 12
    # Master weights: read g (2), read and write the fp32 master (8) and states (16), write p (2).
    assert step_bytes_per_param(n_states=2, element_size=2, master_weights=True) == 28
    # States of another element size: bf16 params with fp32 states, fp32 params with 8-bit states.
    assert step_bytes_per_param(n_states=2, element_size=2, state_size=4) == 22
    assert step_bytes_per_param(n_states=2, element_size=4, state_size=1) == 16


def test_cases_carry_the_field_notes_byte_counts():
    assert {(case.name, case.dtype): case.bytes_per_param for case in CASES} == FIELD_NOTES_BYTES


def test_implementations_count_their_own_way_of_running_the_pipeline():
    implementations_found = core()
    for (case_name, name), expected in PIPELINE_BYTES.items():
        case = case_named(case_name)
        assert implementations_found[name].bytes_per_param(case) == expected, (case_name, name)
        assert implementations_found[name].bytes_per_param(case, bare=True) == case.bytes_per_param


def test_implementations_count_their_own_state_format():
    adamw = case_named("adamw:bf16")
    assert implementations.Implementation("x", torch.optim.AdamW).bytes_per_param(adamw) == 14
    assert implementations.Implementation("x", torch.optim.AdamW, state_size=4).bytes_per_param(adamw) == 22


def test_gpt2_small_has_148_tensors_and_124m_params():
    shapes = gpt2_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(shape) for shape in shapes) == 124_439_808
    assert make_workload("gpt2", "cpu").numel == 124_439_808


def test_llama_list_has_over_200_tensors_with_small_norms_and_is_scaled_to_memory():
    shapes = llama_shapes()
    assert len(shapes) >= 200
    assert 1.0e9 < sum(math.prod(shape) for shape in shapes) < 1.2e9
    assert sum(1 for shape in shapes if len(shape) == 1) == 45  # two norms per layer and the final norm
    roomy = make_workload("llama-1b", "cuda", memory_bytes=2**40)
    assert roomy.shapes == shapes and roomy.note == ""
    scaled = make_workload("llama-1b", "cpu", memory_bytes=24 * 2**30)
    assert scaled.num_tensors == len(shapes)
    assert scaled.numel < roomy.numel / 2 and "scaled down" in scaled.note and "24 GiB" in scaled.note


def test_many_small_has_thousands_of_tensors_under_64k_elements_every_run_the_same():
    shapes = many_small_shapes()
    assert len(shapes) >= 2000
    assert all(1 <= math.prod(shape) <= MANY_SMALL_MAX_NUMEL < 2**16 for shape in shapes)
    assert shapes == many_small_shapes()


def test_tiny_workloads_keep_the_tensor_structure():
    assert make_workload("gpt2", "cpu", tiny=True).num_tensors == 148
    assert make_workload("large", "cpu", tiny=True).num_tensors == 1
    assert make_workload("llama-1b", "cpu", tiny=True).num_tensors == len(llama_shapes())
    assert make_workload("many-small", "cpu", tiny=True).num_tensors >= 256
    assert make_workload("large", "cpu").numel == 64_000_000
    assert make_workload("large", "cuda").numel == 1_000_000_000


def test_select_cases_by_optimizer_class_case_name_dtype_and_default():
    assert [case.name for case in select_cases(["sgd"], ["fp32"], full=False)] == ["sgd-momentum", "sgd-nesterov"]
    assert [case.name for case in select_cases(["sgd-nesterov"], ["fp32", "bf16"], full=False)] == ["sgd-nesterov"]
    bf16_adamw = select_cases(["adamw"], ["bf16"], full=False)
    assert [(case.name, case.dtype) for case in bf16_adamw] == [
        ("adamw", "bf16"), ("adamw-stochastic", "bf16"), ("adamw-kahan", "bf16"), ("adamw-bf16-master", "bf16")]
    named = select_cases(["adamw"], ["fp32", "bf16"], full=False, names=NEW_CASES.split(","))
    assert [case.name for case in named] == NEW_CASES.split(",")
    assert select_cases(["sgd"], ["fp32", "bf16"], full=False, names=["adamw-scaled"]) == []
    assert [case.name for case in select_cases(None, ["fp32"], full=False, names=["sgd-nesterov"])] == [
        "sgd-nesterov"]
    default = {(case.name, case.dtype) for case in select_cases(None, ["fp32", "bf16"], full=False)}
    assert {("adamw", "fp32"), ("adamw", "bf16"), ("adamw-amp-clip", "fp32")} <= default
    assert ("sgd-nesterov", "fp32") not in default
    assert len(select_cases(None, ["fp32", "bf16"], full=True)) == len(CASES)


def test_pipeline_cases_run_fused_opt_and_torch_equivalents():
    runs = {name: [impl.name for impl in core().values() if impl.runs(case_named(name))]
            for name in NEW_CASES.split(",")}
    assert runs == {"adamw-amp-clip": ["fused_opt", "torch-fused"], "adamw-scaled": ["fused_opt", "torch-fused"],
                    "adamw-bf16-states": ["fused_opt"], "adamw-8bit-states": ["fused_opt"],
                    "adamw-8bit": ["fused_opt"], "adamw-stochastic": ["fused_opt"],
                    "adamw-kahan": ["fused_opt"],
                    "adamw-bf16-master": ["fused_opt", "torch-foreach", "torch-fused"]}


def test_amp_pipelines_keep_grads_and_step_as_the_bare_step_does():
    amp = case_named("adamw-amp-clip")
    params, grads = tiny_tensors()
    for name, impl in core("fused_opt,torch-fused").items():
        prepared = implementations.prepare(impl, amp, params, grads)
        bare = implementations.prepare(impl, amp, params, grads, bare=True)
        own = prepared.optimizer.param_groups[0]["params"]
        for _ in range(3):
            prepared.step()
            bare.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(own, grads)), "scale 1.0 and no clipping keep the grads"
        # torch's unscale_ and clip write the grads, so it has its own; fused_opt's pipeline only reads them.
        assert all((p.grad is g) == (name == "fused_opt") for p, g in zip(own, grads)), name
        assert not torch.equal(own[0], params[0])
        for stepped, bare_stepped in zip(own, bare.optimizer.param_groups[0]["params"]):
            torch.testing.assert_close(stepped, bare_stepped)


def test_fused_amp_pipeline_is_one_grad_pass_and_the_step():
    prepared = implementations.prepare(core("fused_opt")["fused_opt"], case_named("adamw-amp-clip"),
                                       *tiny_tensors())
    prepared.step()
    assert prepared.optimizer.defaults["max_grad_norm"] == implementations.CLIP_MAX_NORM
    # fused_opt.GradScaler leaves the norm of its read-only pass; torch's unscale_ path would not.
    assert prepared.optimizer.last_grad_norm is not None
    from torch.profiler import profile
    with harness._native_stderr_silenced(), profile() as profiler:
        prepared.step()
    names = [event.name for event in profiler.events()]
    assert names.count("fused_opt::grad_norm_") == 1 and names.count("fused_opt::adam_") == 1
    assert not any("clip" in name or "_foreach_mul" in name or "unscale" in name for name in names)


def test_scaled_case_hands_the_scaler_tensors_and_its_baseline_does_not():
    scaled = case_named("adamw-scaled")
    assert scaled.variants == ("", "no grad_scale/found_inf")
    params, grads = tiny_tensors()
    for impl in core("fused_opt,torch-fused").values():
        with_scaler = implementations.prepare(impl, scaled, params, grads)
        bare = implementations.prepare(impl, scaled, params, grads, bare=True)
        assert float(with_scaler.optimizer.grad_scale) == 1.0 and float(with_scaler.optimizer.found_inf) == 0.0
        assert not hasattr(bare.optimizer, "grad_scale") and not hasattr(bare.optimizer, "found_inf")
        for _ in range(2):
            with_scaler.step()
            bare.step()
        own = with_scaler.optimizer.param_groups[0]["params"]
        for ours, theirs in zip(own, bare.optimizer.param_groups[0]["params"]):
            torch.testing.assert_close(ours, theirs)
        assert all(torch.equal(p.grad, g) for p, g in zip(own, grads)), "scale 1.0 keeps the grads"


def test_master_weights_case_matches_torch_master_copies():
    master = case_named("adamw-bf16-master")
    params, grads = tiny_tensors(torch.bfloat16)
    numel = sum(p.numel() for p in params)
    stepped = {}
    for name, impl in core("fused_opt,torch-fused,torch-foreach").items():
        prepared = implementations.prepare(impl, master, params, grads)
        for _ in range(3):
            prepared.step()
        held = sum(tensor.nbytes for tensor in prepared.held)
        state = harness.state_bytes_per_param(prepared.optimizer, numel, held)
        assert state == pytest.approx(expected_state_bytes(master, name), abs=0.05), name
        stepped[name] = prepared.optimizer
    fused_opt_params = stepped["fused_opt"].param_groups[0]["params"]
    assert all(p.dtype == torch.bfloat16 for p in fused_opt_params)
    assert not torch.equal(fused_opt_params[0], params[0])
    # torch's optimizer steps the fp32 masters, the same math as fused_opt's (torch-fused took one more step,
    # its maker's trial).
    masters = stepped["torch-foreach"].param_groups[0]["params"]
    assert all(m.dtype == torch.float32 for m in masters)
    for ours, theirs in zip(fused_opt_params, masters):
        torch.testing.assert_close(stepped["fused_opt"].state[ours][MASTER_KEY], theirs)
        torch.testing.assert_close(ours, theirs.to(torch.bfloat16))


def test_rounds_rotate_so_each_contender_takes_each_position():
    contenders = ["A", "B", "C", "probe"]
    orders = [harness.rotated(contenders, r) for r in range(len(contenders))]
    assert orders[1] == ["B", "C", "probe", "A"]
    for position in range(len(contenders)):
        assert sorted(order[position] for order in orders) == sorted(contenders)


def test_one_input_set_on_cpu_and_probe_beyond_the_caches():
    assert harness.input_set_count(CPU, 1000) == 1
    assert harness.probe_numel(1000) == harness.PROBE_MIN_NUMEL
    assert harness.probe_numel(64_000_000) == 64_000_000
    assert harness.probe_numel(2**29) == harness.PROBE_MAX_NUMEL


def test_launches_and_state_bytes_of_one_step():
    params, grads = tiny_tensors()
    adam = case_named("adam")
    counts, states = {}, {}
    for impl in implementations.core_implementations(implementations.load_fused_opt()):
        prepared = implementations.prepare(impl, adam, params, grads)
        prepared.step()
        counts[impl.name] = harness.count_launches(prepared.step, CPU)
        states[impl.name] = harness.state_bytes_per_param(prepared.optimizer, sum(p.numel() for p in params))
    assert counts["fused_opt"] == 1
    assert counts["torch-fused"] == 2  # the step counters' _foreach_add_, then _fused_adam_
    assert counts["torch-foreach"] < counts["torch-forloop"]
    assert counts["torch-forloop"] >= len(params)
    for name, state in states.items():
        assert state == pytest.approx(8.0, abs=0.01), name  # exp_avg and exp_avg_sq in fp32


def test_a_library_that_calls_past_the_dispatcher_counts_as_unknown():
    assert harness.count_launches(lambda: None, CPU) is None


def test_baselines_and_speed_ups_are_per_round_ratios_within_a_variant():
    def timed(name, variant, round_ms, bytes_per_param=28):
        return harness.Contender(name, "fp32", 1000, bytes_per_param, step=None, variant=variant,
                                 round_ms=round_ms)

    contenders = [timed("fused_opt", "", [10.0, 20.0, 30.0]), timed("fused_opt", "bare", [10.0, 10.0, 25.0]),
                  timed("torch-fused", "", [30.0, 60.0, 60.0]), timed("torch-fused", "bare", [20.0, 20.0, 30.0])]
    probe = timed("probe-inplace-add", "", [1.0, 2.0, 3.0], bytes_per_param=12)
    results = {(r.implementation, r.variant): r for r in harness.summarize(contenders + [probe], probe)}
    ours, theirs = results[("fused_opt", "")], results[("torch-fused", "")]
    assert (ours.time_vs_baseline_median, ours.time_vs_baseline_min, ours.time_vs_baseline_max) == (1.2, 1.0, 2.0)
    assert (theirs.time_vs_baseline_median, theirs.time_vs_baseline_max) == (2.0, 3.0)
    assert results[("torch-fused", "bare")].speedup_vs_fused_opt_median == 2.0  # against fused_opt's bare step
    assert theirs.speedup_vs_fused_opt_median == 3.0
    assert results[("fused_opt", "bare")].time_vs_baseline_median is None
    assert results[("probe-inplace-add", "")].speedup_vs_fused_opt_median is None


# ---------------------------------------------------------------------------------------------------------
# Peers


def test_peer_adapters_refuse_options_the_library_would_ignore():
    with pytest.raises(Unsupported, match="bitsandbytes has no nesterov"):
        peers._reject(case_named("sgd-nesterov"), "bitsandbytes", ("amsgrad", "nesterov"))
    peers._reject(case_named("sgd-momentum"), "bitsandbytes", ("amsgrad", "nesterov"))


def test_discovery_notes_missing_and_failing_peers_and_goes_on(monkeypatch):
    def not_installed(device):
        raise ModuleNotFoundError("No module named 'somelib'", name="somelib")

    def broken_build(device):
        raise RuntimeError("ninja: build stopped\nmore lines")

    works = implementations.Implementation("works-1", lambda case, params: torch.optim.SGD(params, lr=0.1))
    monkeypatch.setattr(peers, "PEERS", (
        peers.Peer("somelib", ("somelib-fast",), ("cpu",), not_installed),
        peers.Peer("other", ("other-fused",), ("cpu",), broken_build),
        peers.Peer("gpu-only", ("gpu-only-fused",), ("cuda",), broken_build),
        peers.Peer("works", ("works-1",), ("cpu",), lambda device: [works]),
    ))
    found = peers.discover(CPU)
    assert [impl.name for impl in found.implementations] == ["works-1"]
    assert found.missing == ["somelib-fast (somelib not installed)",
                             "other-fused (failed: RuntimeError: ninja: build stopped)",
                             "gpu-only-fused (cuda only)"]
    assert peers.discover(CPU, wanted={"works-1"}).missing == []


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bitsandbytes_peer_runs_end_to_end(tmp_path):
    assert main(["--tiny", "--device", "cpu", "--workloads", "large", "--optimizers", "sgd", "--rounds", "2",
                 "--implementations", "fused_opt,bnb-32bit,bnb-8bit", "--no-plot", "--output", str(tmp_path)]) == 0
    rows = {(row["case"], row["implementation"]): row for row in read_jsonl(tmp_path / "results.jsonl")}
    assert rows[("sgd-momentum", "bnb-8bit")]["status"] == "ok"
    assert rows[("sgd-momentum", "bnb-8bit")]["bytes_per_param"] == 14  # 1-byte momentum
    assert rows[("sgd-nesterov", "bnb-32bit")]["status"] == "skipped"
    assert "nesterov" in rows[("sgd-nesterov", "bnb-32bit")]["note"]


@pytest.mark.parametrize("peer, library", [("bnb-8bit", "bitsandbytes"), ("torchao-8bit", "torchao")])
def test_8bit_peers_run_in_the_8bit_case(peer, library, tmp_path):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} not installed")
    # GPT-2's shapes: each weight is a multiple of 256 elements, which torchao needs to quantize a tensor.
    assert main(["--tiny", "--device", "cpu", "--workloads", "gpt2", "--cases", "adamw-8bit", "--rounds", "2",
                 "--implementations", f"fused_opt,{peer}", "--no-plot", "--output", str(tmp_path)]) == 0
    rows = {row["implementation"]: row for row in read_jsonl(tmp_path / "results.jsonl")}
    assert set(rows) >= {"fused_opt", peer}
    for name in ("fused_opt", peer):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["bytes_per_param"] == 16
    # Two 1-byte moments and their block maxima, float32 moments of the biases below 4,096 elements (the same
    # rule in each library), step counters and the peers' code tables: far from float32 moments' 8 B.
    for name in ("fused_opt", peer):
        assert 2.0 < rows[name]["state_bytes_per_param"] < 3.0, rows[name]


def test_state_bytes_count_what_a_wrapper_subclass_holds():
    from torch.testing._internal.two_tensor import TwoTensor

    inner = torch.zeros(100), torch.zeros(100)
    wrapped = TwoTensor(*inner)
    assert wrapped.nbytes == 400  # what it stands for, not what it holds
    assert harness.stored_bytes(wrapped) == 800
    assert harness.stored_bytes(torch.zeros(10, dtype=torch.uint8)) == 10


# ---------------------------------------------------------------------------------------------------------
# A tiny run end to end


def test_row_keys_are_the_documented_schema():
    assert set(report.ROW_KEYS) == set(ROW_TYPES)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run over every case of two workloads, into a results file that already holds a line."""
    output = tmp_path_factory.mktemp("bench")
    earlier_line = {"earlier": "run"}
    (output / "results.jsonl").write_text(json.dumps(earlier_line) + "\n")
    assert main(["--tiny", "--full", "--device", "cpu", "--workloads", "large,gpt2", "--implementations", CORE,
                 "--rounds", "2", "--output", str(output)]) == 0
    lines = read_jsonl(output / "results.jsonl")
    assert lines[0] == earlier_line, "results.jsonl must be appended to, not overwritten"
    return output, lines[1:]


def test_tiny_run_rows_follow_the_schema(tiny_run):
    _, rows = tiny_run
    assert rows
    for row in rows:
        assert list(row) == list(report.ROW_KEYS)
        for key, expected_type in ROW_TYPES.items():
            assert isinstance(row[key], expected_type), (key, row[key])


def test_tiny_run_covers_every_case_workload_and_implementation(tiny_run):
    _, rows = tiny_run
    measured = {(row["workload"], row["case"], row["dtype"], row["implementation"], row["variant"]) for row in rows}
    names = CORE.split(",")
    for workload in ("large", "gpt2"):
        for case in CASES:
            expected = [name for name in names if case.implementations is None or name in case.implementations]
            for name in expected:
                for variant in case.variants:
                    assert (workload, case.name, case.dtype, name, variant) in measured
            assert (workload, case.name, "fp32", "probe-inplace-add", "") in measured
    amp_rows = {row["implementation"] for row in rows if row["case"] == "adamw-amp-clip"}
    assert amp_rows == {"fused_opt", "torch-fused", "probe-inplace-add"}
    scaled_rows = {(row["implementation"], row["variant"]) for row in rows
                   if row["case"] == "adamw-scaled" and row["workload"] == "gpt2"}
    assert scaled_rows == {("fused_opt", ""), ("fused_opt", "no grad_scale/found_inf"), ("torch-fused", ""),
                           ("torch-fused", "no grad_scale/found_inf"), ("probe-inplace-add", "")}
    state_rows = {(row["implementation"], row["variant"], row["bytes_per_param"]) for row in rows
                  if row["case"] == "adamw-bf16-states" and row["workload"] == "gpt2"}
    assert state_rows == {("fused_opt", "", 20), ("fused_opt", "fp32 states", 28), ("probe-inplace-add", "", 12)}


def test_tiny_run_values_are_sensible(tiny_run):
    _, rows = tiny_run
    for row in rows:
        assert row["status"] in ("ok", "skipped", "error"), row
        assert row["device"] == "cpu" and row["rounds"] == 2 and row["steps_per_round"] == 2
        assert row["launches_counted"] == "top-level cpu ops"
        if row["implementation"] == "probe-inplace-add":
            assert row["bytes_per_param"] == 12 and row["frac_of_probe"] == 1.0
            assert row["state_bytes_per_param"] is None
        else:
            assert row["bytes_per_param"] == expected_bytes(row), row
            assert row["numel"] == make_workload(row["workload"], "cpu", tiny=True).numel
        if row["status"] != "ok":
            assert row["note"] and row["ms_median"] is None
            continue
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["gbps"] > 0 and row["frac_of_probe"] > 0 and row["floor_ms"] > 0
        assert row["launches_per_step"] >= 1
        if row["implementation"] == implementations.REFERENCE:
            assert row["speedup_vs_fused_opt_median"] == 1.0
            assert row["speedup_vs_fused_opt_min"] == row["speedup_vs_fused_opt_max"] == 1.0
            if row["case"] != "adamw-amp-clip":
                assert row["launches_per_step"] == 1  # one op call per param group
        elif row["speedup_vs_fused_opt_median"] is not None:
            assert (0 < row["speedup_vs_fused_opt_min"] <= row["speedup_vs_fused_opt_median"]
                    <= row["speedup_vs_fused_opt_max"])
        has_baseline = (row["case"] in {case.name for case in CASES if case.baseline} and not row["variant"]
                        and row["implementation"] != "probe-inplace-add")
        assert (row["time_vs_baseline_median"] is not None) == has_baseline, row
        if has_baseline:
            assert (0 < row["time_vs_baseline_min"] <= row["time_vs_baseline_median"]
                    <= row["time_vs_baseline_max"])


def test_tiny_run_state_bytes_match_the_case(tiny_run):
    _, rows = tiny_run
    for row in rows:
        if row["status"] == "ok" and not row["implementation"].startswith("probe"):
            case = case_named(f"{row['case']}:{row['dtype']}")
            expected = expected_state_bytes(case, row["implementation"], row["variant"], row["workload"])
            assert row["state_bytes_per_param"] == pytest.approx(expected, abs=0.05), row


def test_tiny_run_skips_torch_fused_only_where_torch_has_no_fused_kernel(tiny_run):
    _, rows = tiny_run
    fused = {(row["workload"], row["case"], row["dtype"]): row["status"]
             for row in rows if row["implementation"] == "torch-fused"}
    for (workload, case, dtype), status in fused.items():
        assert status == ("skipped" if case.startswith("rmsprop") else "ok"), (workload, case, dtype)


def test_tiny_run_writes_the_markdown_tables(tiny_run):
    output, rows = tiny_run
    markdown = (output / "latest-cpu.md").read_text()
    assert "## large: 1 tensor," in markdown and "## gpt2: 148 tensors," in markdown
    assert "| case | dtype | implementation | B/param |" in markdown and "| ops/step |" in markdown
    assert "peers found:" in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    # Per workload: the main table's header, the baseline table's header and its lines (adamw-scaled's two,
    # adamw-bf16-states', adamw-8bit-states', adamw-stochastic's and adamw-kahan's one each).
    assert len(table_lines) == len(rows) + 2 * (1 + 1 + 2 + 1 + 1 + 1 + 1)
    assert "| adamw-bf16-states | fp32 | fused_opt |" in markdown and "| fp32 states |" in markdown
    assert "- adamw bf16: bf16 params, grads and states" in markdown
    assert "| torch-fused (no grad_scale/found_inf) |" in markdown
    assert "| adamw-scaled | fp32 | fused_opt |" in markdown and "| time / baseline [min-max] |" in markdown


def test_tiny_run_draws_the_plot_when_matplotlib_is_there(tiny_run):
    output, _ = tiny_run
    markdown = (output / "latest-cpu.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (output / "latest-cpu.png").exists() and "latest-cpu.png" not in markdown
        return
    assert (output / "latest-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![time per step against the byte floor](latest-cpu.png)" in markdown


def test_plot_takes_one_device_and_its_latest_run(tiny_run, tmp_path):
    _, rows = tiny_run
    older = [{**row, "timestamp": "2000-01-01T00:00:00+00:00"} for row in rows]
    gpu = [{**row, "device": "cuda", "timestamp": "2999-01-01T00:00:00+00:00"} for row in rows]
    assert plot.latest_run(older + rows + gpu, "cpu") == rows
    with pytest.raises(ValueError, match="one device"):
        plot.plot_run(rows + gpu, tmp_path / "mixed.png")


def test_the_other_workloads_run_too(tmp_path):
    assert main(["--tiny", "--device", "cpu", "--workloads", "llama-1b,many-small", "--optimizers", "sgd-momentum",
                 "--implementations", "fused_opt,torch-foreach", "--rounds", "1", "--steps", "1", "--no-plot",
                 "--output", str(tmp_path)]) == 0
    rows = read_jsonl(tmp_path / "results.jsonl")
    many_small = make_workload("many-small", "cpu", tiny=True)
    assert {(row["workload"], row["num_tensors"]) for row in rows} == {
        ("llama-1b", len(llama_shapes())), ("many-small", many_small.num_tensors)}
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["workload_note"] == "tiny widths for tests" for row in rows if row["workload"] == "llama-1b")


def test_failing_implementation_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    class FailingSGD(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("injected failure")

    # A fused_opt stand-in whose SGD fails in step() and which has no RMSprop at all.
    stand_in = types.SimpleNamespace(SGD=FailingSGD, __version__="stand-in")
    monkeypatch.setattr(implementations, "load_fused_opt", lambda: stand_in)
    assert main(["--tiny", "--device", "cpu", "--workloads", "gpt2", "--optimizers", "sgd-momentum,rmsprop",
                 "--dtypes", "fp32", "--rounds", "2", "--implementations", CORE, "--no-plot",
                 "--output", str(tmp_path)]) == 0
    rows = {(row["case"], row["implementation"]): row for row in read_jsonl(tmp_path / "results.jsonl")}
    assert rows[("sgd-momentum", "fused_opt")]["status"] == "error"
    assert "injected failure" in rows[("sgd-momentum", "fused_opt")]["note"]
    assert rows[("rmsprop", "fused_opt")]["status"] == "error"
    assert "AttributeError" in rows[("rmsprop", "fused_opt")]["note"]
    assert rows[("sgd-momentum", "torch-forloop")]["status"] == "ok"
    assert rows[("sgd-momentum", "torch-forloop")]["speedup_vs_fused_opt_median"] is None
    assert rows[("sgd-momentum", "torch-forloop")]["fused_opt_version"] == "stand-in"
    assert "error: RuntimeError: injected failure" in capsys.readouterr().out


def test_without_fused_opt_the_others_are_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fused_opt", None)  # makes `import fused_opt` raise ImportError
    assert main(["--tiny", "--device", "cpu", "--workloads", "large", "--optimizers", "adam", "--dtypes", "fp32",
                 "--rounds", "2", "--implementations", CORE, "--no-plot", "--output", str(tmp_path)]) == 0
    assert "measuring the others only" in capsys.readouterr().err
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [row["implementation"] for row in rows if row["case"] == "adam"] == [
        "torch-forloop", "torch-foreach", "torch-fused", "probe-inplace-add"]
    assert all(row["speedup_vs_fused_opt_median"] is None and row["fused_opt_version"] is None for row in rows)


# ---------------------------------------------------------------------------------------------------------
# The sweep: the cost curve over params, tensor count and the host cost per param


SWEEP_CONTENDERS = {
    "numel": {"fused_opt", "torch-forloop", "torch-foreach", "torch-fused", "probe-inplace-add"},
    "tensors": {"fused_opt", "torch-forloop", "torch-foreach", "torch-fused", "probe-inplace-add"},
    "host": {"fused_opt", "fused_opt-clip", "fused_opt-scaler", "torch-forloop", "torch-foreach", "torch-fused"},
}


def test_tiny_sweep_measures_every_contender_at_every_point(tmp_path, capsys):
    assert main(["--sweep", "--tiny", "--device", "cpu", "--rounds", "2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = read_jsonl(tmp_path / "sweep.jsonl")
    assert not (tmp_path / "results.jsonl").exists(), "the sweep's rows must stay apart from the main run's"
    planned = sweep.points("cpu", tiny=True, max_numel=None, min_steps=2)
    assert [point.x for point in planned if point.panel == "numel"] == [10**3, 10**4, 10**5]
    assert [point.x for point in planned if point.panel == "tensors"] == [1, 4, 16, 64, 256]
    assert [point.x for point in planned if point.panel == "host"] == [1, 16, 148]
    measured = Counter((row["workload"], row["numel"], row["num_tensors"], row["implementation"]) for row in rows)
    expected = Counter()
    for point in planned:
        for name in SWEEP_CONTENDERS[point.panel]:
            probe = name.startswith("probe")
            numel = harness.probe_numel(point.workload.numel) if probe else point.workload.numel
            expected[(f"sweep-{point.panel}", numel, point.workload.num_tensors, name)] += 1
    assert measured == expected
    for row in rows:
        assert list(row) == list(report.ROW_KEYS)
        for key, expected_type in ROW_TYPES.items():
            assert isinstance(row[key], expected_type), (key, row[key])
        assert row["status"] == "ok", row
        assert row["case"] == "adamw" and row["dtype"] == "fp32" and row["rounds"] == 2
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"], row
        assert row["steps_per_round"] >= 2
        host = row["workload"] == "sweep-host"
        if host:
            assert row["numel"] == row["num_tensors"] and row["floor_ms"] is None
        elif not report.is_probe(row):
            assert row["bytes_per_param"] == 28 and row["floor_ms"] > 0 and row["frac_of_probe"] > 0
        if row["implementation"] == "fused_opt":
            assert row["speedup_vs_fused_opt_median"] == 1.0
        elif not report.is_probe(row):
            assert row["speedup_vs_fused_opt_median"] > 0, row
    # The step timed N times a round is the small one; the one-element params' steps are timed most.
    steps = {(row["workload"], row["num_tensors"], row["numel"]): row["steps_per_round"] for row in rows}
    assert steps[("sweep-numel", 1, 10**3)] >= steps[("sweep-numel", 1, 10**5)]

    markdown = (tmp_path / "sweep-cpu.md").read_text()
    for title in ("ms per step against params on one tensor", "ms per step against tensor count",
                  "Host cost: AdamW fp32 over N one-element params"):
        assert f"## AdamW fp32 {title}" in markdown or f"## {title}" in markdown
        assert title in out
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_lines) == 3 + len(planned)  # a header per panel, a line per point
    assert "| 148 | " in markdown and "| 100,000 | " in markdown and "| 256 | 64 | " in markdown
    numel_section, tensors_section = markdown.split("\n## ")[1:3]
    for section, floor_column in ((numel_section, 1), (tensors_section, 2)):
        body = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert body and all(float(line.split(" | ")[floor_column]) > 0 for line in body), section
    assert "- issue #13: at 148 params: fused_opt " in markdown and "us per step (target <= 100)" in markdown
    assert "torch-fused" in markdown and "fused_opt-scaler" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "sweep-cpu.png").exists() and "sweep-cpu.png" not in markdown
        return
    assert (tmp_path / "sweep-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(sweep-cpu.png)" in markdown


def test_sweep_options_stand_apart_from_the_workload_options(capsys):
    args = parse_args(["--sweep", "--device", "cpu", "--sweep-max-numel", "1e4", "--sweep-panels", "numel,host"])
    assert args.sweep_max_numel == 10_000 and args.sweep_panels == ["numel", "host"]
    planned = sweep.points("cpu", tiny=False, max_numel=args.sweep_max_numel, min_steps=1,
                           panels=tuple(args.sweep_panels))
    assert [(point.panel, point.x) for point in planned] == [
        ("numel", 1000), ("numel", 10_000), *(("host", count) for count in sweep.HOST_COUNTS)]
    full = sweep.points("cpu", tiny=False, max_numel=10**8, min_steps=1)
    assert [point.x for point in full if point.panel == "numel"] == [10**k for k in range(3, 9)]
    assert [point.x for point in full if point.panel == "tensors"][-1] == 16_384
    assert {point.workload.numel for point in full if point.panel == "tensors"} == {2**22}
    for argv, message in ((["--sweep", "--workloads", "gpt2"], "--workloads do not apply"),
                          (["--sweep", "--full"], "--full do not apply"),
                          (["--sweep-max-numel", "1e4"], "go with --sweep"),
                          (["--sweep", "--sweep-max-numel", "1.5"], "must be a whole number")):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", *argv])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The command line and the progress bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_case_detail_and_eta():
    stream = _Terminal()
    bar = ProgressBar([1.0, 3.0], stream=stream)
    bar.begin("gpt2 adamw fp32")
    bar.update(0.5, "round 2/5: torch-foreach")
    bar.end()
    bar.begin("large adamw fp32")
    bar.message("a table")
    text = stream.getvalue()
    assert "\r" in text and "2/2 large adamw fp32" in text and "a table\n" in text
    assert "gpt2 adamw fp32" in text and "ETA" in text


def test_progress_without_a_terminal_prints_a_line_per_case():
    stream = io.StringIO()
    bar = ProgressBar([1.0, 1.0], stream=stream)
    for label in ("a", "b"):
        bar.begin(label)
        bar.update(0.5, "detail")
        bar.end()
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[1/2] a", "[2/2] b"]
    assert "\r" not in stream.getvalue()


def test_help_says_what_quick_and_full_run(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "quick default (no --full): workloads large, gpt2" in text and "--full: workloads" in text


def test_cases_flag_picks_cases_by_name_among_the_optimizers(capsys):
    args = parse_args(["--device", "cpu", "--optimizers", "adamw", "--cases", NEW_CASES])
    assert [(case.name, case.dtype) for case in args.cases] == [
        ("adamw-amp-clip", "fp32"), ("adamw-scaled", "fp32"), ("adamw-bf16-states", "fp32"),
        ("adamw-8bit-states", "fp32"), ("adamw-8bit", "fp32"), ("adamw-stochastic", "bf16"), ("adamw-kahan", "bf16"), ("adamw-bf16-master", "bf16")]
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--optimizers", "sgd", "--cases", "adamw-scaled"])
    assert "no case has optimizer in ['sgd'], name in ['adamw-scaled']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--cases", "adamw-unknown"])
    assert "unknown adamw-unknown" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "fused_opt.bench", "--tiny", "--device", "cpu", "--workloads", "large",
         "--optimizers", "sgd", "--dtypes", "fp32", "--rounds", "2", "--implementations", CORE, "--no-plot",
         "--output", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("large: 1 tensor, 1.0M params, cpu")
    assert "[1/2] large sgd-momentum fp32:" in completed.stderr  # progress, one line per case off a terminal
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert {row["case"] for row in rows} == {"sgd-momentum", "sgd-nesterov"}
    assert all(row["command"].startswith("python -m fused_opt.bench --tiny") for row in rows)


# ---------------------------------------------------------------------------------------------------------
# What a user sees: where results go, the terminal's width, the summary, warnings and exit codes


def test_default_output_is_the_users_folder_and_record_is_the_projects(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert parse_args(["--device", "cpu"]).output == tmp_path / "data" / "fused_opt" / "bench"
    assert parse_args(["--device", "cpu", "--output", "elsewhere"]).output == Path("elsewhere")
    assert parse_args(["--device", "cpu", "--record"]).output == REPO_ROOT / "benchmarks" / "results"
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--record", "--output", "elsewhere"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_record_refuses_a_copy_that_is_not_a_clone(monkeypatch, capsys):
    monkeypatch.setattr(report, "recorded_results_dir", lambda: None)
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--record"])
    assert "is not run from one; use --output DIR" in capsys.readouterr().err


def test_a_run_with_nothing_to_measure_fails_and_writes_nothing(tmp_path, capsys):
    assert main(["--tiny", "--device", "cpu", "--optimizers", "rmsprop", "--implementations", "deepspeed-cpuadam",
                 "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: nothing to measure" in err and "rmsprop fp32" in err
    assert not list(tmp_path.iterdir())


def test_a_run_where_every_implementation_fails_exits_non_zero(tmp_path, monkeypatch, capsys):
    class FailingSGD(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("injected failure")

    monkeypatch.setattr(implementations, "load_fused_opt",
                        lambda: types.SimpleNamespace(SGD=FailingSGD, __version__="stand-in"))
    assert main(["--tiny", "--device", "cpu", "--workloads", "large", "--optimizers", "sgd-momentum",
                 "--dtypes", "fp32", "--rounds", "1", "--implementations", "fused_opt", "--no-plot",
                 "--output", str(tmp_path)]) == 1
    assert "error: no requested case was measured" in capsys.readouterr().err


def test_terminal_tables_fit_100_columns_and_keep_every_note_whole(tiny_run):
    _, rows = tiny_run
    for workload in ("large", "gpt2"):
        own = [row for row in rows if row["workload"] == workload]
        text = report.format_table(own)
        assert max(len(line) for line in text.splitlines()) <= report.TERMINAL_WIDTH, text
        flat = " ".join(text.split())
        for row in own:
            if row["case_note"]:
                assert " ".join(row["case_note"].split()) in flat
        assert "left out to fit 100 columns" in text  # the variant rows' labels leave no room for all
    long_title = [{**row, "device_name": "a CPU whose model name runs on and on " * 2} for row in rows]
    assert max(len(line) for line in report.format_table(long_title).splitlines()) <= report.TERMINAL_WIDTH


def test_summary_has_one_line_per_case_with_fused_opts_speed_ups(tiny_run):
    _, rows = tiny_run
    cases = {(row["workload"], row["case"], row["dtype"]) for row in rows if not report.is_probe(row)}
    summaries = report.case_summaries(rows)
    assert len(summaries) == len(cases)
    adamw = next(line for line in summaries if line.startswith("gpt2 adamw fp32: fused_opt "))
    assert "% of ceiling; speed-up over torch-forloop" in adamw and "torch-fused" in adamw


def test_a_busy_machine_is_warned_about_at_the_start_at_the_end_and_in_the_plot(tmp_path, monkeypatch, capsys):
    assert report.load_warning(0.9, cores=2) is None and report.load_warning(None) is None
    monkeypatch.setattr(report, "load_average", lambda: 7.5)
    drawn = {}
    monkeypatch.setattr(plot, "plot_run", lambda rows, path, warning=None: drawn.setdefault("warning", warning))
    assert main(["--tiny", "--device", "cpu", "--workloads", "large", "--optimizers", "sgd-momentum",
                 "--dtypes", "fp32", "--rounds", "1", "--implementations", "fused_opt",
                 "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: at start, load average 7.50")
    assert err[-2].startswith("warning: load average 7.50") and err[-1].startswith("done in")
    assert drawn["warning"].startswith("load average 7.50")


def test_bad_numbers_and_the_program_name_in_usage(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--rounds", "two"])
    assert "argument --rounds: expected a whole number, got 'two'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fused-opt-bench"])
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    err = capsys.readouterr().err
    assert err.startswith("usage: fused-opt-bench") and "must be at least 1, got 0" in err


def test_the_quality_script_runs_only_the_runs_asked_for(tmp_path, monkeypatch):
    path = REPO_ROOT / "benchmarks" / "state_dtype_quality.py"
    quality = load_repo_script("benchmarks/state_dtype_quality.py")
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(sys, "argv", [str(path), "--task", "mlp", "--steps", "2", "--runs", "Kahan,8-bit",
                                      "--output", str(tmp_path)])
    quality.main()
    text = (tmp_path / "quality-mlp-Kahan-8-bit.md").read_text()
    rows = [line.strip("| ").split(" | ")[0] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    expected = [name for name in [*quality.RUNS, *quality._peer_runs()]
                if name == quality.BASELINE or "Kahan" in name or "8-bit" in name]
    assert rows == expected and len(expected) >= 4
    assert "--runs Kahan,8-bit`" in text


def test_the_quality_script_tables_every_storage_tier_for_both_tasks(tmp_path, monkeypatch):
    path = REPO_ROOT / "benchmarks" / "state_dtype_quality.py"
    quality = load_repo_script("benchmarks/state_dtype_quality.py")
    # The script runs on one thread; the tests after this one keep theirs.
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    for task in ("lm", "mlp"):
        monkeypatch.setattr(sys, "argv", [str(path), "--task", task, "--steps", "3", "--output", str(tmp_path)])
        quality.main()
        text = (tmp_path / f"quality-{task}.md").read_text()
        rows = [line.strip("| ").split(" | ") for line in text.splitlines()
                if line.startswith("| ") and not line.startswith("| run")]
        # The peers' 8-bit runs come where bitsandbytes or torchao are installed.
        assert [row[0] for row in rows] == [*quality.RUNS, *quality._peer_runs()]
        numbers = {row[0]: [float(cell) for cell in row[1:]] for row in rows}
        assert all(math.isfinite(value) for row in numbers.values() for value in row)
        assert numbers[quality.BASELINE][1] == 1.0
        if task == "lm":
            floor = float(text.split("(the floor): ")[1].split(" nats")[0])
            # The source is far from uniform, and three steps leave every model near uniform.
            assert 0 < floor < math.log(quality.LM_VOCAB) - 1
            assert all(row[0] > floor + 1 for row in numbers.values())


def test_the_state_rounding_experiment_rounds_stochastically_without_bias(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    experiment = load_repo_script("benchmarks/state_rounding_experiment.py")
    # Blocks whose maximum is 1.0; their other elements lie 30% of the way from one unsigned code's
    # value to the next's, so rounding to nearest always goes down.
    scale = quantize.dequantize(quantize.quantize(torch.ones(1), False), 1, False).item() / quantize._max_value(False)
    low, high = (quantize._decode_magnitude(torch.tensor(code), False).item() * scale for code in (100, 101))
    value = low + 0.3 * (high - low)
    state = torch.full((64, quantize.BLOCK), value)
    state[:, 0] = 1.0
    flat = state.reshape(-1)

    nearest = state.clone()
    experiment.round_trip(nearest, False, None)
    assert torch.equal(nearest.reshape(-1), quantize.dequantize(quantize.quantize(flat, False), flat.numel(), False))
    assert nearest[:, 1:].unique().tolist() == [pytest.approx(low, rel=1e-6)]

    stochastic = state.clone()
    experiment.round_trip(stochastic, False, torch.Generator().manual_seed(0))
    others = stochastic[:, 1:]
    assert torch.equal(stochastic[:, 0], state[:, 0])
    assert others.unique().tolist() == [pytest.approx(low, rel=1e-6), pytest.approx(high, rel=1e-6)]
    # Unbiased: about 30% of the 16,320 elements went up (three standard deviations: 0.011).
    assert abs((others > value).double().mean().item() - 0.3) < 0.012
    assert abs(others.double().mean().item() - value) < 0.012 * (high - low)

    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(sys, "argv", ["state_rounding_experiment.py", "--task", "mlp", "--steps", "3",
                                      "--output", str(tmp_path)])
    experiment.main()
    text = (tmp_path / "state-rounding-mlp.md").read_text()
    rows = [line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    assert [row[0] for row in rows] == ["fused_opt.AdamW, float32 states", *experiment.VARIANTS]
    assert all(math.isfinite(float(row[1])) for row in rows)
