"""LongCat-Video (Meituan, MIT licence, 13.6B): text-to-video, image-to-video and video
continuation with one transformer, behind the family protocol.

Latent space: the Wan 2.1 VAE (AutoencoderKLWan: 16 channels, 8x spatial, 4x temporal), per-channel
mean/std normalisation from its config. Text: umT5-XXL hidden states [B, 512, 4096] with an
attention mask. Transformer: :class:`~finetune.families.longcat_model.LongCatVideoTransformer3DModel`
with (1, 2, 2) patches; it predicts ``x0 - noise`` (the negative of diffusers' flow velocity).
Inference: :class:`~finetune.families.longcat_pipeline.LongCatVideoPipeline`.

Tasks, all the way the official pipeline (``longcat_video/pipeline_longcat_video.py``:
generate_t2v / generate_i2v / generate_vc) conditions the model:
  t2v       every latent frame noised, one timestep for all.
  i2v       the first pixel frame, VAE-encoded alone, is the clean latent frame 0.
  continue  the clip's first :attr:`Family.cond_frames` pixel frames (4k+1; 13 in the official
            demo, ``model.cond_frames`` in a recipe), VAE-encoded alone, are the clean leading
            ``1 + (n - 1) / 4`` latent frames.
Clean frames carry timestep 0, are passed as ``num_cond_latents`` and are left out of the loss
(``noised_with_clean_frames``); the remaining frames train as in t2v.

Training noise: Meituan has not released training code. Noise levels are logit-normal through
the sampling shift of the released scheduler config (``scheduler/scheduler_config.json``,
``shift`` 12), as SimpleTuner's LongCat-Video trainer does (``flow_schedule_shift`` 12);
x_t = (1 - s) x0 + s noise, t = 1000 s, target ``x0 - noise`` (what the model predicts).

Checkpoints: the official repo layout (``dit/`` in the official key names, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) and the diffusers layout our pipeline's
``save_pretrained`` writes (``transformer/``) both load. bitsandbytes cannot quantise the
official layout while loading it, so with ``model.quantization`` the official ``dit/`` is first
converted once into a diffusers folder under ``$FINETUNE_CACHE`` (default
``~/.cache/finetune``)/longcat/ and the quantised model loads from there.

LoRA export: the diffusers-format file and the ComfyUI file in the official module names
(``blocks.{i}.attn.qkv`` fusing to_q/to_k/to_v, ``cross_attn.kv_linear`` fusing to_k/to_v) like
every family, through :data:`KEY_MAP`; the pipeline also loads the official LoRA format of the
released LoRAs (:func:`~finetune.families.longcat_model.official_lora_to_peft`).

Attention masks: none. The released config's ``text_tokens_zero_pad`` zeroes the padded text
tokens and cross-attention attends them all, as the official model does; the clean frames' isolation
is two unmasked self-attention calls, not a mask.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.errors import UserError
from finetune.families import register
from finetune.families._encoders import UMT5_XXL
from finetune.families._loading import bnb_quantization_config, cache_root, from_subfolders
from finetune.families._tiny import refill_zero_params, tiny_t5_text
from finetune.families._wan import WanBase
from finetune.families.base import COND_FRAMES_KEY, Components, Family, FrameRule, FullSize, ModelSpec, Noised
from finetune.families.longcat_model import (
    _BLOCK_MAP,
    _TOP_LEVEL_MAP,
    LongCatVideoTransformer3DModel,
    _is_official_layout,
    frame_timesteps,
)
from finetune.families.longcat_pipeline import LongCatVideoPipeline
from finetune.lora_formats import KeyMap, Rule

# The released scheduler: diffusers' flow-matching Euler with a static shift of 12.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=12.0)
# Transformer subfolders: the official release's and the one our pipeline's save_pretrained writes.
OFFICIAL_SUBFOLDER, DIFFUSERS_SUBFOLDER = "dit", "transformer"


# diffusers module name -> official name (meituan-longcat/LongCat-Video, longcat_video/modules/), what
# ComfyUI and the official checkpoint use: built from longcat_model's key map, the one place that
# knows them. Official ``attn.qkv`` and ``cross_attn.kv_linear`` fuse our q/k/v and k/v (equal
# widths). The table's norm entries name no adaptable module and are never matched.
KEY_MAP = KeyMap((
    *(Rule(tuple(f"blocks.{{i}}.{t}" for t in targets), f"blocks.{{i}}.{official}")
      for official, targets in _BLOCK_MAP.items()),
    *(Rule(targets, official) for official, targets in _TOP_LEVEL_MAP.items()),
))


@register
class LongCatFamily(Family):
    name = "longcat"
    frame_rule = FrameRule(4)
    spatial_factor = 16  # Wan VAE 8 x transformer patch 2
    # self- and cross-attention q/k/v/out and the SwiGLU MLP of every block
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")
    # One checkpoint and one pipeline serve every task.
    default_model_id = "meituan-longcat/LongCat-Video"
    # Its loader converts the official dit/ layout for bitsandbytes and does not read it tensor by
    # tensor yet, so fp8 would first hold the whole bf16 transformer: not offered until it does.
    fp8_ok = False
    pipeline_class = LongCatVideoPipeline
    tasks = ("t2v", "i2v", "continue")
    # The official demos sample and save at 15 fps (run_demo_*.py: target_fps = 15).
    default_fps = 15
    native_frames = 93
    # umT5 tokens per prompt, padded with a mask (the official pipeline's max_sequence_length).
    max_sequence_length: ClassVar[int] = 512
    # Conditioning frames of the official continuation demo (run_demo_video_continuation.py):
    # 13 pixel frames -> 4 clean latent frames.
    default_cond_frames: ClassVar[int] = 13
    # Tiny builds: 5 pixel frames -> 2 clean latent frames of the 3 that 9-frame clips have.
    tiny_cond_frames: ClassVar[int] = 5

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        self._check_compression()

    # --- loading ---
    @classmethod
    def transformer_subfolder(cls, spec: ModelSpec) -> str:
        """``dit`` for the official layout, ``transformer`` for a diffusers-saved folder."""
        local = Path(spec.pretrained)
        if local.is_dir():
            return DIFFUSERS_SUBFOLDER if (local / DIFFUSERS_SUBFOLDER).is_dir() else OFFICIAL_SUBFOLDER
        from huggingface_hub import file_exists

        official = file_exists(spec.pretrained, f"{OFFICIAL_SUBFOLDER}/config.json", revision=spec.revision)
        return OFFICIAL_SUBFOLDER if official else DIFFUSERS_SUBFOLDER

    @classmethod
    def _check_transformer_class(cls, spec: ModelSpec, subfolder: str) -> None:
        """Raise ValueError naming the right family when the checkpoint's transformer is not LongCat's."""
        config = LongCatVideoTransformer3DModel.load_config(spec.pretrained, subfolder=subfolder,
                                                            revision=spec.revision)
        found = config.get("_class_name", LongCatVideoTransformer3DModel.__name__)
        if found != LongCatVideoTransformer3DModel.__name__:
            hint = {"WanTransformer3DModel": " (a Wan checkpoint: family wan)",
                    "LTXVideoTransformer3DModel": " (an LTX-Video checkpoint: family ltx)"}.get(found, "")
            raise ValueError(f"longcat: {spec.pretrained} holds a {found}{hint}, not a LongCat-Video transformer; "
                             f"use a checkpoint such as {cls.default_model_id}")

    @classmethod
    def load_transformer(cls, spec: ModelSpec) -> LongCatVideoTransformer3DModel:
        """The transformer in ``spec.dtype`` (its fp32-computed layers stay float32), quantised
        if asked; an official-layout checkpoint is converted once for quantised loading."""
        quantization = bnb_quantization_config(spec)
        subfolder = cls.transformer_subfolder(spec)
        cls._check_transformer_class(spec, subfolder)
        src = dict(subfolder=subfolder, revision=spec.revision, torch_dtype=spec.dtype)
        if quantization is None:
            return LongCatVideoTransformer3DModel.from_pretrained(spec.pretrained, **src)
        folder, sub = spec.pretrained, subfolder
        if _is_official_layout(spec.pretrained, subfolder, spec.revision):
            folder, sub = str(cls.convert_official(spec, subfolder)), None
        return LongCatVideoTransformer3DModel.from_pretrained(folder, subfolder=sub, torch_dtype=spec.dtype,
                                                              quantization_config=quantization)

    @classmethod
    def convert_official(cls, spec: ModelSpec, subfolder: str = OFFICIAL_SUBFOLDER) -> Path:
        """Write the official ``dit/`` of ``spec.pretrained`` once as a diffusers folder (in
        ``spec.dtype``) under the finetune cache, so bitsandbytes can quantise it while loading.
        Returns the folder; reuses it when already there."""
        digest = hashlib.sha256(f"{spec.pretrained}@{spec.revision}:{subfolder}:{spec.dtype}".encode()).hexdigest()[:16]
        folder = cache_root("longcat") / digest
        if not (folder / "config.json").is_file():
            model = LongCatVideoTransformer3DModel.from_official(spec.pretrained, subfolder=subfolder,
                                                                 torch_dtype=spec.dtype, revision=spec.revision)
            model.save_pretrained(str(folder))
        return folder

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """Every component from the official repo layout or a diffusers-saved folder."""
        transformer = cls.load_transformer(spec)
        # The Wan VAE in float32, as the Wan docs advise for decoding quality.
        parts = from_subfolders(spec, vae=(diffusers.AutoencoderKLWan, torch.float32),
                                text_encoder=transformers.UMT5EncoderModel, tokenizer=transformers.AutoTokenizer,
                                scheduler=diffusers.FlowMatchEulerDiscreteScheduler)
        return Components(transformer, **parts)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """LongCat-Video 13.6B: the released dit/config.json (hidden 4096, depth 48, 32 heads,
        caption 4096, adaLN 512, text_tokens_zero_pad true: no cross-attention mask; not re-read
        from the hub this session), the Wan 2.1 VAE (AutoencoderKLWan defaults) and umT5-XXL."""
        return {cls.default_model_id: {
            "transformer": FullSize(LongCatVideoTransformer3DModel, dict(
                in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
                mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256, patch_size=[1, 2, 2],
                text_tokens_zero_pad=True)),
            "vae": FullSize(diffusers.AutoencoderKLWan, {}),
            "text_encoder": FullSize(transformers.UMT5EncoderModel, UMT5_XXL)}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 16, f, h, w] (8x spatial, 4x temporal), umT5 states [1, L, 4096] and mask;
        i2v and continue add the clean leading latent frames (1 image, or the default
        conditioning frames)."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        cond = {"prompt_embeds": ((1, text_len, 4096), torch.bfloat16),
                "prompt_attention_mask": ((1, text_len), torch.int64)}
        if task != "t2v":
            n = 1 if task == "i2v" else cls.default_cond_frames
            cond["cond_latents"] = ((1, 16, (n - 1) // cls.frame_rule.temporal_factor + 1, h, w), torch.bfloat16)
        return (1, 16, f, h, w), cond

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: a 2-block LongCat transformer (4 heads x 32, umT5
        width 32), the tiny Wan VAE with the real 8x/4x compression and 16 channels (statistics
        calibrated on clips), 1-layer umT5 (d_model 32), character tokenizer, the released
        scheduler config. One build serves every task, as the real checkpoint does."""
        tokenizer, text_encoder, extra = tiny_t5_text(transformers.UMT5EncoderModel, cls.tiny_max_sequence_length)
        vae = WanBase.calibrate_vae(diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        ), size=32)
        transformer = LongCatVideoTransformer3DModel(
            in_channels=16, out_channels=16, hidden_size=128, depth=2, num_heads=4, caption_channels=32,
            adaln_tembed_dim=64, frequency_embedding_size=64, text_tokens_zero_pad=True,
        )
        refill_zero_params(transformer)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler,
                          extra={**extra, COND_FRAMES_KEY: cls.tiny_cond_frames})

    # --- encoding ---
    def _pipe(self, **parts: Any) -> LongCatVideoPipeline:
        c = self.components
        kw = dict(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.transformer,
                  scheduler=c.scheduler)
        kw.update(parts)
        return LongCatVideoPipeline(**kw)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L]}
        with L = :attr:`text_len`, by the pipeline's own encode_prompt (cleaning, padding, mask).
        Raises RuntimeError if the text encoder was released."""
        self.require("encode_prompts", "text_encoder")
        pipe = self._pipe(vae=None, transformer=None, scheduler=None)
        embeds, mask = pipe.encode_prompt(list(prompts), self.text_len, device=self.components.text_encoder.device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1] fitting the family rules -> latents [B, 16, f, h, w]
        normalised with the VAE's latents_mean/std, as the pipeline does. Takes the posterior
        mode (as the Wan families), so ``generator`` is unused. Raises ValueError for a bad
        shape, RuntimeError if the VAE was released."""
        return self.config_normalised(self.vae_latents(videos, sample=False)).float()

    def task_cond_frames(self, frames: int) -> int:
        """Pixel frames of a ``frames``-frame clip that condition :attr:`task` (0 for t2v).
        Raises ValueError unless they are 4k+1 and leave at least one latent frame to denoise."""
        n = {"t2v": 0, "i2v": 1}.get(self.task, self.cond_frames)
        if n and (not self.frame_rule.is_valid(n) or n >= frames):
            raise ValueError(f"{self.name}: {n} conditioning frames must be {self.frame_rule.describe()} and fewer "
                             f"than the clip's {frames} (set model.cond_frames, e.g. 5, or raise data.frames)")
        return n

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v / continue: {"cond_latents": [B, 16, k, h, w]}, the clip's first 1 (i2v) or
        :attr:`cond_frames` (continue) pixel frames VAE-encoded on their own, as the official
        pipeline encodes the image / the frames to continue (it takes a posterior sample; here
        the mode, as for the clip's latents, so the clean frames are exactly the clip's own). The
        Wan VAE is causal in time, so these equal the first k latent frames of the clip.
        t2v: nothing."""
        n = self.task_cond_frames(videos.shape[2])
        if not n:
            return {}
        self.require("encode_conditioning", "vae")
        return {"cond_latents": self.encode_videos(videos[:, :, :n])}

    # --- training ---
    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                               cond: dict[str, torch.Tensor] | None = None) -> Noised:
        """x_t = (1 - s) x0 + s noise, t = 1000 s, target ``x0 - noise`` (LongCat predicts the
        negative flow velocity); with ``cond["cond_latents"]`` those leading frames are clean
        and out of the loss."""
        if cond and "cond_latents" in cond:
            return self.noised_with_clean_frames(latents, noise, sigmas, cond["cond_latents"])
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return Noised((1 - s) * latents + s * noise, latents - noise, sigmas * 1000.0)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, 16, f, h, w], timesteps [B] in [0, 1000], cond["prompt_embeds"]
        [B, L, D] and ["prompt_attention_mask"] [B, L] (+ ["cond_latents"] [B, 16, k, h, w])
        -> ``x0 - noise`` [B, 16, f, h, w] float32, called as the pipeline's denoising loop
        calls the transformer: per-frame timesteps with the k clean frames at 0 and
        ``num_cond_latents=k``. LongCat has no frame-rate input."""
        k = cond["cond_latents"].shape[2] if "cond_latents" in cond else 0
        dtype = self.spec.dtype
        return transformer(
            hidden_states=noisy_latents.to(dtype), timestep=frame_timesteps(timesteps, noisy_latents.shape[2], k),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond.get("prompt_attention_mask"), num_cond_latents=k, return_dict=False,
        )[0]

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The released scheduler's static shift (12) for every latent size (module docstring)."""
        return float(self.components.scheduler.config.shift)

    # --- inference ---
    def pipeline(self) -> LongCatVideoPipeline:
        """The LongCat pipeline over the current components (the transformer with any LoRA in
        it); one pipeline renders every task. Raises RuntimeError if the encoders were released."""
        self.require("pipeline()", "text_encoder", "vae")
        return self._pipe()

    def pipeline_call_kwargs(self, fps: float, image: Any = None, video: Any = None) -> dict[str, Any]:
        """Prompts padded to the length training used; the first frame for i2v; for continue the
        frames to continue (a list of PIL images; their last :attr:`cond_frames` lead the clip).
        Raises UserError for a video shorter than :attr:`cond_frames`."""
        out: dict[str, Any] = {"max_sequence_length": self.text_len}
        if image is not None:
            out["image"] = image
        if video is not None:
            if len(video) < self.cond_frames:
                raise UserError(f"--video has {len(video)} frames at this frame rate; {self.name} continues from its "
                                f"last {self.cond_frames} (model.cond_frames): pass a longer video")
            out.update(video=list(video), num_cond_frames=self.cond_frames)
        return out

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Official LongCat-Video names (``blocks.{i}.attn.qkv`` fusing attn1's to_q/to_k/to_v,
        ``blocks.{i}.cross_attn.kv_linear`` fusing attn2's to_k/to_v, ``blocks.{i}.ffn.w1``, ...)."""
        return KEY_MAP

    # --- checks ---
    def _check_compression(self) -> None:
        """The class rules (16x space, 4x time, 16 latent channels) must fit the loaded
        checkpoint: a Wan 2.2 VAE (16x, 48 channels), say, would silently break them."""
        c = self.components
        if c.vae is None or c.transformer is None:
            return
        patch = c.transformer.config.patch_size
        spatial = c.vae.config.scale_factor_spatial * patch[1]
        temporal = c.vae.config.scale_factor_temporal * patch[0]
        channels = (c.vae.config.z_dim, c.transformer.config.in_channels)
        if (spatial, temporal) != (self.spatial_factor, self.frame_rule.temporal_factor) or len(set(channels)) != 1:
            raise ValueError(
                f"{self.name}: {self.spec.display_id} compresses {spatial}x in space and {temporal}x in time with "
                f"{channels[0]} VAE channels for a {channels[1]}-channel transformer, but the {self.name} family "
                f"(LongCat-Video on the Wan 2.1 VAE) assumes {self.spatial_factor}x, "
                f"{self.frame_rule.temporal_factor}x and 16 channels; use a checkpoint such as {self.default_model_id}"
            )
