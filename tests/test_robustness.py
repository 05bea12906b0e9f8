"""Nothing lost, nothing corrupted, no traceback (issue 12), in process: damaged clips, captions,
cache entries, checkpoints and adapter files; the resume recipe check; disk space; the run lock;
the stop flag across processes. The signal and second-process cases run as subprocesses in
test_stop_and_lock.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import infer
import train_lora
from conftest import ROOT, tiny_recipe, write_clips
from finetune import checkpoint as ckpt
from finetune import diskspace, stopping, trainer
from finetune.adapters import read_adapter_file
from finetune.cache import build_cache
from finetune.cli import USER_ERROR_EXIT, run_main
from finetune.data import load_manifest
from finetune.errors import AdapterError, CheckpointError, DataError, DiskSpaceError, RunLocked
from finetune.families import get_family
from finetune.runlock import LOCK_FILE, RunLock


def _train_cli(capsys, manifest, out, *extra):
    rc = run_main(train_lora.main, ["--recipe", str(ROOT / "recipes/tiny/wan.yaml"), f"data.manifest={manifest}",
                                    f"output.dir={out}", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------- damaged clips and captions


def test_one_damaged_clip_of_five_is_skipped_and_listed(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=5, frames=9, height=32, width=32)
    (tmp_path / "c" / "clip004.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    rc, out, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=2", "checkpoint.every=0")
    assert rc == 0, err
    assert "warning: skipped 1 of 5 clips: clip004.mp4 (cannot open video" in out
    assert "training on the other 4" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped_clips.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["clip004.mp4"] and "cannot open video" in rows[0]["reason"]
    assert "cache: 4 clips encoded" in out

    rc, _, err = _train_cli(capsys, manifest, tmp_path / "strict", "optim.steps=1", "data.strict=true")
    assert rc == USER_ERROR_EXIT
    assert "data.strict=true and 1 of 5 clips: clip004.mp4 (cannot open video" in err


def test_every_kind_of_bad_clip_is_named_with_its_reason(tmp_path):
    manifest = write_clips(tmp_path / "c", n=3, frames=9, height=32, width=32)
    write_clips(tmp_path / "short", n=1, frames=4, height=32, width=32)
    (tmp_path / "c" / "clip001.mp4").write_bytes((tmp_path / "short" / "clip000.mp4").read_bytes())
    (tmp_path / "c" / "clip002.mp4").write_bytes(b"garbage")
    recipe = tiny_recipe("wan", manifest, tmp_path / "run")
    fam = get_family("wan").load(trainer.model_spec(recipe, torch.device("cpu")))
    entries, stats = build_cache(fam, load_manifest(manifest), trainer.cache_key(recipe, fam), tmp_path / "cache",
                                 show_progress=False)
    assert len(entries) == 1
    reasons = {c.path.name: r for c, r in stats.skipped}
    assert reasons["clip001.mp4"].startswith("clip too short: 4 frames at 8 fps, the recipe needs data.frames=9")
    assert reasons["clip002.mp4"].startswith("cannot open video")


def test_a_caption_that_cannot_be_encoded_skips_its_clip(capsys, tmp_path, monkeypatch):
    manifest = write_clips(tmp_path / "c", n=2, frames=9, height=32, width=32,
                           captions=["a fine caption", "a caption the tokenizer chokes on"])
    wan = get_family("wan")
    real = wan.encode_prompts

    def picky(self, prompts):
        if "chokes" in prompts[0]:
            raise ValueError("token id out of range")
        return real(self, prompts)

    monkeypatch.setattr(wan, "encode_prompts", picky)
    rc, out, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=1", "checkpoint.every=0")
    assert rc == 0, err
    assert ("skipped 1 of 2 clips: clip001.mp4 (caption 'mystyle, a caption the tokenizer chokes on' cannot be "
            "encoded (ValueError: token id out of range))") in out


def test_no_usable_clip_is_an_error(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=2, frames=9, height=32, width=32)
    for i in range(2):
        (tmp_path / "c" / f"clip00{i}.mp4").write_bytes(b"")
    rc, _, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=1")
    assert rc == USER_ERROR_EXIT
    assert "no usable clip; 2 of 2 clips: clip000.mp4 (cannot open video" in err and "Traceback" not in err


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
    manifest = write_clips(tmp_path / "c", n=2, frames=9, height=32, width=32)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run")
    fam = get_family("wan").load(trainer.model_spec(recipe, torch.device("cpu")))
    key, clips = trainer.cache_key(recipe, fam), load_manifest(manifest)
    entries, _ = build_cache(fam, clips, key, tmp_path / "cache", show_progress=False)
    good = entries[0].latents.read_bytes()
    entries[0].latents.write_bytes(good[: len(good) // 2])  # a copy cut short
    entries[1].text.write_bytes(b"not safetensors")
    again, stats = build_cache(fam, clips, key, tmp_path / "cache", show_progress=False)
    assert (stats.damaged, stats.latents_computed, stats.text_computed) == (1, 1, 1)
    assert entries[0].latents.read_bytes() == good  # seeded by the fingerprint: the same bytes again
    from finetune.cache import CachedDataset

    assert CachedDataset(again)[1]["prompt_embeds"].ndim == 2


# ---------------------------------------------------------------------------- disk space


def test_too_little_space_for_the_cache_fails_before_writing(capsys, tmp_path, monkeypatch):
    manifest = write_clips(tmp_path / "c", n=2, frames=9, height=32, width=32)
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 200_000)
    rc, _, err = _train_cli(capsys, manifest, tmp_path / "run", f"cache.dir={tmp_path / 'cache'}")
    assert rc == USER_ERROR_EXIT
    assert re.search(r"error: not enough disk space for the cache \(2 clips, 2 captions to encode\): it needs about "
                     r"[\d.]+ MB but only 200.0 KB is free", err)
    assert "set cache.dir to a folder on a bigger disk" in err
    assert not (tmp_path / "cache").exists()


def test_too_little_space_for_a_checkpoint_fails_before_writing(capsys, tmp_path, monkeypatch):
    manifest = write_clips(tmp_path / "c", n=1, frames=9, height=32, width=32)
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 10**12 if "checkpoints" not in str(folder) else 1000)
    rc, _, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=4", "checkpoint.every=2")
    assert rc == USER_ERROR_EXIT
    assert "error: not enough disk space for checkpoint step 2: it needs about" in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))


# ---------------------------------------------------------------------------- resume: recipe and damaged checkpoints


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 3 (keep_last 2 keeps both)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    manifest = write_clips(tmp / "c", n=1, frames=9, height=32, width=32)
    trainer.train(tiny_recipe("wan", manifest, tmp / "run", "optim.steps=4", "checkpoint.every=1"))
    return manifest, tmp / "run"


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def test_resume_with_a_changed_rank_lists_each_fatal_change(capsys, checkpointed, tmp_path):
    manifest, run = checkpointed
    rc, _, err = _train_cli(capsys, manifest, run, "optim.steps=4", "lora.rank=16", "model.tiny_seed=1",
                            "--resume", "latest")
    assert rc == USER_ERROR_EXIT
    assert "Traceback" not in err and "size mismatch" not in err
    assert f"error: --resume {run}/checkpoints/step-00000003: 2 recipe changes since the checkpoint make its " \
           f"state meaningless:\n  - lora.rank: 8 in the checkpoint, 16 now\n  - model.tiny_seed: 0 in the " \
           f"checkpoint, 1 now\nput these back as they were" in err


def test_resume_with_safe_and_risky_changes_notes_and_warns(capsys, checkpointed, tmp_path):
    manifest, run = checkpointed
    run = _copy_run(run, tmp_path / "run")
    rc, out, err = _train_cli(capsys, manifest, run, "optim.steps=5", "checkpoint.every=1", "optim.lr=5e-4",
                              "--resume", "latest")
    assert rc == 0, err
    assert "note: resuming with changed settings (safe): optim.steps 4 -> 5" in out
    assert "warning: resuming with changed settings that alter training from here on: optim.lr 0.001 -> 0.0005" in out
    assert "resumed from" in out and "at step 3" in out


def test_recipe_comparison_sorts_fields_generically():
    old = {"model": {"family": "wan", "task": "t2v"}, "lora": {"rank": 8, "targets": None},
           "optim": {"lr": 1e-3, "steps": 10, "optimizer": "adamw"}, "checkpoint": {"every": 5},
           "data": {"manifest": "a.jsonl"}, "validation": {"prompts": []}}
    new = {"model": {"family": "wan", "task": "i2v", "new_field": 1}, "lora": {"rank": 8, "targets": ["to_q"]},
           "optim": {"lr": 2e-3, "steps": 20, "optimizer": "adamw8bit"}, "checkpoint": {"every": 7},
           "data": {"manifest": "b.jsonl"}, "validation": {"prompts": ["x"]}}
    diff = ckpt.compare_recipes(old, new)
    assert [f for f, _, _ in diff["fatal"]] == ["lora.targets", "model.task", "optim.optimizer"]
    assert [f for f, _, _ in diff["safe"]] == ["checkpoint.every", "optim.steps", "validation.prompts"]
    assert [f for f, _, _ in diff["warn"]] == ["data.manifest", "optim.lr"]


def test_resume_with_fewer_steps_than_done_is_named(capsys, checkpointed):
    manifest, run = checkpointed
    rc, _, err = _train_cli(capsys, manifest, run, "optim.steps=3", "--resume", "latest")
    assert rc == USER_ERROR_EXIT
    assert "optim.steps: 3 now, but the checkpoint is already at step 3 (raise optim.steps above 3" in err


@pytest.mark.parametrize("damage", ["lora", "state", "optimizer"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_suggested(damage, capsys, checkpointed, tmp_path):
    manifest, run = checkpointed
    run = _copy_run(run, tmp_path / "run")
    latest = run / "checkpoints" / "step-00000003"
    if damage == "lora":
        (latest / "lora.safetensors").write_bytes((latest / "lora.safetensors").read_bytes()[:100])
    elif damage == "state":
        (latest / "trainer_state.json").write_text("{\"step\": ")
    else:
        (latest / "optimizer.bin").unlink()
    rc, _, err = _train_cli(capsys, manifest, run, "optim.steps=4", "--resume", "latest")
    assert rc == USER_ERROR_EXIT, err
    assert "Traceback" not in err and f"{latest}" in err
    assert f"--resume {run / 'checkpoints' / 'step-00000002'}" in err
    assert {"lora": "damaged checkpoint (lora.safetensors unreadable: Error while deserializing header", "state": "damaged checkpoint (trainer_state.json unreadable)",
            "optimizer": "damaged checkpoint (optimizer.bin missing)"}[damage] in err


def test_a_checkpoint_that_does_not_load_is_a_checkpoint_error(checkpointed, tmp_path):
    class Refusing:
        def load_state(self, path):
            raise RuntimeError("Error(s) in loading state_dict: size mismatch for lora_A")

    with pytest.raises(CheckpointError, match=r"step-00000003: cannot be loaded into this run \(RuntimeError: Error"):
        ckpt.load_checkpoint(Refusing(), checkpointed[1] / "checkpoints" / "step-00000003")


# ---------------------------------------------------------------------------- adapter files


def test_adapter_files_missing_damaged_pickled_or_foreign_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4),
               "blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2)}, str(good))
    assert set(read_adapter_file(good)) == {"blocks.0.attn.to_q.lora_A.weight", "blocks.0.attn.to_q.lora_B.weight"}
    with pytest.raises(AdapterError, match="gone.safetensors: adapter file not found"):
        read_adapter_file(tmp_path / "gone.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(AdapterError, match=r"cut.safetensors: not a readable safetensors file \(.*\); the file is "
                                           r"damaged"):
        read_adapter_file(cut)
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(AdapterError, match=r"\(a torch.save pickle; convert it to .safetensors\)"):
        read_adapter_file(pickled)
    foreign = tmp_path / "full.safetensors"
    save_file({"blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, str(foreign))
    with pytest.raises(AdapterError, match=r"no LoRA weights in it \(1 tensors, e.g. blocks.0.attn.to_q.weight\)"):
        read_adapter_file(foreign)


def test_infer_on_a_run_with_a_damaged_adapter_is_a_named_error(capsys, checkpointed, tmp_path):
    run = _copy_run(checkpointed[1], tmp_path / "run")
    adapter = run / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:64])
    rc = run_main(infer.main, ["--lora", str(run), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == USER_ERROR_EXIT
    assert f"error: {adapter}: not a readable safetensors file (" in err and "Traceback" not in err
    (run / "video_lora.json").write_text("{\"family\": ")
    rc = run_main(infer.main, ["--lora", str(run), "--prompt", "x"])
    assert rc == USER_ERROR_EXIT
    assert f"error: {run / 'video_lora.json'}: damaged run description (JSONDecodeError" in capsys.readouterr().err


def test_damaged_lora_files_for_import_and_init_from_are_named(capsys, tmp_path):
    from finetune.lora_formats import read_info, read_lora

    cut = tmp_path / "civitai_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 4)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-8])
    for read in (read_info, lambda p: read_lora(p, get_family("wan").comfyui_key_map())):
        with pytest.raises(AdapterError, match="civitai_lora.safetensors: not a readable safetensors file"):
            read(cut)
    rc = run_main(infer.main, ["--lora", str(cut), "--family", "wan", "--prompt", "x"])
    assert rc == USER_ERROR_EXIT
    assert f"error: {cut}: not a readable safetensors file (" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run lock


HOLD_LOCK = """
import sys, time
from finetune.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_folder_names_the_holder(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=1, frames=9, height=32, width=32)
    holder = _holder(tmp_path / "run")
    try:
        rc, _, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=1")
    finally:
        holder.kill()
        holder.wait()
    assert rc == USER_ERROR_EXIT
    assert f"error: output.dir={tmp_path / 'run'} is in use by another training run (PID {holder.pid} on " in err
    assert f"kill -TERM {holder.pid} saves a checkpoint" in err
    assert not (tmp_path / "run" / "recipe.yaml").exists()

    # The holder died without releasing: the next run takes the lock over, with a note.
    rc, out, err = _train_cli(capsys, manifest, tmp_path / "run", "optim.steps=1", "checkpoint.every=0")
    assert rc == 0, err
    assert f"note: took over {tmp_path / 'run' / LOCK_FILE}, left by PID {holder.pid} which is no longer running" in out
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # released on a clean exit


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"PID {os.getpid()} "):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path, note=pytest.fail):  # released cleanly: no takeover note
        pass


