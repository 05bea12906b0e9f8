"""LTX-Video 0.9.x text-to-video (2B; 13B shares the classes) behind the family protocol.

Latent space: AutoencoderKLLTXVideo, 128 channels, 32x spatial (4x4 patchify then three 2x
downsamples) and 8x temporal compression, normalised with the VAE's latents_mean/latents_std
buffers and config.scaling_factor. Transformer: LTXVideoTransformer3DModel on packed tokens
[B, f*h*w, C], conditioned on T5-XXL hidden states with an attention mask, and on the frame
rate through its rotary position scale.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.families import register
from finetune.families._loading import bnb_quantization_config
from finetune.families._tiny import (
    calibration_videos,
    channel_stats,
    refill_zero_params,
    tiny_t5_encoder_config,
    tiny_t5_tokenizer,
)
from finetune.families.base import TEXT_LEN_KEY, Components, Family, FrameRule, ModelSpec
from finetune.lora_formats import KeyMap

# Mirrors scheduler/scheduler_config.json of Lightricks/LTX-Video: flow-matching Euler whose
# shift grows with the latent token count (1024 -> 0.95, 4096 -> 2.05, exponential).
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)

# diffusers module name -> name in the original LTX-Video checkpoint (ltx_video/models/transformers,
# also ComfyUI's LTXV model): the blocks keep their names; the inverse of diffusers'
# convert_ltx_transformer_checkpoint_to_diffusers renames the rest (patchify_proj, adaln_single).
_KEY_MAP = KeyMap((
    *((f"transformer_blocks.{{i}}.{a}.{p}", f"transformer_blocks.{{i}}.{a}.{p}")
      for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    ("transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks.{i}.ff.net.0.proj"),
    ("transformer_blocks.{i}.ff.net.2", "transformer_blocks.{i}.ff.net.2"),
    ("proj_in", "patchify_proj"),
    ("time_embed.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
    ("time_embed.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("time_embed.linear", "adaln_single.linear"),
    ("caption_projection.linear_1", "caption_projection.linear_1"),
    ("caption_projection.linear_2", "caption_projection.linear_2"),
    ("proj_out", "proj_out"),
))


@register
class LTXFamily(Family):
    name = "ltx"
    frame_rule = FrameRule(8)
    spatial_factor = 32  # VAE 32 x transformer patch 1
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    # The diffusers-format folders at the root of this repo are LTX-Video 0.9.0 and load with
    # LTXPipeline as they are (revision=None: main). Lightricks/LTX-Video-0.9.1 (timestep-aware
    # VAE) also works with LTXPipeline; 0.9.5+ and the 13B models are meant for LTXConditionPipeline.
    default_model_id = "Lightricks/LTX-Video"
    pipeline_class = diffusers.LTXPipeline
    # LTX-Video is trained on and generates 24 fps video (model card); LTXPipeline's frame_rate
    # default is 25, so the family always passes the rate explicitly (pipeline_call_kwargs).
    default_fps = 24
    # The scheduler's shift_terminal stretch divides by (1 - last sigma): one step is a zero division.
    min_inference_steps = 2

    # T5 tokens per prompt: LTXPipeline's default and what LTX-Video was trained with.
    max_sequence_length: ClassVar[int] = 128
    # Settings the LTX docs recommend for timestep-aware VAEs (0.9.1+); unused for 0.9.0.
    decode_timestep: ClassVar[float] = 0.05
    decode_noise_scale: ClassVar[float] = 0.025
    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once here, unwrapped: predict() gets the transformer maybe wrapped by DDP/PEFT,
        # and the VAE may have been released by then.
        config = components.transformer.config
        self._patch, self._patch_t = int(config.patch_size), int(config.patch_size_t)
        self._vae_spatial = self.spatial_factor // self._patch
        self._vae_temporal = self.frame_rule.temporal_factor // self._patch_t
        self._check_compression()

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        src = dict(pretrained_model_name_or_path=spec.pretrained, revision=spec.revision)
        transformer = diffusers.LTXVideoTransformer3DModel.from_pretrained(
            **src, subfolder="transformer", torch_dtype=spec.dtype, quantization_config=bnb_quantization_config(spec)
        )
        # The LTX docs recommend one dtype (bfloat16) for transformer, VAE and text encoder.
        vae = diffusers.AutoencoderKLLTXVideo.from_pretrained(**src, subfolder="vae", torch_dtype=spec.dtype)
        text_encoder = transformers.T5EncoderModel.from_pretrained(**src, subfolder="text_encoder", dtype=spec.dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(**src, subfolder="scheduler")
        return Components(transformer, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 8), a VAE with 8
        channels per block that keeps the real compression (patch 4, three 2x spatio-temporal
        downsamples: 32x space, 8x time) and 8 latent channels (its latent statistics measured on
        calibration clips), 1-layer T5 with d_model 32, character tokenizer, the real scheduler config."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_t5_tokenizer(model_max_length=text_len)
        text_encoder = transformers.T5EncoderModel(tiny_t5_encoder_config(transformers.T5Config, tokenizer))
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            patch_size=4,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
            timestep_conditioning=False,  # as 0.9.0, the default checkpoint
        )
        # The checkpoint's latents_mean/std buffers fit the real VAE; measure the tiny one's the
        # same way (on posterior samples, what encode_videos uses) so normalisation is not a no-op.
        with torch.no_grad():
            raw = vae.encode(calibration_videos(frames=9, height=64, width=64)).latent_dist.sample()
            mean, std = channel_stats(raw)
            vae.latents_mean.copy_(torch.tensor(mean))
            vae.latents_std.copy_(torch.tensor(std))
        transformer = diffusers.LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=32,
        )
        refill_zero_params(transformer)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra={TEXT_LEN_KEY: text_len})

    # --- encoding ---
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L] bool}
        with L = :attr:`text_len`. Raises RuntimeError if the text encoder was released."""
        c = self.components
        self.require("encode_prompts", "text_encoder")
        # The pipeline's own encode_prompt rather than a copy of it; only the text parts are registered.
        pipe = diffusers.LTXPipeline(
            scheduler=None, vae=None, text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=None
        )
        embeds, mask, _, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.text_len
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 8k+1, H and W multiples of 32
        -> unpacked latents [B, C, (F-1)/8+1, H/32, W/32], normalised as LTXPipeline expects.

        Samples the posterior with ``generator``, as the original LTX-Video ``vae_encode`` does
        (the model was trained on sampled latents). Raises ValueError for a bad shape,
        RuntimeError if the VAE was released."""
        vae = self.components.vae
        self.require("encode_videos", "vae")
        self.check_videos(videos)
        latents = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
        return diffusers.LTXPipeline._normalize_latents(
            latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )

    # --- training ---
    def predict(
        self,
        transformer: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        fps: float,
    ) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond as from
        :meth:`encode_prompts`, fps of the clip -> velocity [B, C, f, h, w] in the transformer's dtype.

        Packs to tokens, calls the transformer the way LTXPipeline.__call__ does (mask, grid size,
        rope_interpolation_scale from the VAE ratios and fps), and unpacks."""
        _, _, frames, height, width = noisy_latents.shape
        p, pt = self._patch, self._patch_t
        # Token grid; equal to the latent grid LTXPipeline passes, since LTX 0.9.x patches are 1.
        grid_f, grid_h, grid_w = frames // pt, height // p, width // p
        # Cast to the model dtype as LTXPipeline does; read it from the spec because the
        # transformer may be wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        tokens = diffusers.LTXPipeline._pack_latents(noisy_latents.to(dtype), p, pt)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep=timesteps,
            encoder_attention_mask=cond["prompt_attention_mask"],
            num_frames=grid_f,
            height=grid_h,
            width=grid_w,
            rope_interpolation_scale=(self._vae_temporal / fps, self._vae_spatial, self._vae_spatial),
            return_dict=False,
        )[0]
        return diffusers.LTXPipeline._unpack_latents(out, grid_f, grid_h, grid_w, p, pt)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """exp(mu) for latents [B, C, f, h, w], mu linear in the token count f*h*w between the
        scheduler config's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift):
        the shift LTXPipeline samples with at that size."""
        _, _, frames, height, width = latent_shape
        cfg = self.components.scheduler.config
        # Same token count LTXPipeline.__call__ computes mu from (latent frames x height x width).
        return self.resolution_shift(
            frames * height * width, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )

    # --- inference ---
    def pipeline(self) -> diffusers.LTXPipeline:
        """LTXPipeline over the current components (the transformer with any LoRA adapter in it).
        Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        return diffusers.LTXPipeline(
            scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
            transformer=c.transformer,
        )

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The clip frame rate (rope scale), the training prompt length, and for timestep-aware
        VAEs (0.9.1+) the recommended decode noise."""
        kwargs: dict[str, Any] = {"frame_rate": fps, "max_sequence_length": self.text_len}
        vae = self.components.vae
        if vae is not None and vae.config.timestep_conditioning:
            kwargs.update(decode_timestep=self.decode_timestep, decode_noise_scale=self.decode_noise_scale)
        return kwargs

    # --- checks ---
    def _check_compression(self) -> None:
        """The class-level frame and size rules must match the loaded checkpoint."""
        vae = self.components.vae
        if vae is None:
            return
        found = (vae.spatial_compression_ratio * self._patch, vae.temporal_compression_ratio * self._patch_t)
        if found != (self.spatial_factor, self.frame_rule.temporal_factor):
            raise ValueError(
                f"ltx: {self.spec.display_id} compresses {found[0]}x in space and {found[1]}x in time, but the ltx "
                f"family assumes {self.spatial_factor}x and {self.frame_rule.temporal_factor}x; use an LTX-Video "
                f"0.9.x checkpoint such as {self.default_model_id}"
            )

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original LTX-Video names (``patchify_proj``, ``adaln_single.*``; blocks as in diffusers)."""
        return _KEY_MAP
