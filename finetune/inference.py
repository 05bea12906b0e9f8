"""Rendering with a base model and zero or more trained adapters, applied unfused (each with its
scale) or merged into the base weights. The base model comes from the run folders' own
``video_lora.json``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from finetune.adapters import read_adapter_file
from finetune.errors import UserError
from finetune.export import RunInfo
from finetune.families import get_family
from finetune.families.base import Family, ModelSpec
from finetune.video import write_video


@dataclass(frozen=True)
class LoraRef:
    run_dir: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraRef":
        """``runs/x`` or ``runs/x:0.8``."""
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text), 1.0)


def base_spec(info: RunInfo, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    return ModelSpec(pretrained=info.base_model, revision=info.revision, tiny=info.tiny, tiny_seed=info.tiny_seed,
                     dtype=dtype if device.type == "cuda" else torch.float32)


def load_base(loras: list[LoraRef], base: Path | None, device: torch.device, dtype: torch.dtype) -> tuple[Family, RunInfo]:
    """The base model all ``loras`` were trained on (or that of run folder ``base``).
    Raises UserError if none is given or the adapters disagree on the base model, AdapterError
    if an adapter file is missing, damaged or not a LoRA."""
    infos = [(ref.run_dir, RunInfo.read(ref.run_dir)) for ref in loras]
    if base is not None:
        infos.insert(0, (base, RunInfo.read(base)))
    if not infos:
        raise UserError("nothing to render with: pass --lora RUN_DIR[:scale] (repeatable) or --base RUN_DIR")
    first_dir, first = infos[0]
    key = (first.family, first.base_model, first.revision, first.tiny_seed if first.tiny else None)
    for run_dir, info in infos[1:]:
        other = (info.family, info.base_model, info.revision, info.tiny_seed if info.tiny else None)
        if other != key:
            raise UserError(f"{run_dir} was trained on {other[:3]} but {first_dir} on {key[:3]}: "
                            f"adapters can only be combined on the same base model")
    for ref in loras:  # before any weights load: a damaged or foreign file is an AdapterError
        read_adapter_file(ref.run_dir / RunInfo.read(ref.run_dir).weight_name)
    family = get_family(first.family).load(base_spec(first, device, dtype), device=device)
    return family, first


def apply_loras(pipe, loras: list[LoraRef], merge: bool) -> list[str]:
    """Load each adapter with its scale; with ``merge`` fuse them into the base weights and drop
    the LoRA layers. Returns the adapter names."""
    names = []
    for i, ref in enumerate(loras):
        info = RunInfo.read(ref.run_dir)
        name = f"lora{i}"
        pipe.load_lora_weights(str(ref.run_dir), weight_name=info.weight_name, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, [ref.scale for ref in loras])
        if merge:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()
    return names


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


def complete_args(args: RenderArgs, family: Family, info: RunInfo) -> RenderArgs:
    """Fill unset frames, size and fps from the training recipe; check them against the family.
    Raises UserError naming the flag and a valid value."""
    data = info.recipe.get("data", {})
    done = replace(args, frames=args.frames or data.get("frames"), height=args.height or data.get("height"),
                   width=args.width or data.get("width"), fps=float(args.fps or data.get("fps") or family.default_fps))
    if not family.frame_rule.is_valid(done.frames):
        raise UserError(f"--frames {done.frames} must be {family.frame_rule.describe()} for {family.name} "
                        f"(try {family.frame_rule.nearest(done.frames)})")
    for flag, v in (("--height", done.height), ("--width", done.width)):
        if v % family.spatial_factor:
            raise UserError(f"{flag} {v} must be a multiple of {family.spatial_factor} for {family.name}")
    if done.steps < family.min_inference_steps:
        raise UserError(f"--steps {done.steps}: {family.name} needs at least {family.min_inference_steps}")
    return done


def render(family: Family, pipe, args: RenderArgs) -> torch.Tensor:
    """Run the pipeline with complete ``args``. Returns frames [F, H, W, 3] float in [0, 1]."""
    device = next(family.components.transformer.parameters()).device
    out = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt or None, num_frames=args.frames, height=args.height,
        width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator(device=device).manual_seed(args.seed), output_type="pt",
        **family.pipeline_call_kwargs(args.fps),
    )
    video = out.frames[0]  # [F, 3, H, W] in [0, 1]
    return video.permute(0, 2, 3, 1).float().cpu()


def render_to_file(family: Family, pipe, args: RenderArgs, out: Path) -> Path:
    return write_video(render(family, pipe, args), out, args.fps)
