"""Wan 2.1: text-to-video (1.3B and 14B) and image-to-video (14B, 480p/720p), diffusers format.

Latent space: AutoencoderKLWan, 16 channels, 8x spatial and 4x temporal compression, per-channel
mean/std normalisation from the VAE config. Transformer: WanTransformer3DModel with (1, 2, 2)
patches, conditioned on umT5 hidden states (no attention mask: padded positions are zeros).
I2V (WanImageToVideoPipeline): 36 input channels (16 noisy + 4 mask + 16 first-frame latents)
and the CLIP ViT-H image embedding of the first frame through added cross-attention K/V.
"""

from __future__ import annotations

from typing import ClassVar

import diffusers
import transformers

from finetune.families import register
from finetune.families._wan import (
    SCHEDULER_CONFIG,
    WAN_TRANSFORMER_1_3B,
    WAN_TRANSFORMER_14B,
    WAN_TRANSFORMER_I2V_14B,
    WAN_VAE_2_1,
    WanBase,
    wan_full_size,
)
from finetune.families.base import Components, FullSize, ModelSpec


@register
class WanFamily(WanBase):
    name = "wan"
    default_model_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    tasks = ("t2v", "i2v")
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"}
    # Wan samples with shift 3.0 at 480p (its scheduler config) and 5.0 at 720p; LoRA clips are
    # 480p-sized or smaller, so 3.0 puts training noise levels where 480p sampling spends its steps.
    train_flow_shift: ClassVar[float] = 3.0
    i2v_kind = "concat"

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Wan 2.1 T2V 1.3B and 14B; I2V 14B at 480p and 720p (same architecture)."""
        if task == "i2v":
            i2v = wan_full_size({"transformer": WAN_TRANSFORMER_I2V_14B}, WAN_VAE_2_1, image_encoder=True)
            return {"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": i2v, "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": i2v}
        return {"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": wan_full_size({"transformer": WAN_TRANSFORMER_1_3B}, WAN_VAE_2_1),
                "Wan-AI/Wan2.1-T2V-14B-Diffusers": wan_full_size({"transformer": WAN_TRANSFORMER_14B}, WAN_VAE_2_1)}

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        i2v = dict(image_encoder=transformers.CLIPVisionModel, image_processor=transformers.CLIPImageProcessor)
        return cls.load_parts(spec, **(i2v if spec.task == "i2v" else {}))

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 32), a 3-channel-base
        VAE that keeps the real 8x spatial / 4x temporal compression and 16 latent channels (its
        latent statistics measured on calibration clips), 1-layer umT5 with d_model 32, character
        tokenizer, the real UniPC scheduler config; for i2v the 36-channel transformer with image
        cross-attention and a 2-layer CLIP vision tower."""
        tokenizer, text_encoder, extra = cls.tiny_text()
        vae = cls.calibrate_vae(diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,  # three 2x downsamples: 8x spatial
            temperal_downsample=[False, True, True],  # two 2x in time: 4x, as the real VAE
        ), size=32)
        image_encoder = image_processor = None
        if task == "i2v":
            image_encoder, image_processor = cls.tiny_image_encoder()
            transformer = cls.tiny_transformer(36, 16, image_dim=32, added_kv_proj_dim=128)
        else:
            transformer = cls.tiny_transformer(16, 16)
        scheduler = diffusers.UniPCMultistepScheduler(**SCHEDULER_CONFIG, flow_shift=cls.train_flow_shift)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra,
                          image_encoder=image_encoder, image_processor=image_processor)
