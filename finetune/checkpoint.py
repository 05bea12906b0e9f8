"""Resumable checkpoints: ``<run>/checkpoints/step-00000050/`` written by accelerate's
``save_state`` (optimizer, LR scheduler, RNG states) with the LoRA weights alone instead of the
whole transformer, plus ``trainer_state.json`` holding the step. A checkpoint is written under a
temporary name and renamed when complete, so "latest" is always a whole checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError

PREFIX = "step-"
LORA_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """``resume`` is "latest" or a checkpoint folder. Raises CheckpointError if there is none."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {checkpoints_dir(run_dir)} "
                f"(train without --resume to start fresh, or set checkpoint.every so runs save some)"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); "
                              f"use --resume latest or a folder under {checkpoints_dir(run_dir)}")
    return path


def read_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def lora_file(index: int) -> str:
    """Checkpoint file of the ``index``-th trained transformer (two-expert models have two)."""
    return LORA_FILE if index == 0 else LORA_FILE.replace(".safetensors", f"_{index}.safetensors")


def register_lora_hooks(accelerator, transformers: list[torch.nn.Module]) -> None:
    """Make ``save_state``/``load_state`` store only the LoRA weights of ``transformers`` (in the
    order they were prepared), one file each."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if accelerator.is_main_process:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                          os.path.join(output_dir, lora_file(i)))
        weights.clear()  # the whole models are not saved

    def load_hook(models, input_dir):
        for i, wrapped in enumerate(list(models)):
            model = accelerator.unwrap_model(wrapped)
            result = set_peft_model_state_dict(model, load_file(os.path.join(input_dir, lora_file(i))))
            if result.unexpected_keys:
                raise CheckpointError(f"{input_dir}: LoRA weights do not fit this model "
                                      f"({len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[0]})")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write checkpoint ``step`` (all processes call this) and prune to ``keep_last``."""
    final = checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
