"""SIGTERM / SIGINT during training, as a scheduler or Ctrl-C sends them, on the real script.
The signal is sent by the process to itself from inside a known step, so the test is
deterministic without sleeping."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_clips
from test_scripts import ACCELERATE, run, tiny_args

# Wrap the step function to send STOP_SIGNAL to this process (to process STOP_RANK only, under a
# multi-process launch) while step STOP_AT runs; with
# AGAIN=1 send it a second time right after the stop checkpoint's state is written (before it
# is renamed into place): the user pressing Ctrl-C twice at the worst moment.
SIGNAL_DURING_STEP = """
import os, runpy, sys
import accelerate
import finetune.trainer as t
sig, at, again = int(os.environ["STOP_SIGNAL"]), int(os.environ["STOP_AT"]), os.environ.get("AGAIN") == "1"
rank = int(os.environ.get("STOP_RANK", os.environ.get("RANK", "0")))
real_step, real_save = t.accumulate_gradients, accelerate.Accelerator.save_state
def step(accelerator, *args):  # the step index comes last
    if args[-1] == at and accelerator.process_index == rank:
        os.kill(os.getpid(), sig)
    return real_step(accelerator, *args)
def save(self, output_dir=None, **kw):
    out = real_save(self, output_dir, **kw)
    if again and output_dir.endswith(f".tmp-step-{at + 1:08d}"):
        os.kill(os.getpid(), sig)
    return out
t.accumulate_gradients = step
accelerate.Accelerator.save_state = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

COMMON = ("optim.steps=6", "checkpoint.every=2", "optim.grad_accum=2", "lora.dropout=0.1", "optim.scheduler=cosine",
          "optim.warmup_steps=2")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"), n=2, frames=12, height=32, width=32)


@pytest.mark.slow
def test_sigterm_saves_then_resume_matches_an_uninterrupted_run(manifest, tmp_path):
    straight = run([sys.executable, *tiny_args("wan", manifest, tmp_path / "a", *COMMON)])
    assert straight.returncode == 0, straight.stderr[-3000:]

    args = tiny_args("wan", manifest, tmp_path / "b", *COMMON)
    stopped = run([sys.executable, "-c", SIGNAL_DURING_STEP, *args], STOP_SIGNAL=str(int(signal.SIGTERM)), STOP_AT="2")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000003"
    assert (f"stopped: SIGTERM after step 3 of 6; saved checkpoint {ckpt} and adapter "
            f"{tmp_path / 'b' / 'pytorch_lora_weights.safetensors'}. Resume with:\n  python train_lora.py "
            f"--recipe recipes/tiny/wan.yaml") in stopped.stderr
    assert stopped.stderr.rstrip().endswith("--resume latest")
    assert (ckpt / "lora.safetensors").is_file()
    assert load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))  # the adapter as it stands
    assert json.loads((tmp_path / "b" / "video_lora.json").read_text())["steps"] == 3
    assert not (tmp_path / "b" / "train.lock").read_text()  # released

    resumed = run([sys.executable, *args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_second_sigint_aborts_and_the_last_checkpoint_still_loads(manifest, tmp_path):
    args = tiny_args("wan", manifest, tmp_path / "run", *COMMON)
    aborted = run([sys.executable, "-c", SIGNAL_DURING_STEP, *args], STOP_SIGNAL=str(int(signal.SIGINT)), STOP_AT="2",
                  AGAIN="1")
    assert aborted.returncode == -signal.SIGINT, aborted.stderr[-3000:]
    assert "SIGINT received: finishing this step" in aborted.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".tmp-step-00000003").is_dir()  # the interrupted save, never renamed
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002"]

    resumed = run([sys.executable, *args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2" in resumed.stdout
    assert f"note: took over {tmp_path / 'run' / 'train.lock'}, left by PID" in resumed.stdout


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(manifest, tmp_path):
    wrapper = tmp_path / "signal_during_step.py"
    wrapper.write_text(SIGNAL_DURING_STEP)
    out = tmp_path / "run"
    res = run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "29518", str(wrapper),
               *tiny_args("wan", manifest, out, "optim.steps=6", "checkpoint.every=0")],
              ACCELERATE_USE_CPU="true", STOP_SIGNAL=str(int(signal.SIGTERM)), STOP_AT="1", STOP_RANK="1")
    assert res.returncode != 0
    assert "stopped: SIGTERM after step 2 of 6" in res.stderr  # the process that got the signal
    assert "stopped: a signal on another process after step 2 of 6" in res.stderr  # the one that did not
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
