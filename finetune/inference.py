"""Rendering with a base model and zero or more trained adapters, applied unfused (each with its
scale) or merged into the base weights. The base model comes from the run folders' own
``video_lora.json``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from finetune.adapters import read_adapter_file
from finetune.errors import UserError
from finetune.export import RunInfo
from finetune.families import get_family
from finetune.families.base import Family, ModelSpec
from finetune.video import write_video


@dataclass(frozen=True)
class LoraRef:
    """A run folder, or a LoRA file (any layout lora_formats reads), and its scale."""

    run_dir: Path
    scale: float = 1.0

    @property
    def is_file(self) -> bool:
        return self.run_dir.is_file()

    @classmethod
    def parse(cls, text: str) -> "LoraRef":
        """``runs/x``, ``runs/x:0.8`` or ``some_lora.safetensors:0.8``."""
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text), 1.0)


def base_spec(info: RunInfo, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    return ModelSpec(pretrained=info.base_model, revision=info.revision, tiny=info.tiny, tiny_seed=info.tiny_seed,
                     dtype=dtype, task=info.task, cond_frames=info.recipe.get("model", {}).get("cond_frames"),
                     weights=info.weights)


def lora_info(ref: LoraRef, family: str | None = None, base_model: str | None = None) -> RunInfo:
    """What a run folder's ``video_lora.json`` says, or what a LoRA file records; a file that
    records nothing needs ``family`` and gets ``base_model`` or that family's default base model.
    Raises UserError naming the missing ``--family``."""
    if not ref.is_file:
        return RunInfo.read(ref.run_dir)
    from finetune.lora_formats import read_info

    if ref.run_dir.suffix != ".safetensors":
        raise UserError(f"--lora {ref.run_dir}: LoRA files must be .safetensors")
    meta = read_info(ref.run_dir)
    name = meta.get("family") or family
    if name is None:
        raise UserError(f"--lora {ref.run_dir}: the file does not record its model family; pass --family (e.g. wan)")
    if family is not None and name != family:
        raise UserError(f"--lora {ref.run_dir} was made for {name}, not --family {family}")
    if all(k in meta for k in RunInfo.__dataclass_fields__):
        return RunInfo(**{k: meta[k] for k in RunInfo.__dataclass_fields__})
    return RunInfo(family=name, base_model=meta.get("base_model") or base_model or get_family(name).default_model_id,
                   revision=meta.get("revision"), tiny=False, tiny_seed=0, trigger=meta.get("trigger", ""), steps=0,
                   weight_name=ref.run_dir.name, recipe={})


def load_base(loras: list[LoraRef], base: Path | None, device: torch.device, dtype: torch.dtype,
              family: str | None = None, base_model: str | None = None) -> tuple[Family, RunInfo]:
    """The base model all ``loras`` were trained on (or that of run folder ``base``); ``family``
    and ``base_model`` stand in for what LoRA files from other tools do not record.
    Raises UserError if none is given or the adapters disagree on the base model, AdapterError
    if an adapter file is missing, damaged or not a LoRA."""
    infos = [(ref.run_dir, lora_info(ref, family, base_model)) for ref in loras]
    if base is not None:
        infos.insert(0, (base, RunInfo.read(base)))
    if not infos:
        raise UserError("nothing to render with: pass --lora RUN_DIR[:scale] (repeatable) or --base RUN_DIR")
    first_dir, first = infos[0]
    key = (first.family, first.base_model, first.revision, first.task, first.tiny_seed if first.tiny else None,
           first.weights)
    for run_dir, info in infos[1:]:
        other = (info.family, info.base_model, info.revision, info.task, info.tiny_seed if info.tiny else None,
                 info.weights)
        if other != key:
            raise UserError(f"{run_dir} was trained on {other[:4]} but {first_dir} on {key[:4]}: "
                            f"adapters can only be combined on the same base model and task")
    for run_dir, info in infos[len(infos) - len(loras):]:  # the --lora ones, checked before any weights load
        for name in ([] if run_dir.is_file() else info.adapter_files().values()):
            read_adapter_file(run_dir / name)
    if not first.usable:
        print(f"note: {first_dir} was trained on random full-size weights (model.weights=random); rendering with "
              f"random weights too, which measures speed and memory but shows nothing real")
    family = get_family(first.family).load(base_spec(first, device, dtype), device=device)
    return family, first


def apply_loras(family: Family, loras: list[LoraRef], merge: bool) -> list[str]:
    """Load each run's adapters, each file into the transformer it was trained on (both experts
    of a two-expert model), or a LoRA file in any known layout (ComfyUI, kohya/musubi, diffusers)
    into the first transformer, with its scale; with ``merge`` fuse them into the base weights and
    drop the LoRA layers. Works at transformer level, so pipelines without a LoRA loader render
    adapters too. Returns the adapter names."""
    experts = {e.attr: e for e in family.experts()}
    loaded: dict[str, list[tuple[str, float]]] = {}
    for i, ref in enumerate(loras):
        name = f"lora{i}"
        if ref.is_file:
            first = family.experts()[0]
            load_lora_file(family, ref.run_dir, first, name)
            loaded.setdefault(first.attr, []).append((name, ref.scale))
            continue
        info = RunInfo.read(ref.run_dir)
        for attr, file in info.adapter_files().items():
            if attr not in experts:
                raise UserError(f"{ref.run_dir}: adapter {file} is for {attr}, which {family.name} does not have")
            family.load_adapter(str(Path(ref.run_dir) / file), experts[attr], name)
            loaded.setdefault(attr, []).append((name, ref.scale))
    for attr, pairs in loaded.items():
        transformer = getattr(family.components, attr)
        transformer.set_adapters([n for n, _ in pairs], [s for _, s in pairs])
        if merge:
            transformer.fuse_lora(lora_scale=1.0, adapter_names=[n for n, _ in pairs])
            transformer.unload_lora()
    return [f"lora{i}" for i in range(len(loras))]


def load_lora_file(family: Family, path: Path, expert, adapter_name: str) -> None:
    """A LoRA file in any known layout, converted to a diffusers file (rank and alpha kept) and
    loaded into ``expert``'s transformer. Raises LoraFormatError for a file of no known layout."""
    import tempfile

    from finetune.export import WEIGHT_NAME
    from finetune.lora_formats import read_lora, write_lora

    key_map = family.comfyui_key_map(expert.attr)
    lora = read_lora(path, key_map)
    with tempfile.TemporaryDirectory(prefix="lora-import-") as tmp:
        out = write_lora(lora, Path(tmp) / WEIGHT_NAME, "diffusers", key_map, family.pipeline_class)
        family.load_adapter(str(out), expert, adapter_name)


