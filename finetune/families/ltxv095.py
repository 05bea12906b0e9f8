"""LTX-Video 0.9.5 and later (2B 0.9.5; 13B 0.9.7/0.9.8 share the classes): text-to-video and
image-to-video behind the family protocol, rendered by LTXConditionPipeline.

What changed from 0.9.0/0.9.1 (family ``ltx``), and what this file follows:
  VAE          the 0.9.5 VAE (``LTXVideo095DownBlock3D`` encoder, residual upsampling, timestep-
               conditioned decoder); same 128 channels, 32x space, 8x time.
  positions    the transformer gets explicit ``video_coords`` as LTXConditionPipeline builds them:
               latent grid scaled to pixels with the causal first-frame fix (latent frame k sits at
               pixel frame max(0, 8k - 7)), time divided by the frame rate.
  timesteps    one per token [B, f*h*w]; conditioning tokens get 0.
  sampling     LTXConditionPipeline samples with the original repo's linear-quadratic schedule, and
               the scheduler config has no resolution shift (``use_dynamic_shifting=False``).
               Training noise levels follow the official LTX-Video-Trainer: sigma = sigmoid(N(mu, 1))
               with mu linear in the token count (1024 -> 0.95, 4096 -> 2.05).
  i2v          no separate checkpoint: the first latent frame is the clean latent of the
               conditioning image, its tokens get timestep 0, and it is left out of the loss
               (LTX-Video-Trainer's first-frame conditioning; LTXConditionPipeline's ``image=``).
"""

from __future__ import annotations

from typing import ClassVar

import diffusers
import torch
import transformers

from finetune.families import register
from finetune.families._ltx import (
    LTX_2B,
    LTX_13B,
    LTX_VAE_095,
    TRAINER_SHIFT_MU,
    TRAINER_SHIFT_TOKENS,
    VAE_095_BLOCK,
    LTXBase,
    ltx_full_size,
)
from finetune.families._tiny import tiny_t5_text
from finetune.families.base import Components, FullSize

Pipeline = diffusers.LTXConditionPipeline
# Scheduler of the 0.9.5 / 0.9.7 diffusers repos (diffusers' convert_ltx_to_diffusers.py): plain
# flow-matching Euler, no dynamic shift; LTXConditionPipeline hands it explicit timesteps.
_SCHEDULER_CONFIG = dict(use_dynamic_shifting=False)


