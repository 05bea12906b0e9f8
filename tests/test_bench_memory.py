"""bench/memory.py: the CPU smoke run end to end (train_lora.py itself, in its own process per
configuration, rows written as they finish), the budget settings through the planner, and the
ratios and target checks it reports (the full-size GPU mode needs a CUDA GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import memory as bench  # noqa: E402  (bench/memory.py)


def test_tiny_run_prints_the_table_and_writes_each_row_as_it_finishes(tmp_path):
    out = tmp_path / "bench.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--tiny", "--cases", "wan", "--steps",
                          "1", "--json", str(out), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("case") and "s/step" in line and "meas/pred" in line and "MFU" in line for line in lines)
    assert any(line.startswith("wan") and "unconstrained (baseline)" in line for line in lines)
    assert any(line.startswith("wan") and "budget 16G" in line for line in lines)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == ["unconstrained", "budget"]
    base, budget = rows
    assert base["skipped"] is None and budget["skipped"] is None, (base, budget)
    assert base["seconds_per_step"] > 0 and budget["seconds_per_step"] > 0
    assert budget["overrides"] == {"model.quantization": "fp8", "memory.blocks_to_swap": 1,
                                   "memory.activation_offload": True}
    assert base["device"] == "cpu, fp32"
    # what train_lora.py wrote: two steps (one warm-up, one measured) in each run's metrics.jsonl
    for config in ("unconstrained", "budget"):
        metrics = (tmp_path / "work" / f"wan-{config}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["step"] for m in metrics] == [1, 2]
    for key in ("peak_allocated_gib", "peak_reserved_gib"):  # no CUDA allocator on a CPU
        assert base[key] is None
    # the host memory block swap and activation offload held, as the trainer reports it
    assert base["pinned_gib"] == 0 and budget["pinned_gib"] > 0


def test_a_failed_or_cut_off_configuration_is_a_row_saying_why(tmp_path, monkeypatch):
    """A run that fails (here: more swapped blocks than the tiny model has, a named error at load)
    or outlives its time cap costs only its own row, which says why."""
    case = bench.TINY_CASES["wan"]
    recipe = bench.base_recipe(case)

    monkeypatch.setattr(bench, "config_recipe", lambda c, config: (recipe, {"memory.blocks_to_swap": 99}, ""))
    monkeypatch.setattr(recipe.memory, "blocks_to_swap", 99)
    row = bench.run_config("wan", case, "unconstrained", 1, 300, tmp_path)
    assert row["skipped"].startswith("failed: memory.blocks_to_swap=99"), row["skipped"]
    row = bench.run_config("wan", case, "budget", 1, 0.5, tmp_path)
    assert row["skipped"] == "not finished in 0 s (--timeout)" or row["skipped"].startswith("not finished in")


def test_budget_settings_come_from_the_planner_and_fit():
    from finetune.memory.planner import apply_overrides, check_implemented, choose_overrides, plan_recipe

    for name in ("ltx-2b", "wan-14b"):
        case = bench.CASES[name]
        recipe, overrides, skip = bench.config_recipe(case, "budget")
        assert skip == ""
        base = bench.base_recipe(case)
        assert overrides == choose_overrides(base, case.budget_gb).overrides
        check_implemented(apply_overrides(base, overrides))
        assert plan_recipe(recipe).fits(case.budget_gb) and recipe.model.weights == "random"
    recipe, overrides, skip = bench.config_recipe(bench.CASES["wan-14b"], "unconstrained")
    assert (recipe.model.quantization, recipe.optim.optimizer, overrides, skip) == ("none", "adamw", {}, "")
    _, _, skip = bench.config_recipe(bench.CASES["wan-1.3b"], "budget")
    assert "no card budget" in skip


def test_ratios_and_target_checks():
    case = bench.CASES["ltx-2b"]
    results = {
        "unconstrained": {"config": "unconstrained", "seconds_per_step": 2.0, "peak_allocated_gib": 6.0,
                          "peak_reserved_gib": 6.5, "measured_over_predicted": 1.05, "model_flops": int(4e14)},
        "budget": {"config": "budget", "seconds_per_step": 2.8, "peak_allocated_gib": 7.0, "peak_reserved_gib": 8.5,
                   "measured_over_predicted": 0.85},
    }
    row = bench.summarise("ltx-2b", case, results, tflops=1000.0)
    assert row["budget_over_unconstrained_time"] == pytest.approx(1.4)
    assert row["mfu"] == pytest.approx(4e14 / 2.0 / 1e15)
    assert row["checks"] == {"budget peak reserved <= 8 GiB": False, "budget s/step <= 1.3x unconstrained": False,
                             "unconstrained: measured within 10% of predicted": True,
                             "budget: measured within 10% of predicted": False}
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0 and bench.peak_tflops("cpu", None) is None


def test_the_error_line_of_a_failed_run_is_ours_or_the_exception():
    assert bench._last_error("noise\nerror: data.frames=8 must be 4k+1\n") == "data.frames=8 must be 4k+1"
    assert bench._last_error("Traceback\n  File x\ntorch.OutOfMemoryError: CUDA out of memory. Tried") \
        .startswith("torch.OutOfMemoryError: CUDA out of memory")
