"""The model-family protocol: everything the generic code (config, cache, trainer, export,
inference) needs to know about a base model family, and nothing more.

A family file (``finetune/families/<name>.py``) subclasses :class:`Family`, fills the class
attributes and implements the abstract methods, then registers itself with
``@register``. Generic code never branches on a family name; it calls these methods.

Shapes used throughout:
  videos:  [B, 3, F, H, W] float in [-1, 1] (pixel space)
  latents: [B, C, f, h, w] normalised so the flow-matching prior N(0, 1) fits them
  text:    dict of tensors, each with a leading batch dim [B, ...]
  cond:    what ``predict`` conditions on: the text tensors plus, for image-to-video, the tensors
           ``encode_conditioning`` made at cache time (all with a leading batch dim)

Tasks: ``t2v`` (text to video), ``i2v`` (image to video, the clip's first frame as the
condition) and ``continue`` (video continuation: the clip's first :attr:`Family.cond_frames` frames
as the condition); a family lists the ones it supports in :attr:`Family.tasks`, and
:meth:`Family.task_input` says what rendering each one needs besides the prompt.

Audio: a family whose model generates sound with the picture (LTX-2) sets
:attr:`Family.supports_audio`; a recipe's ``data.audio: true`` then caches each clip's sound
through :meth:`Family.encode_audio` and the family trains it as a further :class:`Stream` of
:class:`Noised`; :meth:`Family.rendered_audio` hands the pipeline's sound to the mp4 writer.

Experts: a model may have several transformers, each serving a range of noise levels (Wan 2.2
A14B: ``transformer`` for high noise, ``transformer_2`` for low). :meth:`Family.experts` lists
them; the trainer routes each micro-batch to one expert and only that expert's LoRA learns.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from finetune.weights import vae as vae_tiling
from finetune.weights.dtypes import keeps_fp32
from finetune.weights.encoders import TEXT_ENCODERS, prepare_text_encoder, text_encoder_device
from finetune.weights.fp8 import quantize_fp8

if TYPE_CHECKING:
    from finetune.lora_formats import KeyMap


@dataclass(frozen=True)
class FrameRule:
    """Valid frame counts are ``temporal_factor * k + 1`` (k >= 0): the VAE keeps the first
    frame and compresses the rest ``temporal_factor`` to one."""

    temporal_factor: int

    def is_valid(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.temporal_factor == 0

    def floor(self, frames: int) -> int:
        """Largest valid count <= ``frames`` (1 if ``frames`` < 1)."""
        return max(1, (max(frames, 1) - 1) // self.temporal_factor * self.temporal_factor + 1)

    def nearest(self, frames: int) -> int:
        """Closest valid count; ties go up."""
        lo = self.floor(frames)
        hi = lo + self.temporal_factor
        return hi if (hi - frames) <= (frames - lo) else lo

    def describe(self) -> str:
        return f"{self.temporal_factor}k+1"


@dataclass
class ModelSpec:
    """Where the weights come from. ``tiny`` builds a seeded random model from a config in code
    (same classes as the real model) instead of calling ``from_pretrained`` on ``pretrained``."""

    pretrained: str
    revision: str | None = None
    tiny: bool = False
    tiny_seed: int = 0
    dtype: torch.dtype = torch.float32
    # "none" | "int8" | "nf4": bitsandbytes quantisation of the frozen transformer (CUDA only);
    # "fp8": e4m3 block weights with per-row scales, quantised while loading (finetune/weights/fp8.py).
    quantization: str = "none"
    # "gpu" | "cpu" | "int8" | "fp8": where/how the text encoders run (finetune/weights/encoders.py).
    text_encoder: str = "gpu"
    # "t2v" | "i2v" | ...: one of the family's tasks; picks the default checkpoint and pipeline.
    task: str = "t2v"
    # tasks conditioned on a video (continue): pixel frames of it given clean; None = the family's
    cond_frames: int | None = None
    # "auto" | "on" | "off": tiled VAE encode/decode (finetune/weights/vae.py)
    vae_tiling: str = "auto"
    # "pretrained" | "random": the checkpoint's weights, or random values of the full-size configs
    # (Family.load_random) through the same tensor-by-tensor loading; for measuring memory and speed
    weights: str = "pretrained"

    @property
    def display_id(self) -> str:
        if self.tiny:
            return f"tiny-random(seed={self.tiny_seed})"
        return f"{self.pretrained} (random weights)" if self.weights == "random" else self.pretrained


@dataclass
class Components:
    """The loaded modules of one base model. Encoders may be ``None`` once released.
    ``transformer_2`` is the second expert of two-expert models; ``image_encoder`` and
    ``image_processor`` the image conditioning of i2v models that take image embeddings;
    ``text_encoder_2`` and ``tokenizer_2`` the second text encoder of models that have two
    (HunyuanVideo-1.5's byT5 glyph encoder)."""

    transformer: torch.nn.Module | None
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: Any
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)
    transformer_2: torch.nn.Module | None = None
    image_encoder: torch.nn.Module | None = None
    image_processor: Any = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None

    # modules an encoder release drops, in the order encoders_id hashes them
    ENCODERS = ("vae", "text_encoder", "image_encoder", "text_encoder_2")

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every loaded torch module by attribute name (released ones left out)."""
        names = ("transformer", "transformer_2", *self.ENCODERS)
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n), torch.nn.Module)}


@dataclass(frozen=True)
class Expert:
    """One trainable transformer of a model and the noise levels it serves: sigmas in
    ``[low, high)`` (the top range includes 1). ``name`` is what ``model.experts`` lists."""

    name: str
    attr: str  # Components attribute: "transformer" or "transformer_2"
    low: float = 0.0
    high: float = 1.0

    def serves(self, sigma: float) -> bool:
        return self.low <= sigma < self.high or (self.high >= 1.0 and sigma >= 1.0)


@dataclass
class Stream:
    """A further latent stream trained together with the video (LTX-2's audio): its noisy input and
    model timesteps, which :meth:`Family.predict` receives in ``streams``, and the target its
    prediction is compared with; the trainer adds ``weight`` x its MSE to the video loss.

    noisy, target: [B, ...] (the family's layout); timesteps: [B]."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: float = 1.0


@dataclass
class Noised:
    """What the loss needs for one micro-batch: the transformer input, the regression target,
    the model timesteps, and which latent positions count (None = all); ``streams``: further
    streams trained with the video, by name (empty for video-only training).

    noisy, target: [B, C, f, h, w]; timesteps: [B]; loss_mask: broadcastable to the latents,
    1 where the loss counts and 0 on clean conditioning frames."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    loss_mask: torch.Tensor | None = None
    streams: dict[str, Stream] = field(default_factory=dict)


@dataclass(frozen=True)
class FullSize:
    """One component of a released checkpoint as data, for the memory planner: the class the
    checkpoint loads into and the values of its ``config.json`` (the model is then built from
    them on the meta device, never with weights). ``dtype``: the dtype the family loads it in
    when that is not the recipe's (the Wan VAE in float32); None = the recipe's. ``block_keys``:
    the config keys that count a transformer's repeated blocks (the planner builds it with each set
    to 1 or 2); diffusers' names by default, a family whose transformer names them otherwise says so."""

    cls: type
    config: dict[str, Any]
    dtype: torch.dtype | None = None
    block_keys: tuple[str, ...] = ("num_layers", "num_single_layers", "depth")

    def block_counts(self) -> dict[str, int]:
        """The :attr:`block_keys` this config sets to more than one block, with their values."""
        return {k: self.config[k] for k in self.block_keys if isinstance(self.config.get(k), int) and self.config[k] > 1}


# components.extra key of a tiny build's prompt length
TEXT_LEN_KEY = "max_sequence_length"
# components.extra key of a tiny build's default conditioning-video length (continue task)
COND_FRAMES_KEY = "cond_frames"
# What rendering a task needs besides the prompt (see Family.task_input).
TASK_INPUTS: dict[str, str | None] = {"t2v": None, "i2v": "image", "continue": "video"}


def _fit_image_processor(components: "Components") -> None:
    """Resize a tiny build's image processor to the image size of the full-size vision model that
    reads its images (the image encoder, or a vision-language text encoder's vision tower)."""
    proc = components.image_processor
    if proc is None:
        return
    for m in (components.image_encoder, components.text_encoder):
        config = getattr(m, "config", None)
        size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", None)
        if isinstance(size, int):
            for attr in ("size", "crop_size"):
                value = getattr(proc, attr, None)
                if isinstance(value, dict):
                    setattr(proc, attr, {k: size for k in value})
            return


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters and buffers to ``dtype`` in place, keeping in float32 what
    ``from_pretrained`` keeps there (``_keep_in_fp32_modules``: Kandinsky 5's time embeddings and
    modulation, Wan's time embedder and norms), so a built model computes as a loaded one does."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keeps_fp32(model, name, dtype) else dtype)


class Family(ABC):
    """One base-model family (Wan, LTX-Video, ...). Instances hold the loaded components."""

    # --- facts, usable before any weights load (recipe validation, data_prep) ---
    name: ClassVar[str]
    frame_rule: ClassVar[FrameRule]
    # height and width must be multiples of this (VAE spatial factor x transformer patch size)
    spatial_factor: ClassVar[int]
    default_lora_targets: ClassVar[tuple[str, ...]]
    default_model_id: ClassVar[str]
    # diffusers pipeline class of the t2v task (the only one for most families)
    pipeline_class: ClassVar[type]
    # tasks this family trains; the first is the default
    tasks: ClassVar[tuple[str, ...]] = ("t2v",)
    # per-task checkpoint and pipeline where they differ from default_model_id / pipeline_class
    task_model_ids: ClassVar[dict[str, str]] = {}
    task_pipeline_classes: ClassVar[dict[str, type]] = {}
    # expert names a recipe may list in model.experts (empty: one transformer, nothing to pick)
    expert_names: ClassVar[tuple[str, ...]] = ()
    default_fps: ClassVar[int]
    # the clip length the released pipeline generates by default (its num_frames): what the
    # shipped recipes are planned at (bench/plan_recipes.py --replan)
    native_frames: ClassVar[int | None] = None
    # fewest sampling steps the family's scheduler accepts
    min_inference_steps: ClassVar[int] = 1
    # text tokens per prompt with the real text encoder; tiny builds use the shorter length they
    # store under TEXT_LEN_KEY in components.extra (see text_len)
    max_sequence_length: ClassVar[int]
    tiny_max_sequence_length: ClassVar[int] = 64
    # tasks whose input is a video (continue): how many pixel frames (a valid frame count) of it
    # condition the clip unless model.cond_frames says otherwise; tiny builds may store a shorter
    # default under COND_FRAMES_KEY
    default_cond_frames: ClassVar[int] = 1
    # whether model.quantization=fp8 can load this family's transformer (its block linears are
    # nn.Linear and its loader goes through _loading.load_transformer)
    fp8_ok: ClassVar[bool] = True
    # whether the model generates sound and can train it (recipe data.audio: true; encode_audio)
    supports_audio: ClassVar[bool] = False
    # whether the family's VAE encodes and decodes in tiles (memory.vae_tiling=on); the default
    # switch, set_vae_tiling, calls the diffusers VAE's own enable_tiling/enable_slicing
    vae_tiles: ClassVar[bool] = True

    def __init__(self, components: Components, spec: ModelSpec):
        self.components = components
        self.spec = spec

    @classmethod
    def model_id_for(cls, task: str) -> str:
        """The default checkpoint of ``task``."""
        return cls.task_model_ids.get(task, cls.default_model_id)

    @classmethod
    def pipeline_class_for(cls, task: str) -> type:
        """The diffusers pipeline class that renders ``task``."""
        return cls.task_pipeline_classes.get(task, cls.pipeline_class)

    @property
    def task(self) -> str:
        return self.spec.task

    @classmethod
    def task_input(cls, task: str) -> str | None:
        """What rendering ``task`` needs besides the prompt: ``"image"`` (the first frame, i2v),
        ``"video"`` (frames to continue) or None (t2v)."""
        return TASK_INPUTS.get(task)

    @classmethod
    def min_frames(cls, task: str, cond_frames: int | None = None) -> int:
        """The shortest clip ``task`` trains on: one frame for t2v; for i2v and continue, their
        conditioning frames (the image; ``cond_frames``, else :attr:`default_cond_frames`) and one
        latent frame more to generate."""
        given = {None: 0, "image": 1}.get(cls.task_input(task), cond_frames or cls.default_cond_frames)
        return given + cls.frame_rule.temporal_factor if given else 1

    @property
    def cond_frames(self) -> int:
        """Pixel frames of the conditioning video of a ``"video"``-input task: ``spec.cond_frames``,
        else the tiny build's default, else :attr:`default_cond_frames`."""
        return int(self.spec.cond_frames or self.components.extra.get(COND_FRAMES_KEY, self.default_cond_frames))

    @classmethod
    def default_targets(cls, audio: bool = False) -> tuple[str, ...]:
        """Modules a LoRA adapts unless ``lora.targets`` says otherwise: :attr:`default_lora_targets`,
        plus, for audio-video runs (``audio``), the family's sound and cross-modal modules."""
        return cls.default_lora_targets

    def experts(self) -> list[Expert]:
        """The model's trainable transformers with their noise ranges; one full-range expert
        unless the family has several."""
        return [Expert("transformer", "transformer")]

    # --- facts for the memory planner (finetune/memory) ---
    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """The released checkpoints of ``task`` as data: checkpoint id -> Components attribute
        name ("transformer", "transformer_2", "vae", "text_encoder", "text_encoder_2",
        "image_encoder"; "audio_vae" for families with :attr:`supports_audio`, counted only for
        ``data.audio: true``) -> :class:`FullSize`. The planner builds them on the meta device to
        count parameters and trace one block, offline. Raises NotImplementedError until a family
        provides them."""
        raise NotImplementedError(f"{cls.name}: no full-size configs for the memory planner; implement "
                                  f"{cls.__name__}.full_size_configs (see finetune/families/wan.py)")

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Shapes of what :meth:`predict` takes for one clip of ``frames`` x ``height`` x ``width``
        pixels at full size: the latent shape [1, C, f, h, w] and ``cond`` as key -> (shape,
        dtype), with ``text_len`` text tokens. The planner makes fake tensors of them to trace the
        transformer. Raises NotImplementedError until a family provides them."""
        raise NotImplementedError(f"{cls.name}: no planning inputs for the memory planner; implement "
                                  f"{cls.__name__}.planning_inputs (see finetune/families/_wan.py)")

    @classmethod
    def planning_streams(cls, task: str, frames: int, height: int, width: int,
                         fps: float) -> dict[str, tuple[int, ...]]:
        """Shapes of the further streams (:attr:`Noised.streams`, by name) that an audio-video step
        (``data.audio: true``) trains for one clip of ``frames`` x ``height`` x ``width`` pixels at
        ``fps``: the noisy input's shape [1, L, C] (L tokens). The planner traces them requiring grad, as
        the adapted streams are. Default: none (families without :attr:`supports_audio`)."""
        return {}

    # --- loading ---
    @classmethod
    def load(cls, spec: ModelSpec, device: torch.device | str = "cpu",
             transformer_device: torch.device | str | None = None) -> "Family":
        """Build the family with weights from ``spec``: the real ``from_pretrained`` path or the
        tiny random model. Frozen modules are put in eval mode with ``requires_grad=False``; text
        encoders are quantised or kept on the CPU as ``spec.text_encoder`` says; the VAE tiles as
        ``spec.vae_tiling`` says on ``device`` (raises VaeTilingUnsupported for an impossible ``on``).
        The transformers go to ``transformer_device`` if given (the CPU under block swap, which
        moves them to the accelerator only once their swapped blocks stream), else to ``device``."""
        if spec.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.tiny_seed)
                components = cls.build_tiny(spec.task)
            for m in components.modules().values():
                # Tiny models are built in fp32; cast only when asked for another dtype.
                if spec.dtype != torch.float32:
                    cast_as_loaded(m, spec.dtype)
            if spec.quantization == "fp8":  # the real path quantises while loading
                for name, m in components.modules().items():
                    if name.startswith("transformer"):
                        quantize_fp8(m, what=f"model.quantization=fp8: {cls.name} {name}")
        elif spec.weights == "random":
            components = cls.load_random(spec)
        else:
            components = cls.load_pretrained(spec)
        for name, m in components.modules().items():
            m.requires_grad_(False)
            m.eval()
            if name in TEXT_ENCODERS:
                prepare_text_encoder(name, m, spec.text_encoder)
                m.to(text_encoder_device(spec.text_encoder, device))
            elif spec.quantization in ("none", "fp8") or not name.startswith("transformer"):
                on_host = transformer_device is not None and name.startswith("transformer")
                m.to(transformer_device if on_host else device)
        family = cls(components, spec)
        family.set_vae_tiling(vae_tiling.wanted(spec.vae_tiling, device))
        return family

    @classmethod
    @abstractmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """Load every component with ``from_pretrained(spec.pretrained, subfolder=..., revision=...)``
        in ``spec.dtype``; the transformer through ``_loading.load_transformer``, which quantises it
        (bitsandbytes int8/nf4, fp8 while loading) if ``spec.quantization`` says so."""

    # components.extra keys by which a tiny build shrinks the family's facts (prompt length, ...);
    # a random full-size build (load_random) drops them, so the real values apply
    tiny_extras: ClassVar[tuple[str, ...]] = (TEXT_LEN_KEY, COND_FRAMES_KEY)

    @classmethod
    def load_random(cls, spec: ModelSpec) -> Components:
        """``model.weights: random``: every component of ``spec.pretrained`` that
        :meth:`full_size_configs` lists, built from its full-size config with random values and
        loaded tensor by tensor as real weights load (``_loading.random_module``: the load dtype,
        float32 where ``from_pretrained`` keeps it, the transformers' block linears quantised to fp8
        while loading for ``model.quantization=fp8``); the parts without weights (tokenizers,
        scheduler, image processors, guider) from the tiny build, whose tokens index any vocabulary,
        with image processors resized to the full-size image encoder and :attr:`tiny_extras`
        dropped. Raises UserError for a checkpoint without full-size configs."""
        from finetune.errors import UserError
        from finetune.families._loading import random_module

        known = cls.full_size_configs(spec.task)
        parts = known.get(spec.pretrained)
        if parts is None:
            raise UserError(f"model.weights=random: no full-size config of {spec.pretrained!r} in {cls.name} "
                            f"(task {spec.task}); known: {', '.join(sorted(known))}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.tiny_seed)
            components = cls.build_tiny(spec.task)
        for key in cls.tiny_extras:
            components.extra.pop(key, None)
        for name, full in parts.items():
            quant = spec.quantization if name.startswith("transformer") else "none"
            module = random_module(full, full.dtype or spec.dtype, quant)
            if hasattr(components, name):
                setattr(components, name, module)
            else:  # components the family keeps in extra (LTX-2's audio VAE)
                components.extra[name] = module
        tiny = [n for n, m in [*components.modules().items(), *components.extra.items()]
                if isinstance(m, torch.nn.Module) and n not in parts]
        if tiny:
            raise UserError(f"model.weights=random: {cls.name} has no full-size config for {', '.join(tiny)} of "
                            f"{spec.pretrained}; add {'them' if len(tiny) > 1 else 'it'} to "
                            f"{cls.__name__}.full_size_configs")
        cls.fit_random_parts(components)
        return components

    @classmethod
    def fit_random_parts(cls, components: Components) -> None:
        """Fit a tiny build's parts without weights to the full-size modules :meth:`load_random`
        put beside them (in place). Default: image processors resized to the vision model's image
        size. Families whose other parts depend on module sizes (a prompt template counting image
        tokens) extend it."""
        _fit_image_processor(components)

    @classmethod
    @abstractmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """A tiny random model for ``task`` from configs in code, same classes as the real one.
        Called under a fixed torch seed; must refill all-zero parameters (gates, modulation) with
        small noise so LoRA gradients are not blocked."""

    def set_vae_tiling(self, on: bool | None) -> None:
        """``memory.vae_tiling``: the VAE encodes and decodes tile by tile with its own tile sizes
        (True), whole frames (False) or as loaded (None); see finetune/weights/vae.py. Families whose
        VAE tiles some other way override this. Raises VaeTilingUnsupported for True when
        :attr:`vae_tiles` is False or the VAE has no ``enable_tiling``."""
        if on is not None and self.components.vae is not None:
            vae_tiling.set_tiling(self.components.vae, on, self.name, self.vae_tiles)

    def vae_tiling_on(self) -> bool:
        """Whether the VAE encodes in tiles now (tiled latents differ slightly: the cache keys them)."""
        return vae_tiling.tiling_on(self.components.vae)

    @property
    def text_len(self) -> int:
        """Tokens per prompt: :attr:`max_sequence_length`, or the tiny model's shorter one."""
        return int(self.components.extra.get(TEXT_LEN_KEY, self.max_sequence_length))

    # --- encoding (cache time) ---
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs for ``prompts``: a dict of tensors with batch dim ``len(prompts)``,
        exactly what :meth:`predict` takes as ``text``."""

    @abstractmethod
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, f, h, w]."""

    @torch.no_grad()
    def vae_latents(self, videos: torch.Tensor, generator: torch.Generator | None = None,
                    sample: bool = True) -> torch.Tensor:
        """The VAE posterior of ``videos`` [B, 3, F, H, W] in [-1, 1], checked against the family
        rules, as raw latents [B, C, f, h, w] in the VAE's dtype: a sample drawn with
        ``generator``, or the posterior's mode (``sample=False``). What :meth:`encode_videos`
        normalises. Raises ValueError for a bad shape, RuntimeError if the VAE was released."""
        vae = self.components.vae
        self.require("encode_videos", "vae")
        self.check_videos(videos)
        posterior = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator) if sample else posterior.mode()

    def config_normalised(self, latents: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """latents [B, C, f, h, w] -> (latents - mean) * ``scale`` / std with the per-channel
        ``latents_mean`` / ``latents_std`` lists of the VAE's config (the Wan and Mochi VAEs): the
        inverse of what their pipelines do before decoding."""
        cfg = self.components.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) * scale / std

    def scaled_latents(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample of ``videos`` (:meth:`vae_latents`) times the VAE's ``scaling_factor``,
        no shift: the latents of VAEs whose pipelines divide by that factor before decoding."""
        return self.vae_latents(videos, generator) * self.components.vae.config.scaling_factor

    def encoders_id(self) -> str:
        """Names the weights that produce cached latents and embeddings. Real weights: the model id
        (its revision is keyed separately). Tiny models: a digest of the encoder weights, so a
        change to a tiny builder never reuses stale cache entries."""
        # Quantised text encoders give other embeddings than the full-precision ones.
        mode = self.spec.text_encoder
        suffix = f"+text_encoder-{mode}" if mode in ("int8", "fp8") else ""
        if not self.spec.tiny:  # random weights encode differently: never share their cache entries
            return self.spec.pretrained + ("+random-weights" if self.spec.weights == "random" else "") + suffix
        h = hashlib.sha256()
        encoders = [getattr(self.components, n) for n in Components.ENCODERS]
        for module in (m for m in encoders if m is not None):
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                t = t.dequantize() if type(t) is not torch.Tensor else t  # torchao fp8/int8 weights
                h.update(t.detach().float().cpu().numpy().tobytes())
        return f"{self.spec.display_id}:{h.hexdigest()[:16]}{suffix}"

    def release_encoders(self) -> None:
        """Drop the text encoders, VAE and image encoder so their memory is free for training."""
        for name in Components.ENCODERS:
            setattr(self.components, name, None)

    def move_encoders(self, device: torch.device | str) -> None:
        """Park the encoders on ``device`` (the CPU between validation renders)."""
        for name in Components.ENCODERS:
            m = getattr(self.components, name)
            if m is not None:
                m.to(device)

    def conditioning_uses_captions(self) -> bool:
        """Whether :meth:`encode_conditioning` needs each clip's caption: models whose image
        conditioning goes through a text encoder reading image and prompt together (a
        vision-language model). The cache then passes ``captions`` and keys the entry on them."""
        return False

    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor,
                            captions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Cache-time conditioning of :attr:`task` for clips ``videos`` [B, 3, F, H, W] in [-1, 1]
        whose latents (from :meth:`encode_videos`) are ``latents`` [B, C, f, h, w]: a dict of
        tensors with batch dim B that :meth:`predict` receives in ``cond``. Image-to-video
        families build it from the first frame; text-to-video needs nothing. ``captions`` (one
        per clip) come only when :meth:`conditioning_uses_captions`; tensors returned under a
        key of :meth:`encode_prompts` replace the caption's image-less ones."""
        return {}

    def audio_format(self) -> tuple[int, int]:
        """(sample rate in Hz, channels) in which :meth:`encode_audio` takes a clip's sound.
        Raises NotImplementedError for families without :attr:`supports_audio`."""
        raise NotImplementedError(f"{self.name}: no audio stream (supports_audio is False)")

    def encode_audio(self, waveforms: torch.Tensor, latents: torch.Tensor, fps: float) -> dict[str, torch.Tensor]:
        """Cache-time sound of clips whose video latents are ``latents`` [B, C, f, h, w] at ``fps``:
        ``waveforms`` [B, channels, n] float in [-1, 1] at :meth:`audio_format`, as long as the clips
        -> a dict of tensors with batch dim B stored beside the latents (``predict`` receives them in
        ``cond``). Raises NotImplementedError for families without :attr:`supports_audio`."""
        raise NotImplementedError(f"{self.name}: no audio stream (supports_audio is False)")

    # --- training ---
    @abstractmethod
    def predict(
        self,
        transformer: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        fps: float,
    ) -> torch.Tensor:
        """Run ``transformer`` (maybe wrapped by DDP/PEFT) on noisy latents [B, C, f, h, w] at
        ``timesteps`` [B] (the model's own scale, see :meth:`noisy_input_and_target`) with
        ``cond`` (text tensors and cached conditioning); returns the prediction [B, C, f, h, w]
        that :meth:`noisy_input_and_target`'s target is compared with.

        Families whose :meth:`noisy_input_and_target` returns :attr:`Noised.streams` also take
        ``streams=`` (those streams; passed only when there are some) and then return
        ``(prediction, {name: stream prediction shaped like its target})``."""

    @abstractmethod
    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """Shift s applied to flow-matching sigmas, sigma' = s*sigma / (1 + (s-1)*sigma), for
        latents of ``latent_shape`` [B, C, f, h, w]."""

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        s = self.timestep_shift(latent_shape)
        return s * sigmas / (1 + (s - 1) * sigmas)

    def training_sigmas(self, u: torch.Tensor, latent_shape: tuple[int, ...], logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> torch.Tensor:
        """How this family samples training noise levels: ``u`` [B] uniform in (0, 1) -> sigmas
        [B] in [0, 1], monotonically increasing in ``u`` (so the trainer can restrict them to an
        expert's range and take fixed quantiles). Default: logit-normal(logit_mean, logit_std)
        through its inverse CDF, then the family's timestep shift."""
        z = torch.distributions.Normal(0.0, 1.0).icdf(u.double().clamp(1e-7, 1 - 1e-7))
        return self.shift_sigmas(torch.sigmoid(logit_mean + logit_std * z).float(), latent_shape)

    def noisy_input_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> Noised:
        """Rectified flow: x_t = (1 - sigma) x_0 + sigma * noise, target velocity = noise - x_0,
        timesteps = 1000 sigma, every position in the loss. latents, noise: [B, C, f, h, w];
        sigmas: [B] in [0, 1]. First-frame image-to-video (``cond["first_latent"]``
        [B, C, 1, h, w], the clean latent of the image): that frame is given clean and left out of
        the loss (:meth:`noised_with_clean_frames`). Families whose target or timesteps differ
        override this."""
        if cond and "first_latent" in cond:
            return self.noised_with_clean_frames(latents, noise, sigmas, cond["first_latent"])
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return Noised((1 - s) * latents + s * noise, noise - latents, sigmas * 1000.0)

    def noised_with_clean_frames(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                                 clean: torch.Tensor) -> Noised:
        """Rectified flow where the first ``k = clean.shape[2]`` latent frames are given clean
        (``clean`` [B, C, k, h, w]: the conditioning frames) and left out of the loss: the way
        models that condition on clean leading frames (first-frame i2v, continuation) train."""
        out = self.noisy_input_and_target(latents, noise, sigmas)
        k = clean.shape[2]
        noisy = torch.cat([clean.to(out.noisy), out.noisy[:, :, k:]], dim=2)
        mask = torch.ones(1, 1, latents.shape[2], 1, 1, device=latents.device, dtype=latents.dtype)
        mask[:, :, :k] = 0
        return Noised(noisy, out.target, out.timesteps, mask)

    # --- inference ---
    @abstractmethod
    def pipeline(self) -> Any:
        """A diffusers pipeline (``pipeline_class``) over the current components; the encoders
        must not have been released."""

    def pipeline_call_kwargs(self, fps: float, image: Any = None, video: Any = None) -> dict[str, Any]:
        """Extra keyword arguments this family's pipeline call needs (e.g. LTX ``frame_rate``;
        the conditioning ``image``, a PIL image, for i2v; the ``video`` to continue, a list of
        PIL frames, for tasks whose :meth:`task_input` is "video"). Generic code passes ``video``
        only when it has one, so families without video tasks need not accept it."""
        out = {"image": image} if image is not None else {}
        if video is not None:
            out["video"] = video
        return out

    def rendered_audio(self, output: Any) -> tuple[Any, int] | None:
        """The sound of a pipeline call's ``output`` (its first video) as (samples [channels, n]
        float in [-1, 1] as a numpy array, sample rate), for the mp4; None for silent models."""
        return None

    # --- adapters ---
    def load_adapter(self, path: str, expert: Expert, adapter_name: str) -> None:
        """Load a diffusers-format LoRA file (``transformer.``-prefixed keys with their
        metadata) into ``expert``'s transformer, at transformer level so it works for pipelines
        without ``load_lora_weights`` too."""
        from pathlib import Path

        p = Path(path)
        transformer = getattr(self.components, expert.attr)
        transformer.load_lora_adapter(str(p.parent), weight_name=p.name, prefix="transformer",
                                      adapter_name=adapter_name)

    # --- helpers shared by families ---
    def require(self, what: str, *parts: str) -> None:
        """Raise RuntimeError if any of ``parts`` ("text_encoder", "vae") was released."""
        gone = [p for p in parts if getattr(self.components, p) is None]
        if gone:
            raise RuntimeError(f"{self.name}: {what} needs the {' and '.join(gone)}, but release_encoders() dropped "
                               f"{'them' if len(gone) > 1 else 'it'}; do this before releasing the encoders")

    def check_compression(self, spatial: int, temporal: int, fix: str | None = None) -> None:
        """Raise ValueError unless the loaded checkpoint compresses ``spatial``x in space and
        ``temporal``x in time (VAE x transformer patch), as :attr:`spatial_factor` and
        :attr:`frame_rule` assume: another checkpoint would silently break the frame and size rules.
        ``fix`` says what to use instead (default: this task's default checkpoint)."""
        if (spatial, temporal) == (self.spatial_factor, self.frame_rule.temporal_factor):
            return
        raise ValueError(
            f"{self.name}: {self.spec.display_id} compresses {spatial}x in space and {temporal}x in time, but the "
            f"{self.name} family assumes {self.spatial_factor}x and {self.frame_rule.temporal_factor}x "
            f"({self.frame_rule.describe()} frames); "
            f"{fix or f'use a checkpoint such as {self.model_id_for(self.task)}'}"
        )

    def check_videos(self, videos: torch.Tensor) -> None:
        """Raise ValueError unless videos is [B, 3, F, H, W] with F, H, W fitting the family rules."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"{self.name}: videos must be [B, 3, F, H, W], got {tuple(videos.shape)}")
        frames, height, width = videos.shape[2:]
        if not self.frame_rule.is_valid(frames):
            raise ValueError(f"{self.name}: {frames} frames is not {self.frame_rule.describe()} "
                             f"(try {self.frame_rule.nearest(frames)})")
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"{self.name}: frame size {height}x{width} must be a multiple of {f} "
                             f"(try {height // f * f}x{width // f * f})")

    @staticmethod
    def resolution_shift(seq_len: int, base_seq: int, max_seq: int, base_shift: float, max_shift: float) -> float:
        """exp(mu) with mu linear in the token count, as the LTX/Flux schedulers do."""
        m = (max_shift - base_shift) / (max_seq - base_seq)
        mu = seq_len * m + (base_shift - m * base_seq)
        return math.exp(mu)

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> "KeyMap":
        """Renames between the diffusers module names of ``transformer_name`` (``transformer``, or
        ``transformer_2`` for a second expert) and the names of the original checkpoint, which
        ComfyUI's model and kohya/musubi LoRAs use (``blocks.{i}.attn1.to_q`` <->
        ``blocks.{i}.self_attn.q``). Read them from the original model code and from diffusers'
        single-file and LoRA converters, which map them the other way. Must cover every module
        peft can adapt in the model, one to one (tests/test_lora_formats.py checks the tiny build).
        Raises NotImplementedError until a family provides it."""
        raise NotImplementedError(f"{cls.name}: no ComfyUI key map; implement {cls.__name__}.comfyui_key_map "
                                  f"(see finetune/lora_formats.py and the wan family)")
