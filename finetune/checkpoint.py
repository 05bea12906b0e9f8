"""Resumable checkpoints: ``<run>/checkpoints/step-00000050/`` written by accelerate's
``save_state`` (optimizer, LR scheduler, RNG states) with the LoRA weights alone instead of the
whole transformer, plus ``trainer_state.json`` holding the step and ``recipe.yaml``, the resolved
recipe it was made with (``--resume`` compares it with the current one, see
:func:`check_resume_recipe`). A checkpoint is written under a temporary name and renamed when
complete, so "latest" is always a whole checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from finetune import diskspace
from finetune.lora_formats import safetensors_problem
from finetune.errors import CheckpointError

PREFIX = "step-"
LORA_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"  # the trainer writes the resolved recipe to <run>/recipe.yaml; checkpoints copy it


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
        return check_checkpoint(found[-1], found[:-1])
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); "
                              f"use --resume latest or a folder under {checkpoints_dir(run_dir)}")
    return check_checkpoint(path, [])


def read_step(ckpt: Path) -> int:
    """The step ``ckpt`` was saved at. Raises CheckpointError if its state file is damaged."""
    try:
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint folder with --resume {ckpt.parent}/step-...") from None
    return step


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
    previous = list_checkpoints(run_dir)
    # Every process checks (same disk), so all raise together rather than some waiting forever.
    # accelerator._models: the prepared models, which save_state writes; no public accessor.
    diskspace.require_free(checkpoints_dir(run_dir), diskspace.checkpoint_bytes(
        getattr(accelerator, "_models", []), previous[-1] if previous else None),
        f"checkpoint step {step}", "set output.dir on a bigger disk (then --resume the checkpoint folder)")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (Path(run_dir) / RECIPE_FILE).is_file():
            shutil.copyfile(Path(run_dir) / RECIPE_FILE, tmp / RECIPE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# Files accelerate's save_state writes besides the LoRA weights (one RNG file per process).
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def check_checkpoint(path: Path, earlier: list[Path]) -> Path:
    """Check that checkpoint folder ``path`` is whole and readable before any weights load;
    returns it. ``earlier``: older checkpoints of the run, suggested instead of a damaged one.
    Raises CheckpointError naming the damaged file."""
    missing = [name for name in (LORA_FILE, *ACCELERATE_FILES) if not (path / name).is_file()]
    problem = f"{', '.join(missing)} missing" if missing else None
    try:
        read_step(path)
    except CheckpointError:
        problem = f"{STATE_FILE} unreadable"
    for weights in sorted(path.glob("lora*.safetensors")) if not problem else []:  # one per trained expert
        if bad := safetensors_problem(weights):
            problem = f"{weights.name} unreadable: {bad}"
            break
    if problem:
        instead = (f"resume from the one before it with --resume {earlier[-1]}" if earlier
                   else "train without --resume to start over")
        raise CheckpointError(f"{path}: damaged checkpoint ({problem}); {instead}, and delete {path.name}")
    return path


def load_checkpoint(accelerator, path: Path) -> int:
    """``accelerator.load_state(path)``; returns its step. Raises CheckpointError naming the
    folder if the state does not load (damaged, or made by another kind of run)."""
    try:
        accelerator.load_state(str(path))
    except CheckpointError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot be loaded into this run ({type(e).__name__}: {first[:300]}); the "
                              f"checkpoint is damaged or was made with another recipe; resume from another "
                              f"checkpoint folder or train into a new output.dir") from None
    return read_step(path)


# ---------------------------------------------------------------------------- resume vs recipe

# Dotted recipe paths (a trailing "." covers a whole section). A change of one of FATAL makes the
# checkpoint's weights or optimizer state meaningless for the new recipe; SAFE ones change only
# what happens from here on; any other change is allowed with a warning (learning rate, data, ...).
FATAL_FIELDS = ("model.family", "model.pretrained", "model.revision", "model.tiny", "model.tiny_seed",
                "model.task", "model.experts", "lora.rank", "lora.alpha", "lora.targets", "optim.optimizer")
SAFE_FIELDS = ("optim.steps", "checkpoint.", "validation.", "output.log_every", "output.dir", "cache.dir",
               "memory.gradient_checkpointing", "memory.offload_idle_expert", "lora.init_from")


def flatten(doc: dict, prefix: str = "") -> dict[str, object]:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}; lists stay values."""
    out: dict[str, object] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def compare_recipes(old: dict, new: dict) -> dict[str, list[tuple[str, object, object]]]:
    """Differences between two resolved recipes (as ``Recipe.model_dump(mode="json")``), sorted
    into "fatal", "safe" and "warn", each a list of (dotted field, old value, new value).
    A field the old recipe does not record (added to recipes since) is not compared."""
    flat_old, flat_new = flatten(old), flatten(new)
    out: dict[str, list[tuple[str, object, object]]] = {"fatal": [], "safe": [], "warn": []}
    for field in sorted(flat_old.keys() & flat_new.keys()):
        a, b = flat_old[field], flat_new[field]
        if a == b:
            continue
        kind = "fatal" if _matches(field, FATAL_FIELDS) else "safe" if _matches(field, SAFE_FIELDS) else "warn"
        out[kind].append((field, a, b))
    return out


def _show(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{f} {a!r} -> {b!r}" for f, a, b in changes)


def check_resume_recipe(ckpt_dir: Path, recipe: dict) -> list[str]:
    """Compare ``recipe`` (resolved, as a dict) with the one ``ckpt_dir`` was made with.

    Returns the lines to print (a note for safe changes, a warning for the others). Raises
    CheckpointError listing every change that makes the checkpoint meaningless, each field with
    both values, and if ``optim.steps`` is not beyond the checkpoint's step.
    """
    path = ckpt_dir / RECIPE_FILE
    if not path.is_file():
        return [f"note: {ckpt_dir} records no recipe (saved before checkpoints kept one); "
                f"the current recipe is not compared with it"]
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: damaged ({type(e).__name__}); resume from another checkpoint folder") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"{path}: damaged (not a recipe mapping); resume from another checkpoint folder")
    diff = compare_recipes(old, recipe)
    step, steps = read_step(ckpt_dir), flatten(recipe).get("optim.steps")
    problems = [f"{f}: {a!r} in the checkpoint, {b!r} now" for f, a, b in diff["fatal"]]
    if isinstance(steps, int) and steps <= step:
        problems.append(f"optim.steps: {steps} now, but the checkpoint is already at step {step} (raise optim.steps "
                        f"above {step} to train on)")
    if problems:
        n = len(problems)
        raise CheckpointError(
            f"--resume {ckpt_dir}: {n} recipe change{'s' if n != 1 else ''} since the checkpoint make its state "
            f"meaningless:\n" + "\n".join(f"  - {p}" for p in problems) +
            f"\nput these back as they were (the checkpoint's recipe: {path}), or train without --resume into a new "
            f"output.dir")
    lines = []
    if diff["safe"]:
        lines.append(f"note: resuming with changed settings (safe): {_show(diff['safe'])}")
    if diff["warn"]:
        lines.append(f"warning: resuming with changed settings that alter training from here on: "
                     f"{_show(diff['warn'])}; the run is no longer the same as one trained with either recipe "
                     f"throughout")
    return lines
