"""Publish a finished run folder as a Hugging Face model repo, in one commit.

    python -m finetune.publish runs/my-style --repo me/my-style [--private]
    python -m finetune.publish runs/my-style --repo me/my-style --dry-run out/my-style   # writes, uploads nothing

The repo folder holds both LoRA files (diffusers and ComfyUI naming; one ComfyUI file per
transformer), ``video_lora.json``, the resolved ``recipe.yaml``, side-by-side previews of each
validation prompt rendered without and with the LoRA (``previews/preview-K.mp4`` plus a small
animated ``.webp`` shown in the card's gallery), and a model card (``README.md``).

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; huggingface_hub sends it in
the Authorization header and this module never reads it into a string of its own.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import UserError
from finetune.export import RUN_INFO, RunInfo

PREVIEWS = "previews"
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


def sample_paths(run_dir: Path, info: RunInfo, k: int) -> tuple[Path, Path]:
    """(base render, LoRA render) of validation prompt ``k``: the trainer's final sample and the
    base model's render of the same prompt, seed and settings."""
    return run_dir / "samples" / f"base-{k}.mp4", run_dir / "samples" / f"step-{info.steps:08d}-{k}.mp4"


def preview_image(info):
    """The conditioning image of i2v previews: the run's first validation image, else the first
    frame of its first training clip. Raises UserError if neither can be found."""
    from finetune.data import load_manifest
    from finetune.video import first_frame

    images = info.recipe.get("validation", {}).get("images") or []
    if images:
        return images[0]
    manifest = info.recipe.get("data", {}).get("manifest")
    if manifest and Path(manifest).is_file():
        return first_frame(load_manifest(manifest)[0].path)
    raise UserError(f"an {info.task} run needs a conditioning image for its previews: set validation.images in "
                    f"the recipe, or keep data.manifest={manifest} where it was")


def render_missing_samples(run_dir: Path, info: RunInfo, prompts: list[str]) -> None:
    """Render the base and LoRA samples of ``prompts`` that the run folder lacks, with the
    recipe's validation settings; the base model loads only if something is missing."""
    todo = [(k, p) for k, p in enumerate(prompts) if not all(x.is_file() for x in sample_paths(run_dir, info, k))]
    if not todo:
        return
    import torch

    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render_to_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family, _ = load_base([LoraRef(run_dir)], None, device, torch.bfloat16)
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)
    v = info.recipe.get("validation", {})

    image = preview_image(info) if info.task != "t2v" else None

    def args(prompt: str) -> RenderArgs:
        return complete_args(RenderArgs(prompt=prompt, steps=v.get("steps", 30), guidance=v.get("guidance", 5.0),
                                        seed=v.get("seed", 0), image=image), family, info)

    for k, prompt in todo:  # base first: the adapter is added below
        print(f"preview {k + 1}/{len(prompts)}: rendering the base model")
        with torch.no_grad():
            render_to_file(family, pipe, args(prompt), sample_paths(run_dir, info, k)[0])
    apply_loras(family, [LoraRef(run_dir)], merge=False)
    for k, prompt in todo:
        lora_path = sample_paths(run_dir, info, k)[1]
        if not lora_path.is_file():
            with torch.no_grad():
                render_to_file(family, pipe, args(prompt), lora_path)


def _decode(path: Path) -> tuple[np.ndarray, float]:
    """[F, H, W, 3] uint8 frames and the frame rate of an mp4."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, float(stream.average_rate or 8)


def side_by_side(base: Path, lora: Path, mp4: Path, webp: Path) -> None:
    """Write ``base | lora`` (left: without the LoRA, right: with it) as mp4 and animated webp."""
    from PIL import Image

    from finetune.video import write_video

    (a, fps), (b, _) = _decode(base), _decode(lora)
    n = min(len(a), len(b))
    gap = np.full((n, a.shape[1], _GAP, 3), 255, np.uint8)
    both = np.concatenate([a[:n], gap, b[:n, : a.shape[1]]], axis=2)
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
               license: str):
    """The repo's README: metadata for the Hub (base model, adapter relation, library, task,
    tags, trigger word, licence, preview gallery) and how to use and reproduce the LoRA."""
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
    gallery = (f"Left: {info.base_model} alone; right: with this LoRA (same prompt and seed).\n\n"
               f"| prompt | base \\| LoRA |\n|---|---|\n{rows}\n") if previews else "No validation prompts were set.\n"
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
                 prompts: list[str] | None = None) -> Path:
    """Write the repo folder for ``run_dir`` into ``out_dir`` (emptied first if it holds an
    earlier build). ``prompts``: preview prompts when the recipe has no validation prompts.
    Raises PublishError before writing anything if the run or repo id is unusable."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_repo_id(repo_id)
    info = check_run(run_dir)
    prompts = list(info.recipe.get("validation", {}).get("prompts") or prompts or [])
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

    render_missing_samples(run_dir, info, prompts)
    previews = []
    for k, prompt in enumerate(prompts):
        p = Preview(prompt, f"{PREVIEWS}/preview-{k}.mp4", f"{PREVIEWS}/preview-{k}.webp")
        side_by_side(*sample_paths(run_dir, info, k), out_dir / p.mp4, out_dir / p.webp)
        previews.append(p)
    card = model_card(info, repo_id, lora_files, comfy_files, previews, base_license(info, license))
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
    p.add_argument("--prompt", action="append", default=[], help="preview prompt if the recipe has none (repeatable)")
    args = p.parse_args(argv)

    check_repo_id(args.repo)
    info = check_run(args.run_dir)
    if args.dry_run is not None:
        out = build_folder(args.run_dir, args.dry_run, args.repo, args.license, args.prompt)
        print(f"dry run: repo folder written to {out} (nothing uploaded)")
        return 0
    import tempfile

    require_token()
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        folder = build_folder(args.run_dir, Path(tmp) / "repo", args.repo, args.license, args.prompt)
        url = upload(folder, args.repo, args.private, info)
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    from finetune.cli import run_main

    sys.exit(run_main(main))
