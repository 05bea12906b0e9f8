"""bench/memory.py: the CPU smoke run end to end, the budget settings through the recipe machinery,
and the ratios and target checks it reports (the full-size GPU mode needs a CUDA GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import memory as bench  # noqa: E402  (bench/memory.py)


def test_tiny_run_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--tiny", "--cases", "wan", "--steps",
                          "1", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("case") and "s/step" in line and "meas/pred" in line and "MFU" in line for line in lines)
    assert any(line.startswith("wan") and "unconstrained (baseline)" in line for line in lines)
    assert any(line.startswith("wan") and "budget 16G" in line for line in lines)
    data = json.loads(out.read_text())
    (row,) = data["cases"]
    assert row["case"] == "wan" and data["tiny"] is True
    base, budget = row["results"]["unconstrained"], row["results"]["budget"]
    assert base["skipped"] is None and budget["skipped"] is None
    assert base["seconds_per_step"] > 0 and budget["seconds_per_step"] > 0
    assert budget["overrides"] == {"model.quantization": "fp8"}
    assert base["model_flops"] > 0  # counted by torch.utils.flop_counter, recompute left out
    assert row["budget_over_unconstrained_time"] == pytest.approx(budget["seconds_per_step"] / base["seconds_per_step"])
    for key in ("peak_allocated_gib", "peak_reserved_gib"):  # no CUDA allocator on a CPU
        assert key in base and base[key] is None


def test_budget_settings_come_from_the_planner_and_unrun_ones_are_skips(monkeypatch):
    recipe, overrides, skip = bench.config_recipe(bench.CASES["ltx-2b"], "budget")
    assert skip == "" and overrides == {"memory.text_encoder": "fp8"}
    assert recipe.memory.text_encoder == "fp8"
    # Wan 2.1 14B at 81 frames needs block swap and activation offload: the bench runs them as the trainer does
    recipe, overrides, skip = bench.config_recipe(bench.CASES["wan-14b"], "budget")
    assert overrides["memory.blocks_to_swap"] > 0 and overrides["memory.activation_offload"] is True
    assert skip == "" and recipe.memory.blocks_to_swap == overrides["memory.blocks_to_swap"]
    # a setting the bench does not apply itself is a skip line, never silently ignored
    monkeypatch.setattr(bench, "APPLIED", bench.APPLIED - {"memory.blocks_to_swap"})
    _, _, skip = bench.config_recipe(bench.CASES["wan-14b"], "budget")
    assert "memory.blocks_to_swap: not applied by bench/memory.py" in skip
    recipe, overrides, skip = bench.config_recipe(bench.CASES["wan-14b"], "unconstrained")
    assert (recipe.model.quantization, recipe.optim.optimizer, overrides, skip) == ("none", "adamw", {}, "")


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
    assert row["checks"] == {"budget peak <= 8 GiB": False, "budget s/step <= 1.3x unconstrained": False,
                             "unconstrained: measured within 10% of predicted": True,
                             "budget: measured within 10% of predicted": False}
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0 and bench.peak_tflops("cpu", None) is None