@register
class LTXV095Family(LTXBase):
    name = "ltxv095"
    vae_095 = True
    # The 2B 0.9.5 model is the one 0.9.5+ 2B checkpoint in diffusers format (0.9.6 2B ships as a
    # single file only); the 13B ones are Lightricks/LTX-Video-0.9.7-dev and -distilled. Both
    # tasks use the same weights: image-to-video is a condition on frame 0.
    default_model_id = "Lightricks/LTX-Video-0.9.5"
    pipeline_class = Pipeline
    tasks = ("t2v", "i2v")
    # LTX-Video-Trainer's frame rate for clips without one, and the rate it writes samples at.
    default_fps = 24
    native_frames = 121
    # T5 tokens per prompt: LTXConditionPipeline's default and LTX-Video-Trainer's encode_prompt.
    max_sequence_length: ClassVar[int] = 256
    # --- loading ---
    @classmethod
    def tiny_vae(cls) -> diffusers.AutoencoderKLLTXVideo:
        """The 0.9.5 VAE layout at tiny width: patch 4, then spatial, temporal and two
        spatio-temporal 2x downsamples (32x space, 8x time), three residual 2x upsamplers, a
        timestep-conditioned decoder, 8 latent channels; latent statistics measured on
        calibration clips (posterior samples, what encode_videos uses)."""
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 16, 32, 64, 64),
            down_block_types=(VAE_095_BLOCK,) * 4,
            decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, True),
            decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False, False, False, False),
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True, True, True),
            upsample_factor=(2, 2, 2),
            timestep_conditioning=True,
            patch_size=4,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
            spatial_compression_ratio=32,
            temporal_compression_ratio=8,
        )
        return cls.calibrated(vae)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """LTX-Video 0.9.5 2B and the 13B 0.9.7/0.9.8 dev checkpoints, with the 0.9.5 VAE."""
        two, thirteen = ltx_full_size(LTX_2B, LTX_VAE_095), ltx_full_size(LTX_13B, LTX_VAE_095)
        return {"Lightricks/LTX-Video-0.9.5": two, "Lightricks/LTX-Video-0.9.7-dev": thirteen,
                "Lightricks/LTX-Video-0.9.8-dev": thirteen}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 16), the 0.9.5 VAE layout
        at tiny width (:meth:`tiny_vae`), 1-layer T5 with d_model 32, character tokenizer, the
        0.9.5 repos' scheduler config. Both tasks share it, as the real checkpoints do."""
        tokenizer, text_encoder, extra = tiny_t5_text(transformers.T5EncoderModel, cls.tiny_max_sequence_length)
        vae = cls.tiny_vae()
        transformer = cls.tiny_transformer(attention_head_dim=16, cross_attention_dim=64)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)

    # --- encoding ---
    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v: {"first_latent": [B, C, 1, h, w]}, the clean latent of each clip's first frame made
        by LTXConditionPipeline's own ``prepare_latents`` for an image condition at frame 0 with
        strength 1 (what ``pipe(image=...)`` conditions on; its posterior sample is seeded, so the
        cache is deterministic). t2v: nothing. Raises RuntimeError if the VAE was released."""
        if self.task == "t2v":
            return {}
        vae = self.components.vae
        self.require("encode_conditioning", "vae")
        pipe = self._pipe(vae=vae)
        _, channels, frames, h, w = latents.shape
        firsts = []
        for i in range(videos.shape[0]):
            image = videos[i:i + 1, :, :1].to(vae.device, vae.dtype)  # [1, 3, 1, H, W]
            packed, _, _, _ = pipe.prepare_latents(
                [image], [1.0], [0], batch_size=1, num_channels_latents=channels, height=videos.shape[-2],
                width=videos.shape[-1], num_frames=videos.shape[2], generator=torch.Generator().manual_seed(0),
                device=vae.device, dtype=torch.float32,
            )
            unpacked = Pipeline._unpack_latents(packed, frames, h, w, self._patch, self._patch_t)
            firsts.append(unpacked[:, :, :1])
        return {"first_latent": torch.cat(firsts).to(latents.dtype)}

    # --- training ---
    def video_coords(self, batch: int, frames: int, height: int, width: int, fps: float,
                     device: torch.device) -> torch.Tensor:
        """[B, 3, f*h*w] RoPE coordinates of a latent grid, built by LTXConditionPipeline's own
        helpers: pixel positions with the causal first-frame fix, time in seconds."""
        ids = Pipeline._prepare_video_ids(batch, frames, height, width, self._patch, self._patch_t, device=device)
        coords = Pipeline._scale_video_ids(ids, self._vae_spatial, self._vae_temporal, frame_index=0).float()
        coords[:, 0] = coords[:, 0] * (1.0 / fps)
        return coords

    def token_timesteps(self, shape: tuple[int, ...], timesteps: torch.Tensor, clean_first: bool) -> torch.Tensor:
        """timesteps [B] -> what LTXConditionPipeline passes: [B, 1] without conditioning, else
        [B, f*h*w] with 0 on the first latent frame's tokens (the conditioning frame)."""
        t = timesteps.float()
        return self.clean_first_timesteps(shape, t) if clean_first else t.view(shape[0], 1)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond as from
        :meth:`encode_prompts` (+ ``first_latent`` for i2v), fps of the clip -> velocity
        [B, C, f, h, w] in the transformer's dtype.

        Packs to tokens and calls the transformer as LTXConditionPipeline's denoising loop does:
        explicit video_coords, per-token timesteps, the text attention mask."""
        b, _, frames, height, width = noisy_latents.shape
        p, pt = self._patch, self._patch_t
        grid_f, grid_h, grid_w = frames // pt, height // p, width // p
        # The pipeline casts its latents to the prompt embeddings' dtype, the model's; read it from
        # the spec because the transformer may be wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        tokens = Pipeline._pack_latents(noisy_latents.to(dtype), p, pt)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep=self.token_timesteps(noisy_latents.shape, timesteps, clean_first="first_latent" in cond),
            encoder_attention_mask=cond["prompt_attention_mask"],
            video_coords=self.video_coords(b, frames, height, width, fps, noisy_latents.device),
            return_dict=False,
        )[0]
        return Pipeline._unpack_latents(out, grid_f, grid_h, grid_w, p, pt)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """exp(mu), mu linear in the token count f*h*w through (1024, 0.95) and (4096, 2.05): the
        shift of LTX-Video-Trainer's shifted logit-normal sampler (sigmoid(N(mu, 1)) equals the
        logit-normal time-shifted by exp(mu)). Fixed constants, not the scheduler config's: the
        0.9.5+ scheduler has no resolution shift."""
        return self.resolution_shift(self.video_tokens(latent_shape), *TRAINER_SHIFT_TOKENS, *TRAINER_SHIFT_MU)