# ---------------------------------------------------------------------------- stop flag


class _Ranks:
    """Stands in for an Accelerator of ``n`` processes whose all-reduce adds ``others`` (the
    flags the other processes hold) to this process's flag."""

    def __init__(self, n: int, others: int):
        self.num_processes, self.device, self.is_main_process, self.others = n, torch.device("cpu"), True, others

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.others


def test_a_stop_on_any_process_stops_all():
    stop = stopping.GracefulStop(note=lambda msg: None)
    assert not stop.requested(_Ranks(1, 0)) and not stop.requested(_Ranks(2, 0))
    assert stop.requested(_Ranks(2, signal.SIGTERM))  # another process got the signal
    stop.signum = signal.SIGINT
    assert stop.requested(_Ranks(1, 0)) and stop.requested(_Ranks(4, 0))


def test_first_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    notes = []
    with stopping.GracefulStop(note=notes.append) as stop:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and "SIGTERM received: finishing this step" in notes[0]
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_outside_the_loop_is_a_short_message(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(interrupted, []) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "stopped: interrupted (Ctrl-C)\n"


def test_resume_command_replaces_any_resume(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert stopping.resume_command(["train_lora.py", "--recipe", "r.yaml", "--resume", "runs/x/c", "optim.lr=1e-4"]) \
        == "python train_lora.py --recipe r.yaml optim.lr=1e-4 --resume latest"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert stopping.resume_command(["train_lora.py", "data.trigger=my style"]).startswith(
        "accelerate launch train_lora.py 'data.trigger=my style' --resume latest")
