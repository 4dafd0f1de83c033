"""Tests of the benchmark package (fused_opt.bench): byte counts, workloads, interleaving, the result row
schema, and tiny end-to-end runs on CPU."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fused_opt.bench import harness, implementations, report
from fused_opt.bench.__main__ import main
from fused_opt.bench.implementations import CASES, select_cases, step_bytes_per_param
from fused_opt.bench.workloads import gpt2_shapes, make_workload

REPO_ROOT = Path(__file__).resolve().parents[1]

# From the field notes' table: each tensor counted once per read and once per write.
FIELD_NOTES_BYTES = {
    ("adam", "fp32"): 28,
    ("adamw", "fp32"): 28,
    ("sgd-momentum", "fp32"): 20,
    ("sgd-nesterov", "fp32"): 20,
    ("adagrad", "fp32"): 20,
    ("rmsprop", "fp32"): 20,
    ("rmsprop-centered-momentum", "fp32"): 36,
    ("adamw", "bf16"): 14,
}

OPTIONAL_STR = (str, type(None))
OPTIONAL_FLOAT = (float, type(None))
ROW_TYPES = {
    "timestamp": str, "device": str, "device_name": str, "torch_version": str,
    "fused_opt_version": OPTIONAL_STR, "git_commit": OPTIONAL_STR, "command": str,
    "load_average": OPTIONAL_FLOAT,
    "workload": str, "num_tensors": int, "case": str, "optimizer": str, "implementation": str, "status": str,
    "note": str, "dtype": str, "numel": int, "bytes_per_param": int,
    "rounds": int, "steps_per_round": int, "warmup_steps": int,
    "ms_median": OPTIONAL_FLOAT, "ms_min": OPTIONAL_FLOAT, "ms_max": OPTIONAL_FLOAT, "gbps": OPTIONAL_FLOAT,
    "frac_of_probe": OPTIONAL_FLOAT, "speedup_vs_fused_opt_median": OPTIONAL_FLOAT,
    "speedup_vs_fused_opt_min": OPTIONAL_FLOAT, "speedup_vs_fused_opt_max": OPTIONAL_FLOAT,
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step_bytes_count_each_tensor_read_and_written():
    assert step_bytes_per_param(n_states=2, element_size=4) == 28
    assert step_bytes_per_param(n_states=1, element_size=4) == 20
    assert step_bytes_per_param(n_states=3, element_size=4) == 36
    assert step_bytes_per_param(n_states=2, element_size=2) == 14
    # Stateless SGD moves what the a.add_(b) probe moves: read p and g, write p.
    assert step_bytes_per_param(n_states=0, element_size=4) == 12


def test_cases_carry_the_field_notes_byte_counts():
    assert {(case.name, case.dtype): case.bytes_per_param for case in CASES} == FIELD_NOTES_BYTES


def test_gpt2_small_has_148_tensors_and_124m_params():
    shapes = gpt2_shapes()
    assert len(shapes) == 148
    assert sum(torch.Size(shape).numel() for shape in shapes) == 124_439_808
    assert make_workload("gpt2", "cpu").numel == 124_439_808


def test_quick_workloads_keep_the_tensor_structure():
    assert make_workload("gpt2", "cpu", quick=True).num_tensors == 148
    assert make_workload("large", "cpu", quick=True).num_tensors == 1
    assert make_workload("large", "cpu").numel == 64_000_000
    assert make_workload("large", "cuda").numel == 1_000_000_000


def test_rounds_rotate_so_each_contender_takes_each_position():
    contenders = ["A", "B", "C", "probe"]
    orders = [harness.rotated(contenders, r) for r in range(len(contenders))]
    assert orders[1] == ["B", "C", "probe", "A"]
    for position in range(len(contenders)):
        assert sorted(order[position] for order in orders) == sorted(contenders)


def test_select_cases_by_optimizer_class_case_name_and_dtype():
    assert [case.name for case in select_cases(["sgd"], ["fp32"])] == ["sgd-momentum", "sgd-nesterov"]
    assert [case.name for case in select_cases(["sgd-nesterov"], ["fp32", "bf16"])] == ["sgd-nesterov"]
    assert [(case.name, case.dtype) for case in select_cases(["adamw"], ["bf16"])] == [("adamw", "bf16")]


def test_row_keys_are_the_documented_schema():
    assert set(report.ROW_KEYS) == set(ROW_TYPES)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run over every case and workload, into a results file that already holds a line."""
    output = tmp_path_factory.mktemp("bench")
    earlier_line = {"earlier": "run"}
    (output / "results.jsonl").write_text(json.dumps(earlier_line) + "\n")
    assert main(["--quick", "--device", "cpu", "--output", str(output)]) == 0
    lines = read_jsonl(output / "results.jsonl")
    assert lines[0] == earlier_line, "results.jsonl must be appended to, not overwritten"
    return output, lines[1:]


def test_quick_run_rows_follow_the_schema(quick_run):
    _, rows = quick_run
    assert rows
    for row in rows:
        assert list(row) == list(report.ROW_KEYS)
        for key, expected_type in ROW_TYPES.items():
            assert isinstance(row[key], expected_type), (key, row[key])


