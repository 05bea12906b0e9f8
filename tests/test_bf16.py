"""bf16 on every family and task, on the CPU: what a GPU run computes in (bf16 weights, bf16
autocast), so a dtype problem shows here rather than first on a card. And the trainer's guard
against non-finite steps: a bad step is skipped and named, a run of them stops the run."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import registry_cases, tiny_recipe
from finetune import trainer
from finetune.errors import TrainingDiverged

CASES = registry_cases()


@pytest.mark.parametrize("case", CASES)
def test_two_bf16_steps_and_a_bf16_render_are_finite(case, clips, tmp_path, capsys):
    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render

    run = tmp_path / "run"
    recipe = tiny_recipe(case, clips, run, "model.dtype=bf16", "optim.steps=2", "checkpoint.every=0")
    result = trainer.train(recipe)
    out = capsys.readouterr().out
    assert "training on 1 process (cpu, bf16)" in out
    assert "skipped" not in out, out  # a step with a non-finite loss or gradient would have been skipped
    assert math.isfinite(result.last_loss)
    transformer = result.family.components.transformer
    assert transformer.dtype == torch.bfloat16 or any(
        p.dtype == torch.bfloat16 for p in transformer.parameters() if not p.requires_grad)
    saved = load_file(str(result.adapter))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k), "no update reached LoRA B"

    family, info = load_base([LoraRef(run)], None, torch.device("cpu"), torch.bfloat16)
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)
    apply_loras(family, [LoraRef(run)], merge=False)
    clip = clips.parent / "clip000.mp4"
    given = {}
    if family.task_input(family.task) == "image":
        from finetune.video import first_frame

        given["image"] = tmp_path / "first.png"
        first_frame(clip).save(given["image"])
    elif family.task_input(family.task) == "video":
        given["video"] = clip
    args = complete_args(RenderArgs(prompt="a red ball", steps=2, seed=0, **given), family, info)
    with torch.no_grad():
        frames = render(family, pipe, args)
    assert torch.isfinite(frames).all(), f"{case}: the bf16 render has NaN or infinite pixels"


class _NanGrad(torch.autograd.Function):
    """Identity forward; backward hands on NaN: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(monkeypatch, steps: set[int], kind: str) -> None:
    """Make the denoising loss of the given 1-based optimizer steps NaN (``kind="loss"``) or give it
    NaN gradients (``"grad"``). One micro-batch per step in these recipes."""
    real = trainer.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] in steps:
            return loss * float("nan") if kind == "loss" else _NanGrad.apply(loss)
        return loss

    monkeypatch.setattr(trainer, "denoising_loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_named(kind, clips, tmp_path, monkeypatch, capsys):
    clean = trainer.train(tiny_recipe("wan", clips, tmp_path / "clean", "optim.steps=3", "checkpoint.every=0"))
    _poison(monkeypatch, {2}, kind)
    bumpy = trainer.train(tiny_recipe("wan", clips, tmp_path / "bumpy", "optim.steps=3", "checkpoint.every=0"))
    out = capsys.readouterr().out
    what = "loss is nan" if kind == "loss" else "the gradient of transformer."
    assert f"warning: step 2 skipped: {what}" in out, out
    assert "1 of optim.max_bad_steps=3 in a row" in out
    if kind == "grad":
        assert "first non-finite gradient: transformer.blocks.0." in out  # the first LoRA parameter, named
    a, b = load_file(str(clean.adapter)), load_file(str(bumpy.adapter))
    assert all(torch.isfinite(v).all() for v in b.values())
    # the skipped step changed nothing: the bumpy run made one update fewer than the clean one
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bad_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(clips, tmp_path, monkeypatch):
    recipe = tiny_recipe("wan", clips, tmp_path / "run", "optim.steps=10", "checkpoint.every=4",
                         "optim.max_bad_steps=2")
    _poison(monkeypatch, {5, 6}, "grad")
    with pytest.raises(TrainingDiverged, match=r"at step 6: 2 bad steps in a row.*step-00000004 \(untouched\)"):
        trainer.train(recipe)
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "lora.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "step-00000008").exists()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_a_skipped_step_between_checkpoints_leaves_the_checkpoint_good(clips, tmp_path, monkeypatch):
    """A bad step at a checkpoint step: the checkpoint holds the weights before it, all finite."""
    _poison(monkeypatch, {4}, "grad")
    trainer.train(tiny_recipe("wan", clips, tmp_path / "run", "optim.steps=5", "checkpoint.every=4"))
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "lora.safetensors"))
    assert state and all(torch.isfinite(v).all() for v in state.values())
