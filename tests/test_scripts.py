"""The real entry scripts, run as a user runs them: accelerate launch, infer.py, resume after
SIGKILL, two processes, and bad input that must end in one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, registry_cases, tiny_recipe_path, write_clips
from finetune.cli import USER_ERROR_EXIT
from finetune.video import probe_frames

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# Run the script with save_checkpoint wrapped to SIGKILL the process right after the first
# checkpoint is complete: a crash at the worst moment, deterministically.
KILL_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
import finetune.checkpoint as c
real = c.save_checkpoint
def save_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
c.save_checkpoint = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def tiny_args(family: str, manifest: Path, out: Path, *extra: str) -> list[str]:
    """train_lora.py arguments for the tiny recipe of ``family`` ("family" or "family:task")."""
    return ["train_lora.py", "--recipe", str(tiny_recipe_path(family).relative_to(ROOT)), f"data.manifest={manifest}",
            f"output.dir={out}", *extra]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"), n=2, frames=12, height=64, width=64)


def in_process(script: str, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """``script``'s main(argv) in this process, as its ``__main__`` calls it (run_main: a user error is
    an exit code and one ``error:`` line): the same parsing and code as the command line, without a
    new interpreter's imports."""
    import importlib.util

    from finetune.cli import run_main

    name = f"_script_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    capsys.readouterr()
    code = run_main(sys.modules[name].main, argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], code, out, err)


def train_then_infer(family: str, manifest: Path, tmp_path: Path, train, infer, steps: int, every: int) -> None:
    """Train the tiny recipe of ``family`` ("family:task") for ``steps`` steps with a checkpoint every
    ``every`` through ``train`` (argv -> CompletedProcess), check the run folder, then render through
    ``infer`` (the task's input missing or a wrong one first: a named error)."""
    import yaml

    data = yaml.safe_load(tiny_recipe_path(family).read_text())["data"]
    frames, size = data["frames"], data["height"]
    assert data["width"] == size
    out = tmp_path / "run"
    res = train(tiny_args(family, manifest, out, f"optim.steps={steps}", f"checkpoint.every={every}")[1:])
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("pytorch_lora_weights.safetensors", "comfyui_lora.safetensors", "video_lora.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "seconds_per_step", "peak_memory_gb"} <= set(scalars)
    saved = [f"step-{s:08d}" for s in range(every, steps, every)][-3:]  # checkpoint.keep_last: 3
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == saved
    info = json.loads((out / "video_lora.json").read_text())
    name, task = family.split(":")
    assert info["family"] == name and info["task"] == task and info["tiny"] and info["trigger"] == "mystyle"
    assert info["recipe"]["optim"]["steps"] == steps
    assert all((out / f).is_file() for f in info["adapters"].values())

    video = tmp_path / "lora.mp4"
    from finetune.families import get_family

    kind = get_family(name).task_input(task)  # what the task renders from: None, "image" or "video"
    given = {"image": str(first_frame_png(manifest, tmp_path)), "video": str(manifest.parent / "clip000.mp4")}
    inputs = [f"--{kind}", given[kind]] if kind else []
    args = ["--lora", f"{out}:0.8", "--prompt", "mystyle, a square", "--steps", "2", "--out", str(video)]
    if kind:  # an i2v / continuation adapter without its input is a named error, not a traceback
        res = infer(args)
        assert res.returncode == USER_ERROR_EXIT and f"--{kind} PATH is required" in res.stderr, res.stderr[-2000:]
    else:  # and a t2v one given an image
        res = infer([*args, "--image", given["image"]])
        assert res.returncode == USER_ERROR_EXIT and "takes no conditioning image" in res.stderr, res.stderr[-2000:]
    res = infer([*args, *inputs])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"video: {video}" in res.stdout
    n, h, w, fps = probe_frames(video)
    assert (n, h, w) == (frames, size, size) and fps == 8


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan:t2v", "wan:i2v"])
def test_accelerate_launch_then_infer(family, manifest, tmp_path):
    """The documented commands, each in its own interpreter: accelerate launch train_lora.py, then
    python infer.py. The same for every family in-process below."""
    launch = [*ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "train_lora.py"]
    train_then_infer(family, manifest, tmp_path, lambda argv: run([*launch, *argv]),
                     lambda argv: run([sys.executable, "infer.py", *argv]), steps=12, every=5)


@pytest.mark.slow
@pytest.mark.parametrize("family", registry_cases())
def test_train_lora_then_infer_every_family(family, manifest, tmp_path, capsys):
    """train_lora.py's and infer.py's main for every family and task, in this process."""
    train_then_infer(family, manifest, tmp_path, lambda argv: in_process("train_lora.py", argv, capsys),
                     lambda argv: in_process("infer.py", argv, capsys), steps=5, every=2)


def first_frame_png(manifest: Path, folder: Path) -> Path:
    from finetune.video import first_frame

    path = folder / "first.png"
    first_frame(manifest.parent / "clip000.mp4").save(path)
    return path


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(manifest, tmp_path):
    common = ("optim.steps=8", "checkpoint.every=4", "optim.grad_accum=2", "lora.dropout=0.1", "optim.scheduler=cosine",
              "optim.warmup_steps=2")
    straight = run([sys.executable, *tiny_args("wan", manifest, tmp_path / "a", *common)])
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, *tiny_args("wan", manifest, tmp_path / "b", *common)])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "b" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()

    resumed = run([sys.executable, *tiny_args("wan", manifest, tmp_path / "b", *common), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_train_with_gloo(manifest, tmp_path):
    out = tmp_path / "run"
    res = run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "29517",
               *tiny_args("wan", manifest, out, "optim.steps=4", "checkpoint.every=2")], ACCELERATE_USE_CPU="true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["comfyui_lora.safetensors", "pytorch_lora_weights.safetensors"]
    assert (out / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()


@pytest.mark.slow
def test_bad_input_exits_with_a_message_not_a_traceback(tmp_path):
    res = run([sys.executable, *tiny_args("wan", tmp_path / "missing.jsonl", tmp_path / "run")])
    assert res.returncode == USER_ERROR_EXIT
    assert "Traceback" not in res.stderr
    assert f"error: data.manifest={tmp_path / 'missing.jsonl'}: file not found" in res.stderr
