"""Recipes: typed, validated training configuration.

A recipe is a YAML file with the sections below. ``load_recipe`` reads it, applies
``key=value`` overrides from the command line, and validates everything *before* any weights
load: unknown keys (with the closest valid name), wrong types, out-of-range values and
family rules (frame counts, sizes) are all collected and raised together as one
:class:`RecipeError`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.errors import RecipeError

# ---------------------------------------------------------------------------- sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    family: str = Field("wan", description="Model family, a name registered in finetune/families (wan, wan22, ltx, ...).")
    pretrained: str | None = Field(
        None, description="Hub id or local folder of the diffusers-format base model; null = the family default."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    tiny: bool = Field(False, description="Build a tiny random model from a config in code (demo and tests).")
    tiny_seed: int = Field(0, ge=0, description="Seed of the tiny random model.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the frozen base weights and of the computation (autocast); auto = bf16 on a "
                            "GPU, fp32 on a CPU. An explicit bf16 or fp16 is used on a CPU too."
    )
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained = the checkpoint's weights; random = every component built from its "
                                  "full-size config with random values through the same loading path (no download; "
                                  "for measuring memory and speed: the adapter it writes is not usable)."
    )
    quantization: Literal["none", "int8", "nf4", "fp8"] = Field(
        "none", description="Frozen transformer weights: int8/nf4 with bitsandbytes (CUDA only), or fp8 (e4m3, "
                            "per-row scales, quantised while loading; also runs on a CPU)."
    )
    task: str = Field("t2v", description="What the LoRA learns: t2v (text to video), i2v (first frame to video) "
                                         "or continue (video continuation), as the family supports.")
    cond_frames: int | None = Field(
        None, ge=1, le=1025, description="continue task: leading frames of each clip given clean as the video to "
                                         "continue (fit the frame rule, fewer than data.frames); null = family default."
    )
    experts: list[str] | None = Field(
        None, description="Two-expert models (Wan 2.2 A14B): which to train, [high], [low] or [high, low]; "
                          "null = all."
    )


class DataConfig(_Section):
    manifest: str | None = Field(None, description="JSONL manifest of clips (path, caption), e.g. from data_prep.")
    dataset: str | None = Field(
        None, description="Instead of a manifest: a Hugging Face dataset id (USER/NAME, downloaded once into "
                          "huggingface_hub's cache) or a local folder of clips: a data_prep dataset folder or the "
                          "videofolder layout (metadata.jsonl with file_name and caption per clip)."
    )
    frames: int = Field(..., ge=1, le=1025, description="Frames per training clip; must fit the family rule.")
    height: int = Field(..., ge=16, le=4096, description="Clip height in pixels; a multiple of the family factor.")
    width: int = Field(..., ge=16, le=4096, description="Clip width in pixels; a multiple of the family factor.")
    fps: float | None = Field(None, gt=0, le=120, description="Frame rate clips are resampled to; null = family default.")
    trigger: str = Field("", description="Trigger word(s) recorded with the adapter; added to captions lacking it.")
    repeats: int = Field(1, ge=1, le=1000, description="How many times each clip appears per epoch.")
    buckets: bool = Field(
        False, description="Train each clip at its own size from the manifest (aspect buckets); needs batch_size 1."
    )
    validation_split: float = Field(
        0.0, ge=0.0, le=0.5, description="Fraction of the manifest's clips held out from training (picked with "
        "optim.seed) for the val_loss curve; 0 = none."
    )
    validation_manifest: str | None = Field(
        None, description="JSONL manifest of held-out clips for the val_loss curve, instead of validation_split."
    )
    strict: bool = Field(
        False, description="Stop on any unusable clip or caption; false = skip it, list it in skipped_clips.jsonl."
    )
    audio: bool = Field(
        False, description="Audio-video LoRA: cache each clip's sound with the model's audio VAE and train sound and "
                           "picture together (families that generate sound); clips without sound are skipped."
    )


class LoraConfig(_Section):
    rank: int = Field(32, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: list[str] | None = Field(None, description="Module names to adapt; null = the family's default targets.")
    init_from: str | None = Field(
        None, description="LoRA file (diffusers, ComfyUI or kohya naming) to continue training from; rank, alpha and "
        "targets come from the file."
    )


class OptimConfig(_Section):
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="AdamW (torch) or AdamW8bit (bitsandbytes).")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["constant", "cosine"] = Field("constant", description="LR shape after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    max_bad_steps: int = Field(
        3, ge=1, le=1000, description="A step whose loss or gradient norm is not finite is skipped with a warning; "
                                      "this many in a row stop the run (the last checkpoint is kept)."
    )
    steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, le=64, description="Clips per process per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=256, description="Micro-batches accumulated per optimizer step.")
    seed: int = Field(42, ge=0, description="Seed of data order, noise and timesteps.")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep distribution.")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit-normal timestep distribution.")


class MemoryConfig(_Section):
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    offload_idle_expert: bool = Field(
        False, description="Two-expert models: keep the expert a step does not train in CPU memory."
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="Autocast precision; auto = bf16 on a GPU, and on a CPU the dtype model.dtype resolves "
                            "to (none for fp32)."
    )
    text_encoder: Literal["gpu", "cpu", "int8", "fp8"] = Field(
        "gpu", description="Text encoders while caching: on the GPU, in CPU memory, or on the GPU with int8/fp8 "
                           "block weights (finetune/weights/encoders.py)."
    )
    # Planner fields (finetune/memory/planner.py); train_lora.py reads them before training.
    vram_gb: float | None = Field(
        None, gt=0, le=4096, description="Accelerator memory (GiB) the memory planner plans for; null = not planned."
    )
    auto: bool = Field(
        False, description="Apply the memory planner's cheapest overrides that fit memory.vram_gb before training."
    )
    margin_gb: float | None = Field(
        None, ge=0, le=1024, description="Room the planner leaves on the card for what no trace sees (allocator "
                                         "fragmentation, kernel workspaces); null = 6% of the card."
    )
    host_gb: float | None = Field(
        None, gt=0, le=65536, description="Host memory (GiB) of the training machine, for the planner's check of "
                                          "pinned and offloaded bytes; null = this machine's."
    )
    blocks_to_swap: int = Field(
        0, ge=0, le=512, description="Block swap: the frozen weights of the transformer's last N blocks live in "
                                     "host memory and are copied in one block ahead of use (at most the model's "
                                     "block count; not with int8/nf4 weights)."
    )
    activation_offload: bool = Field(
        False, description="Keep what the transformer saves for backward (with gradient checkpointing: each "
                           "block's input) in host memory between forward and backward."
    )
    vae_tiling: Literal["auto", "on", "off"] = Field(
        "auto", description="VAE encode (cache) and decode (samples) in tiles: on, off, or auto = on for GPU runs "
                            "(finetune/weights/vae.py)."
    )

    @field_validator("vae_tiling", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class CacheConfig(_Section):
    dir: str | None = Field(None, description="Latent/embedding cache folder; null = <manifest or data.dataset "
                                              "folder>/.cache (a Hub dataset: huggingface_hub's assets folder).")


class ValidationConfig(_Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered as samples during training.")
    every: int = Field(0, ge=0, description="Render samples and compute val_loss every N steps; 0 = only at the "
                                            "end (samples if prompts, val_loss if held-out clips).")
    steps: int = Field(30, ge=1, le=500, description="Inference steps for samples.")
    guidance: float = Field(5.0, ge=0.0, le=30.0, description="Classifier-free guidance scale for samples.")
    seed: int = Field(0, ge=0, description="Seed of the samples.")
    images: list[str] = Field(
        default_factory=list, description="i2v: first-frame images for the prompts (cycled); empty = the first "
                                          "frame of the training clips."
    )


class CheckpointConfig(_Section):
    every: int = Field(250, ge=0, description="Save a resumable checkpoint every N steps; 0 = never.")
    keep_last: int = Field(3, ge=1, le=1000, description="How many recent checkpoints to keep.")


class OutputConfig(_Section):
    dir: str = Field("runs/lora", description="Run folder: adapter, resolved recipe, checkpoints, logs, samples.")
    log_every: int = Field(1, ge=1, description="Log scalars to TensorBoard every N steps.")


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    # Derived values that depend on the family are resolved here, once.
    def family_cls(self):
        from finetune.families import get_family

        return get_family(self.model.family)

    @property
    def fps(self) -> float:
        return float(self.data.fps or self.family_cls().default_fps)

    @property
    def pretrained(self) -> str:
        return self.model.pretrained or self.family_cls().model_id_for(self.model.task)

    @property
    def lora_targets(self) -> list[str]:
        return list(self.lora.targets or self.family_cls().default_targets(audio=self.data.audio))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------- validation


def family_problems(data: dict) -> list[str]:
    """Cross-field checks that need the family's rules, run on the raw recipe dict so they are
    reported together with field errors. Values of the wrong type are left to field validation."""
    from finetune.families import get_family

    model, dat, lora, val = (data.get(k) if isinstance(data.get(k), dict) else {}
                             for k in ("model", "data", "lora", "validation"))
    name = model.get("family", ModelConfig.model_fields["family"].default)
    try:
        fam = get_family(str(name))
    except KeyError as e:
        return [f"model.family={name!r}: {e.args[0]}"]
    out = []
    task = model.get("task", "t2v")
    if isinstance(task, str) and task not in fam.tasks:
        out.append(f"model.task={task!r}: {fam.name} trains {', '.join(fam.tasks)}")
    experts = model.get("experts")
    if isinstance(experts, list):
        if not fam.expert_names:
            out.append(f"model.experts={experts}: {fam.name} has one transformer (remove the key)")
        else:
            bad = [e for e in experts if e not in fam.expert_names]
            if bad or not experts or len(set(experts)) != len(experts):
                out.append(f"model.experts={experts}: list each of {', '.join(fam.expert_names)} at most once")
    rule, f = fam.frame_rule, dat.get("frames")
    if isinstance(f, int) and f >= 1 and not rule.is_valid(f):
        out.append(f"data.frames={f} must be {rule.describe()} for {fam.name} (try {rule.nearest(f)})")
    out += _cond_frames_problems(fam, task, model.get("cond_frames"), f)
    for axis in ("height", "width"):
        v = dat.get(axis)
        if isinstance(v, int) and v > 0 and v % fam.spatial_factor:
            near = max(fam.spatial_factor, round(v / fam.spatial_factor) * fam.spatial_factor)
            out.append(f"data.{axis}={v} must be a multiple of {fam.spatial_factor} for {fam.name} (try {near})")
    out += _audio_problems(fam, dat.get("audio"))
    steps = val.get("steps")
    if isinstance(steps, int) and steps < fam.min_inference_steps:
        out.append(f"validation.steps={steps}: {fam.name} needs at least {fam.min_inference_steps}")
    optim = data.get("optim") if isinstance(data.get("optim"), dict) else {}
    if dat.get("buckets") is True and isinstance(optim.get("batch_size"), int) and optim["batch_size"] > 1:
        out.append(f"data.buckets=true trains clips of different sizes, so optim.batch_size={optim['batch_size']} "
                   f"must be 1 (raise optim.grad_accum instead)")
    if dat.get("manifest") and dat.get("dataset"):
        out.append(f"data.manifest={dat['manifest']!r} and data.dataset={dat['dataset']!r}: train from one of them "
                   f"(set the other to null)")
    split, val_manifest = dat.get("validation_split"), dat.get("validation_manifest")
    if isinstance(split, (int, float)) and split > 0 and val_manifest:
        out.append(f"data.validation_split={split} and data.validation_manifest={val_manifest!r}: held-out clips come "
                   f"from one or the other (set validation_split: 0 to use the manifest)")
    init_from = lora.get("init_from")
    init_path = Path(init_from) if isinstance(init_from, str) else None
    if init_path and not (init_path.is_file() or (init_path / "video_lora.json").is_file()):
        out.append(f"lora.init_from={init_from!r}: no such LoRA file or run folder")
    elif init_path and init_path.is_file() and init_path.suffix != ".safetensors":
        out.append(f"lora.init_from={init_from!r}: LoRA files are read as .safetensors only")
    if lora.get("targets") == []:
        out.append("lora.targets=[] adapts nothing (remove the key to use the family defaults)")
    if model.get("weights") == "random" and model.get("tiny"):
        out.append("model.weights='random' builds the full-size model from its config, model.tiny=true a tiny one "
                   "(set one of them)")
    if model.get("weights") == "random" and model.get("quantization") in ("int8", "nf4"):
        out.append("model.weights='random' quantises while loading with fp8 only; int8/nf4 load through "
                   "bitsandbytes from the checkpoint's files (use model.quantization=fp8 or none)")
    if model.get("quantization", "none") not in ("none", "fp8") and model.get("tiny"):
        out.append(
            f"model.quantization={model['quantization']!r} needs real weights on a GPU (set it to none for tiny models)"
        )
    memory = data.get("memory") if isinstance(data.get("memory"), dict) else {}
    if memory.get("vae_tiling") in ("on", True) and not fam.vae_tiles:
        out.append(f"memory.vae_tiling='on': {fam.name}'s VAE cannot encode in tiles (set it to auto or off)")
    if model.get("quantization") == "fp8" and not fam.fp8_ok:
        out.append(f"model.quantization='fp8': {fam.name}'s transformer cannot be loaded in fp8 yet "
                   f"(use int8 or nf4 on a GPU, or none)")
    return out


def _audio_problems(fam, audio: Any) -> list[str]:
    """data.audio: true only for a family whose model generates sound."""
    if audio is not True or fam.supports_audio:
        return []
    from finetune.families import family_names, get_family

    sound = [n for n in family_names() if get_family(n).supports_audio]
    return [f"data.audio=true: {fam.name} generates no sound, so there is no audio stream to train (remove the key"
            + (f", or use a family that does: {', '.join(sound)})" if sound else ")")]


def _cond_frames_problems(fam, task: Any, given: Any, frames: Any) -> list[str]:
    """model.cond_frames only for video-conditioned tasks; it (or the family default) must fit
    the frame rule and leave frames to generate."""
    if not isinstance(task, str) or task not in fam.tasks:
        return []
    if fam.task_input(task) != "video":
        return [f"model.cond_frames={given}: only the continue task takes conditioning frames (remove the key)"] \
            if given is not None else []
    if given is not None and not isinstance(given, int):
        return []
    n = fam.default_cond_frames if given is None else given
    where = "model.cond_frames" if given is not None else f"{fam.name}'s default of {n} conditioning frames"
    out = []
    if n >= 1 and not fam.frame_rule.is_valid(n):
        out.append(f"{where}={n} must be {fam.frame_rule.describe()} for {fam.name} (try {fam.frame_rule.nearest(n)})")
    if isinstance(frames, int) and n >= frames:
        out.append(f"{where} ({n}) must be fewer than data.frames={frames}: nothing would be left to generate "
                   f"(set model.cond_frames lower or raise data.frames)")
    return out


def _closest(name: str, options: list[str]) -> str:
    """Hint naming the valid key most like ``name``: a spelling neighbour, else one that
    ``name`` extends (``lr_rate`` -> ``lr``)."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not close:
        close = sorted((o for o in options if name.startswith(o) or o.startswith(name)), key=len, reverse=True)[:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic section class that owns the field at ``path`` (for unknown-key hints)."""
    cls: Any = Recipe
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _describe_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            options = list(owner.model_fields) if owner else []
            problems.append(
                f"{dotted}: unknown key{_closest(str(loc[-1]), options)}; valid keys here: {', '.join(options)}"
            )
        elif e["type"] == "missing":
            owner = _model_at(loc[:-1])
            desc = owner.model_fields[str(loc[-1])].description if owner else ""
            problems.append(f"{dotted}: missing; add it ({desc})")
        else:
            problems.append(f"{dotted}={e.get('input')!r}: {e['msg']}")
    return problems


# ---------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-4", "data.frames=33"]`` -> nested dict. Values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError("command line", [f"{item!r}: overrides look like section.key=value (e.g. optim.lr=5e-5)"])
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError("command line", [f"{item!r}: {'.'.join(parts[:i + 1])} was set to a value by an "
                                                   f"earlier override, so it has no keys to set"])
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise RecipeError("command line", [f"{key.strip()}={raw}: the value is not valid YAML ({problem}); "
                                               f"quote it, e.g. {key.strip()}='\"{raw}\"'"]) from None
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Validate ``data``; raises RecipeError listing every problem."""
    if not isinstance(data, dict):
        raise RecipeError(source, [f"top level must be a mapping of sections, found {type(data).__name__}"])
    problems = family_problems(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _describe_errors(err) + problems
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, validate. Raises RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["recipe file not found (pass --recipe recipes/<family>/<file>.yaml)"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [f"not valid YAML: {e}"]) from None
    extra = parse_overrides(overrides or [])
    data = _merge(data, extra) if isinstance(data, dict) else data  # not a mapping: recipe_from_dict says so
    return recipe_from_dict(data, source=str(path))
