"""Publish a finished run folder as a Hugging Face model repo, in one commit.

    python -m finetune.publish runs/my-style --repo me/my-style [--private]
    python -m finetune.publish runs/my-style --repo me/my-style --dry-run out/my-style   # writes, uploads nothing
    python -m finetune.publish runs/my-style --repo me/my-style --preview-prompt "mystyle, a fox" [--no-previews]

The repo folder holds both LoRA files (diffusers and ComfyUI naming; one ComfyUI file per
transformer), ``video_lora.json``, the resolved ``recipe.yaml``, side-by-side previews rendered
without and with the LoRA, same seed (``previews/preview-K.mp4`` plus a small animated ``.webp``
shown in the card's gallery), and a model card (``README.md``). The previews are the trainer's
samples of ``validation.prompts``; a run without them gets 2 rendered now from prompts made of
the trigger word and its training captions (``--preview-prompt`` chooses others, ``--no-previews``
leaves them out), at the run's clip size, fewer steps on a CPU, kept in ``<run>/samples/``.

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; huggingface_hub sends it in
the Authorization header and this module never reads it into a string of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.cli import add_verbose_flag
from finetune.errors import UserError
from finetune.export import RUN_INFO, RunInfo

PREVIEWS = "previews"
PREVIEW_PROMPTS = 2  # prompts publish makes from the training captions when the run has no validation samples
# A CPU renders previews with at most this many steps: a tiny model's in seconds, a full one's in
# hours rather than days (a GPU uses the recipe's validation.steps).
CPU_PREVIEW_STEPS = 8
RECIPE = "recipe.yaml"
WEBP_MAX_SIDE = 256  # the gallery copy: small enough to load fast on the Hub page
_GAP = 4  # pixels between the two halves of a preview


class PublishError(UserError):
    """A run folder or repo id that cannot be published, found before anything is uploaded."""


@dataclass(frozen=True)
class Preview:
    prompt: str
    mp4: str  # path in the repo
    webp: str


# ---------------------------------------------------------------------------- checks


def check_repo_id(repo_id: str) -> str:
    """``USER/NAME`` as the Hub accepts it. Raises PublishError naming the fix."""
    from finetune.hub import repo_id_problem

    problem = repo_id_problem(repo_id)
    if problem:
        raise PublishError(f"--repo {repo_id!r}: {problem}; e.g. --repo me/my-style")
    return repo_id


def check_run(run_dir: Path) -> RunInfo:
    """The run description of a finished run folder. Raises PublishError if the folder is not
    one (no video_lora.json, or its adapter or recipe missing)."""
    try:
        info = RunInfo.read(run_dir)
    except UserError as e:
        raise PublishError(f"{e}; only finished runs can be published") from None
    if not info.usable:
        raise PublishError(f"{run_dir}: trained with model.weights=random (random full-size weights, to measure memory "
                           f"and speed), so its adapter fits no real model and is not published; train with "
                           f"model.weights=pretrained")
    missing = [n for n in (info.weight_name, RECIPE) if not (run_dir / n).is_file()]
    if missing:
        raise PublishError(f"{run_dir}: not a finished run folder ({', '.join(missing)} missing); "
                           f"let train_lora.py finish (or --resume latest) before publishing")
    return info


# ---------------------------------------------------------------------------- previews


@dataclass(frozen=True)
class PreviewJob:
    """One prompt shown rendered without and with the LoRA, same seed and settings."""

    prompt: str
    base: Path  # the base model's render, kept in the run folder for the next publish
    lora: Path  # the LoRA's render
    steps: int
    clip: int  # the training clip (manifest index, cycled) an i2v or continue render starts from


@dataclass(frozen=True)
class PreviewPlan:
    """The previews of a repo folder: ``jobs`` to render (or reuse), and what the card says of them:
    ``made`` how they were made (empty for the trainer's validation samples), ``absent`` why
    there are none."""

    jobs: list[PreviewJob]
    made: str = ""
    absent: str = ""


def sample_paths(run_dir: Path, info: RunInfo, k: int) -> tuple[Path, Path]:
    """(base render, LoRA render) of validation prompt ``k``: the trainer's final sample and the
    base model's render of the same prompt, seed and settings."""
    return run_dir / "samples" / f"base-{k}.mp4", run_dir / "samples" / f"step-{info.steps:08d}-{k}.mp4"


def preview_paths(run_dir: Path, info: RunInfo, prompt: str, steps: int, clip: int) -> tuple[Path, Path]:
    """(base render, LoRA render) of a preview that publish makes: named by what decides the
    pixels, so a later publish reuses them only for the same prompt and settings."""
    v = info.recipe.get("validation", {})
    key = json.dumps([prompt, steps, v.get("guidance", 5.0), v.get("seed", 0), clip, info.steps])
    name = "preview-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return run_dir / "samples" / f"{name}-base.mp4", run_dir / "samples" / f"{name}-lora.mp4"


def run_recipe(info: RunInfo):
    """The run's resolved recipe as a Recipe."""
    from finetune.config import Recipe

    return Recipe.model_validate(info.recipe)


def caption_prompts(info: RunInfo, n: int = PREVIEW_PROMPTS) -> list[tuple[str, int]]:
    """``n`` preview prompts made of the trigger word and captions of the run's training manifest
    (or data.dataset): (prompt, clip index) of clips with distinct captions, spread over it. Raises
    DataError if the manifest is gone or unreadable."""
    first: dict[str, int] = {}  # caption -> first clip with it
    for i, clip in enumerate(training_clips(info)):
        first.setdefault(clip.caption, i)
    distinct = list(first.items())
    return [distinct[j * len(distinct) // n] for j in range(min(n, len(distinct)))]


def training_clips(info: RunInfo) -> list:
    """The run's training clips, from its data.manifest or data.dataset. Raises DataError if they
    are gone (moved or deleted since training) or unreadable."""
    from finetune.data import load_clips
    from finetune.errors import DataError

    d = info.recipe.get("data", {})
    manifest, dataset = d.get("manifest"), d.get("dataset")
    if not dataset and (not manifest or not Path(manifest).is_file()):
        raise DataError(f"data.manifest={manifest} is not there (moved or deleted since training)")
    return load_clips(manifest, dataset, info.trigger)


def preview_steps(info: RunInfo, device_type: str) -> int:
    """Inference steps of the previews publish renders: the recipe's ``validation.steps``; on a
    CPU at most :data:`CPU_PREVIEW_STEPS` (but never fewer than the family needs)."""
    from finetune.families import get_family

    steps = info.recipe.get("validation", {}).get("steps", 30)
    if device_type == "cuda":
        return steps
    return max(get_family(info.family).min_inference_steps, min(steps, CPU_PREVIEW_STEPS))


def plan_previews(run_dir: Path, info: RunInfo, chosen: list[str], wanted: bool = True) -> PreviewPlan:
    """Which previews the repo shows: the trainer's renders of ``validation.prompts``; else (or if
    ``chosen``, from --preview-prompt) prompts rendered now, by default :data:`PREVIEW_PROMPTS` made
    of the trigger word and training captions. ``wanted`` False (--no-previews): none. A run whose
    manifest is gone gets none, with a note saying how to choose prompts."""
    if not wanted:
        return PreviewPlan([], absent="No previews (published with `--no-previews`).")
    v = info.recipe.get("validation", {})
    if v.get("prompts") and not chosen:
        return PreviewPlan([PreviewJob(p, *sample_paths(run_dir, info, k), v.get("steps", 30), k)
                            for k, p in enumerate(v["prompts"])])
    import torch

    from finetune.errors import DataError

    steps = preview_steps(info, "cuda" if torch.cuda.is_available() else "cpu")
    if chosen:
        prompts, source = [(p, k) for k, p in enumerate(chosen)], "prompts chosen with `--preview-prompt`"
    else:
        try:
            prompts = caption_prompts(info)
        except DataError as e:
            trigger = info.trigger or "your trigger word"
            print(f"note: no previews: they are made of the training captions, but {e}; publishing without them "
                  f"(choose prompts with --preview-prompt \"{trigger}, ...\", repeatable)")
            return PreviewPlan([], absent="No previews: the training manifest was gone when this LoRA was published.")
        source = "prompts: the trigger word and captions of training clips"
    jobs = [PreviewJob(p, *preview_paths(run_dir, info, p, steps, clip), steps, clip) for p, clip in prompts]
    return PreviewPlan(jobs, made=f"Rendered when publishing ({steps} steps, seed {v.get('seed', 0)}; {source}).")


def conditioning_clips(info: RunInfo, jobs: list[PreviewJob]) -> list | None:
    """The training clips the renders of an i2v or continue run start from, one per job (None when
    it needs none: t2v, or i2v with ``validation.images``). Raises DataError if the manifest or its
    clips are gone."""
    from finetune.families import get_family

    kind = get_family(info.family).task_input(info.task)
    v = info.recipe.get("validation", {})
    if kind is None or (kind == "image" and v.get("images")):
        return None
    clips = training_clips(info)
    return [clips[j.clip % len(clips)] for j in jobs]


def render_previews(run_dir: Path, info: RunInfo, jobs: list[PreviewJob]) -> str:
    """Render the base and LoRA renders of ``jobs`` that the run folder lacks, with the recipe's
    validation guidance and seed and each job's steps, at the run's clip size; the base model loads
    only if something is missing. Returns "" when all are there, else why there are none (an i2v
    or continue run whose training clips are gone: a note says so and publishing goes on)."""
    todo = {(which, k) for k, j in enumerate(jobs) for which, path in (("base", j.base), ("lora", j.lora))
            if not path.is_file()}
    if not todo:
        return ""
    import torch
    from tqdm.auto import tqdm

    from finetune.errors import DataError
    from finetune.inference import LoraRef, RenderArgs, complete_args, load_base, render_base_then_lora
    from finetune.trainer import compute_dtype, validation_inputs
    from finetune.video import write_video

    try:
        clips = conditioning_clips(info, jobs)
    except DataError as e:
        print(f"note: no previews: an {info.task} run's renders start from a training clip, but {e}; publishing "
              f"without them (an i2v run can name its images in validation.images)")
        return "No previews: the training clips they start from were gone when this LoRA was published."
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(info.recipe.get("model", {}).get("dtype", "auto"), device)
    family, _ = load_base([LoraRef(run_dir)], None, device, dtype)
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)  # one bar over the renders instead
    kind, v = family.task_input(family.task), info.recipe.get("validation", {})
    inputs = validation_inputs(run_recipe(info), family, clips) if kind else []
    requests = [complete_args(RenderArgs(prompt=j.prompt, steps=j.steps, guidance=v.get("guidance", 5.0),
                                         seed=v.get("seed", 0), **({kind: inputs[k % len(inputs)]} if kind else {})),
                              family, info) for k, j in enumerate(jobs)]
    with tqdm(total=len(todo), desc="previews (base, then LoRA)", unit="render") as bar:
        for which, k, frames, audio in render_base_then_lora(family, pipe, run_dir, requests,
                                                             skip=lambda which, k: (which, k) not in todo):
            write_video(frames, jobs[k].base if which == "base" else jobs[k].lora, requests[k].fps, audio=audio)
            bar.update()
    return ""


def _decode(path: Path) -> tuple[np.ndarray, float]:
    """[F, H, W, 3] uint8 frames and the frame rate of an mp4."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, float(stream.average_rate or 8)


def write_side_by_side(base: Path, lora: Path, mp4: Path, webp: Path) -> None:
    """Write ``base | lora`` (left: without the LoRA, right: with it) as mp4 and animated webp."""
    import torch
    from PIL import Image

    from finetune.video import side_by_side, write_video

    (a, fps), (b, _) = _decode(base), _decode(lora)
    n = min(len(a), len(b))
    both = side_by_side(torch.from_numpy(a[:n]) / 255, torch.from_numpy(b[:n]) / 255, gap=_GAP)
    both = (both * 255).round().to(torch.uint8).numpy()
    write_video(both, mp4, fps)
    scale = min(1.0, WEBP_MAX_SIDE / max(both.shape[1:3]))
    size = (max(1, round(both.shape[2] * scale)), max(1, round(both.shape[1] * scale)))
    images = [Image.fromarray(f).resize(size, Image.Resampling.LANCZOS) for f in both]
    images[0].save(webp, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   quality=80)


# ---------------------------------------------------------------------------- model card


def _count_clips(info: RunInfo) -> int | None:
    manifest = info.recipe.get("data", {}).get("manifest")
    if manifest and Path(manifest).is_file():
        return sum(1 for line in Path(manifest).read_text().splitlines() if line.strip())
    return None


def base_license(info: RunInfo, given: str | None) -> str:
    """``--license``, else the base model's licence on the Hub, else "other" (tiny models,
    or the Hub unreachable: the card then says to check the base model's terms)."""
    if given:
        return given
    if info.tiny:
        return "other"
    try:
        from huggingface_hub import model_info

        card = model_info(info.base_model, revision=info.revision).card_data
        return (card.license if card is not None else None) or "other"
    except Exception as e:  # an unreachable Hub must not stop publishing; the card says "other"
        print(f"note: could not read the licence of {info.base_model} ({type(e).__name__}); using 'other' "
              f"(pass --license to set it)")
        return "other"


def model_card(info: RunInfo, repo_id: str, lora_files: list[str], comfy_files: list[str], previews: list[Preview],
               license: str, plan: PreviewPlan | None = None):
    """The repo's README: metadata for the Hub (base model, adapter relation, library, task,
    tags, trigger word, licence, preview gallery) and how to use and reproduce the LoRA.
    ``plan`` says how the previews were made, or why there are none."""
    from huggingface_hub import ModelCard, ModelCardData

    from finetune.families import get_family

    family = get_family(info.family)
    pipeline = family.pipeline_class_for(info.task).__name__
    task = "text-to-video" if info.task == "t2v" else "image-to-video"
    r, d, o = info.recipe.get("lora", {}), info.recipe.get("data", {}), info.recipe.get("optim", {})
    fps = d.get("fps") or family.default_fps
    clips = _count_clips(info)
    batch = f"{o.get('batch_size', 1)} x {o.get('grad_accum', 1)}"
    data = ModelCardData(
        base_model=info.base_model, base_model_relation="adapter", library_name="diffusers", pipeline_tag=task,
        license=license, instance_prompt=info.trigger or None,
        tags=["lora", "diffusers", "video", task, info.family, "template:diffusion-lora"],
        widget=[{"text": p.prompt, "output": {"url": p.webp}} for p in previews] or None,
    )
    name = repo_id.split("/")[1]
    adapter = re.sub(r"\W", "_", name)  # a valid adapter name for peft
    prompt = info.trigger + ", " if info.trigger else ""
    rows = "\n".join(f"| {p.prompt} | ![{p.prompt}]({p.webp}) ([mp4]({p.mp4})) |" for p in previews)
    made = f" {plan.made}" if plan and plan.made else ""
    absent = (plan.absent if plan and plan.absent else "No previews.") + "\n"
    gallery = (f"Left: {info.base_model} alone; right: with this LoRA (same prompt and seed).{made}\n\n"
               f"| prompt | base \\| LoRA |\n|---|---|\n{rows}\n") if previews else absent
    comfy = comfy_files[0] if comfy_files else "(none)"
    trigger_note = f" Trigger word: `{info.trigger}`." if info.trigger else ""
    tiny_note = " Trained on a tiny random test model: for demonstration only." if info.tiny else ""
    # A model with two transformers (experts) has one ComfyUI file each, loaded on its own model.
    more_comfy = "".join(f"\nFor the model's other transformer: `{f}`." for f in comfy_files[1:])
    body = f"""
# {name}

A LoRA for [{info.base_model}](https://huggingface.co/{info.base_model}) ({info.family} family), trained with
video-lora-studio.{trigger_note}{tiny_note}

## Previews

{gallery}
## Use it in diffusers

```python
import torch
from diffusers import {pipeline}
from diffusers.utils import export_to_video

pipe = {pipeline}.from_pretrained("{info.base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{lora_files[0]}", adapter_name="{adapter}")
pipe.set_adapters(["{adapter}"], [1.0])
video = pipe("{prompt}your prompt", num_frames={d.get('frames')}, height={d.get('height')},
             width={d.get('width')}).frames[0]
export_to_video(video, "out.mp4", fps={fps:g})
```

## Use it in ComfyUI

Put `{comfy}` in `ComfyUI/models/loras/` and add a **LoraLoaderModelOnly** node after the model loader
(strength 1.0). Its keys use the original checkpoint's names (`diffusion_model.*`) and carry alpha as
`.alpha` tensors, so ComfyUI applies it at the trained strength.{more_comfy}

## Training

| | |
|---|---|
| steps | {info.steps} |
| rank / alpha | {r.get('rank')} / {r.get('alpha')} |
| clips | {clips if clips is not None else 'n/a'} (repeats {d.get('repeats', 1)}) |
| frames | {d.get('frames')} at {fps:g} fps, {d.get('width')}x{d.get('height')} |
| learning rate | {o.get('lr')} ({o.get('scheduler', 'constant')}, batch {batch}) |

The full resolved recipe is `{RECIPE}`; `video_lora.json` records the base model and revision.
Licence: that of the base model ({license}); check its terms before use.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---------------------------------------------------------------------------- folder and upload


def build_folder(run_dir: str | Path, out_dir: str | Path, repo_id: str, license: str | None = None,
                 preview_prompts: list[str] | None = None, previews: bool = True) -> Path:
    """Write the repo folder for ``run_dir`` into ``out_dir`` (emptied first if it holds an
    earlier build), previews as :func:`plan_previews` says: ``preview_prompts`` chooses their
    prompts, ``previews`` False leaves them out. Raises PublishError before writing anything if
    the run or repo id is unusable."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_repo_id(repo_id)
    info = check_run(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "README.md").is_file():
            raise PublishError(f"--dry-run {out_dir}: folder is not empty; pass a new or empty folder")
        shutil.rmtree(out_dir)
    (out_dir / PREVIEWS).mkdir(parents=True, exist_ok=True)

    from finetune.families import get_family
    from finetune.lora_formats import comfyui_weight_name, convert_file

    lora_files = sorted({info.weight_name, *(p.name for p in run_dir.glob("pytorch_lora_weights*.safetensors"))})
    comfy_files = []
    for name in lora_files:
        shutil.copy2(run_dir / name, out_dir / name)
        comfy = comfyui_weight_name(name)
        if (run_dir / comfy).is_file():
            shutil.copy2(run_dir / comfy, out_dir / comfy)
        else:  # a run from before ComfyUI export: convert its adapter now
            fam = get_family(info.family)
            convert_file(run_dir / name, out_dir / comfy, "comfyui", fam.comfyui_key_map(), fam.pipeline_class,
                         info=dict(info.__dict__))
        comfy_files.append(comfy)
    for name in (RUN_INFO, RECIPE):
        shutil.copy2(run_dir / name, out_dir / name)

    plan = plan_previews(run_dir, info, list(preview_prompts or []), previews)
    absent = render_previews(run_dir, info, plan.jobs)
    if absent:
        plan = PreviewPlan([], absent=absent)
    shown = []
    for k, job in enumerate(plan.jobs):
        p = Preview(job.prompt, f"{PREVIEWS}/preview-{k}.mp4", f"{PREVIEWS}/preview-{k}.webp")
        write_side_by_side(job.base, job.lora, out_dir / p.mp4, out_dir / p.webp)
        shown.append(p)
    card = model_card(info, repo_id, lora_files, comfy_files, shown, base_license(info, license), plan)
    card.save(out_dir / "README.md")
    return out_dir


def require_token() -> None:
    """Raises PublishError if huggingface_hub finds no token (HF_TOKEN or a saved login)."""
    from finetune.hub import token_missing

    missing = token_missing()
    if missing:
        raise PublishError(missing)


def upload(folder: Path, repo_id: str, private: bool, info: RunInfo) -> str:
    """Create the repo (if new) and upload ``folder`` in one commit. Returns the repo URL.
    Raises PublishError without a token (HF_TOKEN or a saved login)."""
    from huggingface_hub import HfApi

    require_token()
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=f"Upload {info.family} LoRA ({info.steps} steps) from video-lora-studio")
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (output.dir of train_lora.py)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub model repo to create or update")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", type=Path, metavar="DIR", help="write the repo folder to DIR and upload nothing")
    p.add_argument("--license", help="licence id for the card; default: the base model's")
    p.add_argument("--preview-prompt", action="append", default=[], metavar="PROMPT",
                   help="render the previews with this prompt (repeatable); default: the validation samples of a "
                        f"run with validation.prompts, else {PREVIEW_PROMPTS} prompts made of the trigger word and "
                        "training captions")
    p.add_argument("--no-previews", dest="previews", action="store_false", help="publish without previews")
    add_verbose_flag(p)
    args = p.parse_args(argv)

    check_repo_id(args.repo)
    info = check_run(args.run_dir)
    if args.dry_run is not None:
        out = build_folder(args.run_dir, args.dry_run, args.repo, args.license, args.preview_prompt, args.previews)
        print(f"dry run: repo folder written to {out} (nothing uploaded)")
        return 0
    import tempfile

    require_token()
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        folder = build_folder(args.run_dir, Path(tmp) / "repo", args.repo, args.license, args.preview_prompt,
                              args.previews)
        url = upload(folder, args.repo, args.private, info)
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_main

    sys.exit(run_main(main))