def test_quick_run_covers_every_case_workload_and_implementation(quick_run):
    _, rows = quick_run
    measured = {(row["workload"], row["case"], row["dtype"], row["implementation"]) for row in rows}
    implementation_names = implementations.implementation_names(implementations.load_fused_opt())
    for workload in ("large", "gpt2"):
        for case, dtype in FIELD_NOTES_BYTES:
            for name in implementation_names + ["probe-inplace-add"]:
                probe_dtype = "fp32" if name.startswith("probe") else dtype
                assert (workload, case, probe_dtype, name) in measured


def test_quick_run_values_are_sensible(quick_run):
    _, rows = quick_run
    for row in rows:
        assert row["status"] in ("ok", "skipped", "error"), row
        assert row["device"] == "cpu" and row["rounds"] == 3 and row["steps_per_round"] == 2
        if row["implementation"] == "probe-inplace-add":
            assert row["bytes_per_param"] == 12 and row["frac_of_probe"] == 1.0
        else:
            assert row["bytes_per_param"] == FIELD_NOTES_BYTES[(row["case"], row["dtype"])]
            assert row["numel"] == make_workload(row["workload"], "cpu", quick=True).numel
        if row["status"] != "ok":
            assert row["note"] and row["ms_median"] is None
            continue
        assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["gbps"] > 0 and row["frac_of_probe"] > 0
        if row["implementation"] == implementations.REFERENCE:
            assert row["speedup_vs_fused_opt_median"] == 1.0
            assert row["speedup_vs_fused_opt_min"] == row["speedup_vs_fused_opt_max"] == 1.0
        elif row["speedup_vs_fused_opt_median"] is not None:
            assert (0 < row["speedup_vs_fused_opt_min"] <= row["speedup_vs_fused_opt_median"]
                    <= row["speedup_vs_fused_opt_max"])


def test_quick_run_skips_torch_fused_only_where_torch_has_no_fused_kernel(quick_run):
    _, rows = quick_run
    fused = {(row["workload"], row["case"], row["dtype"]): row["status"]
             for row in rows if row["implementation"] == "torch-fused"}
    for (workload, case, dtype), status in fused.items():
        assert status == ("skipped" if case.startswith("rmsprop") else "ok"), (workload, case, dtype)


def test_quick_run_writes_the_markdown_tables(quick_run):
    output, rows = quick_run
    markdown = (output / "latest-cpu.md").read_text()
    assert "## large: 1 tensor," in markdown and "## gpt2: 148 tensors," in markdown
    assert "| case | dtype | implementation |" in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_lines) == len(rows) + 2  # one header per workload


def test_failing_implementation_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    class FailingSGD(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("injected failure")

    # A fused_opt stand-in whose SGD fails in step() and which has no RMSprop at all.
    stand_in = types.SimpleNamespace(SGD=FailingSGD, __version__="stand-in")
    monkeypatch.setattr(implementations, "load_fused_opt", lambda: stand_in)
    assert main(["--quick", "--device", "cpu", "--workloads", "gpt2", "--optimizers", "sgd-momentum,rmsprop",
                 "--dtypes", "fp32", "--rounds", "2", "--output", str(tmp_path)]) == 0
    rows = {(row["case"], row["implementation"]): row for row in read_jsonl(tmp_path / "results.jsonl")}
    assert rows[("sgd-momentum", "fused_opt")]["status"] == "error"
    assert "injected failure" in rows[("sgd-momentum", "fused_opt")]["note"]
    assert rows[("rmsprop", "fused_opt")]["status"] == "error"
    assert "AttributeError" in rows[("rmsprop", "fused_opt")]["note"]
    assert rows[("sgd-momentum", "torch-forloop")]["status"] == "ok"
    assert rows[("sgd-momentum", "torch-forloop")]["speedup_vs_fused_opt_median"] is None
    assert rows[("sgd-momentum", "torch-forloop")]["fused_opt_version"] == "stand-in"
    assert "error: RuntimeError: injected failure" in capsys.readouterr().out


def test_without_fused_opt_torch_optim_alone_is_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fused_opt", None)  # makes `import fused_opt` raise ImportError
    assert main(["--quick", "--device", "cpu", "--workloads", "large", "--optimizers", "adam", "--dtypes",
                 "fp32", "--rounds", "2", "--output", str(tmp_path)]) == 0
    assert "measuring torch.optim only" in capsys.readouterr().err
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [row["implementation"] for row in rows] == [
        "torch-forloop", "torch-foreach", "torch-fused", "probe-inplace-add"]
    assert all(row["speedup_vs_fused_opt_median"] is None and row["fused_opt_version"] is None for row in rows)


def test_command_line_entry_point(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "fused_opt.bench", "--quick", "--device", "cpu", "--workloads", "large",
         "--optimizers", "sgd", "--dtypes", "fp32", "--rounds", "2", "--output", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("large: 1 tensor, 1.0M params, cpu")
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert {row["case"] for row in rows} == {"sgd-momentum", "sgd-nesterov"}
    assert all(row["command"].startswith("python -m fused_opt.bench --quick") for row in rows)