@dataclass
class RenderArgs:
    prompt: str
    negative_prompt: str = ""
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    steps: int = 30
    guidance: float = 5.0
    seed: int = 0
    image: Any = None  # i2v: the first frame, a PIL image or a path to one
    video: Any = None  # continue: the frames to continue, a list of PIL images or a path to a video


def complete_args(args: RenderArgs, family: Family, info: RunInfo) -> RenderArgs:
    """Fill unset frames, size and fps from the training recipe; check them against the family.
    Raises UserError naming the flag and a valid value."""
    data = info.recipe.get("data", {})
    done = replace(args, frames=args.frames or data.get("frames"), height=args.height or data.get("height"),
                   width=args.width or data.get("width"), fps=float(args.fps or data.get("fps") or family.default_fps))
    unset = [flag for flag, v in (("--frames", done.frames), ("--height", done.height), ("--width", done.width))
             if v is None]
    if unset:
        raise UserError(f"{' '.join(unset)}: needed for a LoRA file that records no training recipe")
    if not family.frame_rule.is_valid(done.frames):
        raise UserError(f"--frames {done.frames} must be {family.frame_rule.describe()} for {family.name} "
                        f"(try {family.frame_rule.nearest(done.frames)})")
    for flag, v in (("--height", done.height), ("--width", done.width)):
        if v % family.spatial_factor:
            raise UserError(f"{flag} {v} must be a multiple of {family.spatial_factor} for {family.name}")
    if done.steps < family.min_inference_steps:
        raise UserError(f"--steps {done.steps}: {family.name} needs at least {family.min_inference_steps}")
    check_task_input(done, family)
    if isinstance(done.image, (str, Path)):
        done = replace(done, image=load_image(done.image, done.width, done.height))
    if isinstance(done.video, (str, Path)):
        done = replace(done, video=load_video(done.video, done.fps, done.width, done.height))
    return done


# what each kind of task input is, for messages
_INPUT_ROLE = {"image": "the image becomes the first frame", "video": "the video's last frames lead the clip"}


