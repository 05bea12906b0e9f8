"""CogVideoX 1.5: text-to-video and image-to-video (5B), diffusers format.

Same VAE (16 channels, 8x spatial, 4x temporal, scaling_factor) and T5-XXL text path as 1.0; the
transformer patches 2 latent frames x 2x2 (patch_size_t=2, a linear patch embedding) with rotary
embeddings over the slice grid, so the pipelines pad an odd latent frame count by one frame in
front and discard it after denoising. I2V adds the ``ofs`` embedding and takes the image latents
unscaled (VAE config invert_scale_latents). Trained and sampled at 16 fps, 81 frames at 1360x768
(4k+1 frames and multiples of 16 work). Objective and noise levels: see _cogvideox.py.
"""

from __future__ import annotations

from typing import ClassVar

import diffusers

from finetune.families import register
from finetune.families._cogvideox import (
    COGVIDEOX15_5B,
    COGVIDEOX15_5B_I2V,
    SCHEDULER_CONFIG,
    CogVideoXBase,
    cogvideox_full_size,
)
from finetune.families.base import TEXT_LEN_KEY, Components, FullSize


@register
class CogVideoX15Family(CogVideoXBase):
    name = "cogvideox15"
    default_model_id = "THUDM/CogVideoX1.5-5B"
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "THUDM/CogVideoX1.5-5B-I2V"}
    default_fps = 16  # CogVideoX 1.5 generates 81 frames at 16 fps (model card)
    native_frames = 81
    patch_size_t = 2
    other_generation = ("cogvideox", "THUDM/CogVideoX-5b")

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """CogVideoX 1.5 5B (t2v) and 5B-I2V."""
        return {cls.model_id_for(task): cogvideox_full_size(COGVIDEOX15_5B_I2V if task == "i2v" else COGVIDEOX15_5B)}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real models: 2-layer transformer (4 heads x 32) with 2x2x2 patches
        and rotary embeddings (+ ofs embedding and 32 input channels for i2v), a 4-block VAE with
        the real compression and calibrated scaling factor (invert_scale_latents for i2v, as the
        1.5 I2V repo), 1-layer T5 with d_model 32, character tokenizer, CogVideoXDDIMScheduler
        with the repos' config (SNR shift 1)."""
        tokenizer, text_encoder, extra = cls.tiny_text()
        text_len = extra[TEXT_LEN_KEY]
        i2v = task == "i2v"
        vae = cls.tiny_vae(size=32, invert_scale_latents=i2v)
        # The rotary slice grid is sized by sample_height/width (1.5: 96x170 latents); keep it
        # larger than any tiny test clip. ofs_embed_dim = time_embed_dim, as in the real I2V (512).
        transformer = cls.tiny_transformer(32 if i2v else 16, text_len, use_rotary_positional_embeddings=True,
                                           sample_height=16, sample_width=16, sample_frames=9,
                                           ofs_embed_dim=64 if i2v else None)
        scheduler = diffusers.CogVideoXDDIMScheduler(**SCHEDULER_CONFIG, snr_shift_scale=1.0)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)
