"""bench/gpu_check.py without a GPU: its help, and its tiny part end to end on the CPU (data_prep
clips, 3 bf16 training steps with fp8 + block swap + activation offload, a render) for one family."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_help_runs_without_a_gpu():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "--quick" in res.stdout and "--minutes" in res.stdout


def test_the_tiny_part_runs_and_prints_one_table(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--quick", "--families", "wan",
                          "--work", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.index("gpu_check on cpu"):].splitlines()
    assert table[0].startswith("gpu_check on cpu: 2 ok, 0 failed, 1 skipped")
    rows = {line.split()[1]: line for line in table[2:]}
    assert "ok" in rows["wan:t2v"] and "fp8 + swap + offload" in rows["wan:t2v"]
    assert "ok" in rows["wan:i2v"]
    assert "skipped" in rows["wan"] and "needs a CUDA GPU" in rows["wan"]  # the nf4 folder row
    assert (tmp_path / "render-wan-t2v.mp4").stat().st_size > 0 and (tmp_path / "render-wan-i2v.mp4").is_file()