def check_task_input(args: RenderArgs, family: Family) -> None:
    """The conditioning the adapter's task needs (family.task_input) must be given, and no other.
    Raises UserError naming the flag."""
    need = family.task_input(family.task)
    for kind in ("image", "video"):
        if getattr(args, kind) is not None and kind != need:
            fix = f", or train with model.task={'i2v' if kind == 'image' else 'continue'}" if need is None else \
                f" and pass --{need} PATH"
            raise UserError(f"--{kind}: this adapter was trained for model.task={family.task} and takes no "
                            f"conditioning {kind}; drop --{kind}{fix}")
    if need is not None and getattr(args, need) is None:
        raise UserError(f"--{need} PATH is required: this adapter was trained for model.task={family.task} "
                        f"({_INPUT_ROLE[need]})")


def load_image(path: str | Path, width: int, height: int):
    """An RGB PIL image from ``path``, resized to cover ``width`` x ``height`` and centre-cropped.
    Raises UserError if it is missing or not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise UserError(f"--image {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--image {path}: not an image ({e}); pass a PNG or JPEG") from None
    return ImageOps.fit(img, (width, height), method=Image.Resampling.BICUBIC)


def load_video(path: str | Path, fps: float, width: int, height: int) -> list:
    """Every frame of the video at ``path``, resampled to ``fps``, resized to cover ``width`` x
    ``height`` and centre-cropped, as RGB PIL images (all in memory: pass the part to continue,
    not hours of footage). Raises UserError if it is missing or unreadable."""
    from finetune.errors import DataError
    from finetune.video import decoded_frame_count, pil_frames, read_clip

    if not Path(path).is_file():
        raise UserError(f"--video {path}: file not found")
    try:
        return pil_frames(read_clip(path, decoded_frame_count(path, fps), fps, height, width))
    except DataError as e:
        raise UserError(f"--video {e}") from None


def render(family: Family, pipe, args: RenderArgs) -> torch.Tensor:
    """Run the pipeline with complete ``args``. Returns frames [F, H, W, 3] float in [0, 1]."""
    return render_with_audio(family, pipe, args)[0]


def render_with_audio(family: Family, pipe, args: RenderArgs) -> tuple[torch.Tensor, tuple | None]:
    """As :func:`render`, plus the sound the model made with the frames (family.rendered_audio):
    (samples [channels, n] float in [-1, 1], sample rate), or None for silent models."""
    first = next(iter(family.components.modules().values()))
    device = next(first.parameters()).device
    out = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt or None, num_frames=args.frames, height=args.height,
        width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator(device=device).manual_seed(args.seed), output_type="pt",
        # video only when given, so families without video tasks need not take the argument
        **family.pipeline_call_kwargs(args.fps, image=args.image,
                                      **({"video": args.video} if args.video is not None else {})),
    )
    video = out.frames[0]  # [F, 3, H, W] in [0, 1]
    return video.permute(0, 2, 3, 1).float().cpu(), family.rendered_audio(out)


def render_base_then_lora(family: Family, pipe, run_dir: Path, requests: list[RenderArgs],
                          skip: Callable[[str, int], bool] = lambda which, k: False
                          ) -> Iterator[tuple[str, int, torch.Tensor, tuple | None]]:
    """Each of ``requests`` (complete: see :func:`complete_args`) rendered by ``family``'s base model
    alone, then all of them again once the adapters of run folder ``run_dir`` are added (unfused,
    scale 1): the same prompt, seed and settings, so each pair differs only by the LoRA. Yields
    ``(which, k, frames, audio)`` as :func:`render_with_audio` makes them, ``which`` "base" or
    "lora", ``k`` the request's index; ``skip(which, k)`` leaves a render out (one already on disk)."""
    for which in ("base", "lora"):
        if which == "lora":
            apply_loras(family, [LoraRef(run_dir)], merge=False)
        for k, args in enumerate(requests):
            if not skip(which, k):
                with torch.no_grad():
                    frames, audio = render_with_audio(family, pipe, args)
                yield which, k, frames, audio


def render_to_file(family: Family, pipe, args: RenderArgs, out: Path) -> Path:
    """Render and write the mp4, with the model's sound as an AAC track when it makes any (LTX-2
    always does: a video-only adapter leaves the sound to the base model)."""
    frames, audio = render_with_audio(family, pipe, args)
    return write_video(frames, out, args.fps, audio=audio)
