"""CogVideoX 1.0: text-to-video (2B, 5B) and image-to-video (5B-I2V), diffusers format.

Latent space: AutoencoderKLCogVideoX, 16 channels, 8x spatial and 4x temporal compression,
scaled by the VAE config's scaling_factor (no shift). Transformer: CogVideoXTransformer3DModel with
2x2 patches and no temporal patch, on frames-first latents [B, f, C, h, w], conditioned on T5-XXL
states (226 tokens, no mask). 2B: sin-cos position embeddings; 5B: rotary; 5B-I2V: rotary plus
learned position embeddings (so one frame size, 720x480) and 32 input channels (noisy + image
latents). Trained and sampled at 8 fps, 49 frames (4k+1 frames work). Objective and noise levels:
see _cogvideox.py (v-prediction on the DDPM schedule).
"""

from __future__ import annotations

from typing import ClassVar

import diffusers

from finetune.families import register
from finetune.families._cogvideox import (
    COGVIDEOX_2B,
    COGVIDEOX_5B,
    COGVIDEOX_5B_I2V,
    SCHEDULER_CONFIG,
    CogVideoXBase,
    cogvideox_full_size,
)
from finetune.families.base import TEXT_LEN_KEY, Components, FullSize


@register
class CogVideoXFamily(CogVideoXBase):
    name = "cogvideox"
    default_model_id = "THUDM/CogVideoX-2b"
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "THUDM/CogVideoX-5b-I2V"}
    default_fps = 8  # CogVideoX 1.0 generates 49 frames at 8 fps (model cards)
    native_frames = 49
    patch_size_t = None
    other_generation = ("cogvideox15", "THUDM/CogVideoX1.5-5B")

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """CogVideoX 2B and 5B (t2v), 5B-I2V."""
        if task == "i2v":
            return {"THUDM/CogVideoX-5b-I2V": cogvideox_full_size(COGVIDEOX_5B_I2V)}
        return {"THUDM/CogVideoX-2b": cogvideox_full_size(COGVIDEOX_2B),
                "THUDM/CogVideoX-5b": cogvideox_full_size(COGVIDEOX_5B)}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real models: for t2v the 2B layout (sin-cos position embeddings,
        SNR shift 3), for i2v the 5B-I2V layout (rotary + learned position embeddings for 32 px
        clips, 32 input channels, SNR shift 1); 2-layer transformer (4 heads x 32), a 4-block VAE
        with the real compression and calibrated scaling factor, 1-layer T5 with d_model 32,
        character tokenizer, CogVideoXDDIMScheduler with the repos' config."""
        tokenizer, text_encoder, extra = cls.tiny_text()
        text_len = extra[TEXT_LEN_KEY]
        vae = cls.tiny_vae(size=32)
        # sample_* as the real configs: latent grid (here 32 px / 8) and 49 -> 9 frames
        sample = dict(sample_height=4, sample_width=4, sample_frames=9)
        if task == "i2v":
            transformer = cls.tiny_transformer(32, text_len, use_rotary_positional_embeddings=True,
                                               use_learned_positional_embeddings=True, **sample)
            scheduler = diffusers.CogVideoXDDIMScheduler(**SCHEDULER_CONFIG, snr_shift_scale=1.0)
        else:
            transformer = cls.tiny_transformer(16, text_len, **sample)
            scheduler = diffusers.CogVideoXDDIMScheduler(**SCHEDULER_CONFIG, snr_shift_scale=3.0)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)
