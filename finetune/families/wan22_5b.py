"""Wan 2.2 TI2V-5B: text-to-video and image-to-video in one model, diffusers format.

Latent space: the Wan 2.2 VAE (AutoencoderKLWan with residual blocks and a 2x2 pixel patchify),
48 channels, 16x spatial and 4x temporal compression. Transformer: WanTransformer3DModel with
(1, 2, 2) patches, so sides are multiples of 32. The pipelines run it with per-token timesteps
(``expand_timesteps``): for image-to-video the first latent frame is the clean latent of the
image, its tokens get timestep 0, and the rest are denoised; training does the same and leaves
that frame out of the loss.
"""

from __future__ import annotations

from typing import ClassVar

import diffusers

from finetune.families import register
from finetune.families._wan import SCHEDULER_CONFIG, WAN22_TRANSFORMER_5B, WAN22_VAE_5B, WanBase, wan_full_size
from finetune.families.base import Components, FullSize


@register
class Wan22TI2V5BFamily(WanBase):
    name = "wan22_5b"
    spatial_factor = 32  # VAE 16 x transformer patch 2
    default_model_id = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # one checkpoint for both tasks
    tasks = ("t2v", "i2v")
    default_fps = 24  # TI2V-5B generates 121 frames at 24 fps (5 s) at 1280x704
    native_frames = 121
    # sample_shift of the official ti2v-5B config, also its diffusers scheduler's flow_shift
    train_flow_shift: ClassVar[float] = 5.0
    i2v_kind = "first_frame"
    expand_timesteps = True
    latent_channels: ClassVar[int] = 48
    vae_spatial: ClassVar[int] = 16

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """TI2V-5B (one checkpoint for both tasks): the 5B transformer, the Wan 2.2 VAE, umT5."""
        return {cls.default_model_id: wan_full_size({"transformer": WAN22_TRANSFORMER_5B}, WAN22_VAE_5B)}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: the residual Wan 2.2 VAE (2x2 patchify + three 2x
        downsamples = 16x, 4x in time) with 8 channels per block and 16 latent channels (the real
        one has 48; statistics measured on calibration clips), a 2-layer transformer (4 heads x
        32), 1-layer umT5, character tokenizer, UniPC with the real shift. One model for both tasks."""
        tokenizer, text_encoder, extra = cls.tiny_text()
        vae = cls.calibrate_vae(diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
        ), size=64)
        transformer = cls.tiny_transformer(16, 16)
        scheduler = diffusers.UniPCMultistepScheduler(**SCHEDULER_CONFIG, flow_shift=cls.train_flow_shift)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)

    def wrong_family_hint(self, spatial: int) -> str:
        return " (8x VAE x 2 patch = 16: a Wan 2.1 or Wan 2.2 A14B checkpoint, families wan and wan22)" \
            if spatial == 16 else ""
