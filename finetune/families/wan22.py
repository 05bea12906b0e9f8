"""Wan 2.2 A14B: text-to-video and image-to-video with two experts, diffusers format.

Two WanTransformer3DModel experts share the Wan 2.1 VAE (16 channels, 8x spatial, 4x temporal)
and umT5: ``transformer`` denoises the high-noise part of the trajectory and ``transformer_2``
the low-noise part, switching at ``boundary_ratio`` of the timestep range (0.875 for T2V, 0.9
for I2V; the pipeline's config). A LoRA run trains either expert or both: each step's noise
level picks its expert and only that expert's adapter learns. I2V conditions as Wan 2.1 I2V
does (mask + first-frame latents on the channel axis, 36 input channels) without CLIP embeddings.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers

from finetune.families import register
from finetune.families._wan import (
    SCHEDULER_CONFIG,
    WAN22_TRANSFORMER_I2V_A14B,
    WAN_TRANSFORMER_14B,
    WAN_VAE_2_1,
    WanBase,
    wan_full_size,
)
from finetune.families.base import Components, Expert, FullSize, ModelSpec

BOUNDARY_KEY = "boundary_ratio"  # components.extra key


@register
class Wan22A14BFamily(WanBase):
    name = "wan22"
    default_model_id = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"}
    tasks = ("t2v", "i2v")
    expert_names = ("high", "low")
    # The official configs' boundaries (t2v_A14B: 0.875, i2v_A14B: 0.900) where the pipeline
    # config does not say.
    default_boundary: ClassVar[dict[str, float]] = {"t2v": 0.875, "i2v": 0.9}
    # The official sample_shift (t2v_A14B: 12.0, i2v_A14B: 5.0): training noise levels are shifted
    # the way sampling spends its steps, so each expert trains where it is used.
    task_flow_shift: ClassVar[dict[str, float]] = {"t2v": 12.0, "i2v": 5.0}
    i2v_kind = "concat"

    @property
    def boundary(self) -> float:
        return float(self.components.extra.get(BOUNDARY_KEY, self.default_boundary[self.task]))

    def experts(self) -> list[Expert]:
        """high: sigmas >= boundary on ``transformer``; low: below it on ``transformer_2``, the
        pipeline's switch (``t >= boundary_ratio * 1000`` with t = 1000 sigma)."""
        b = self.boundary
        return [Expert("high", "transformer", b, 1.0), Expert("low", "transformer_2", 0.0, b)]

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        return self.task_flow_shift[self.task]

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Two experts of the Wan 2.1 14B layout (36 input channels for I2V), Wan 2.1 VAE, umT5."""
        cfg = WAN22_TRANSFORMER_I2V_A14B if task == "i2v" else WAN_TRANSFORMER_14B
        return {cls.model_id_for(task): wan_full_size({"transformer": cfg, "transformer_2": cfg}, WAN_VAE_2_1)}

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        c = cls.load_parts(spec, ("transformer", "transformer_2"))
        config = diffusers.DiffusionPipeline.load_config(spec.pretrained, revision=spec.revision)
        c.extra[BOUNDARY_KEY] = float(config.get(BOUNDARY_KEY) or cls.default_boundary[spec.task])
        return c

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: the Wan 2.1-style tiny VAE (8x/4x, 16 channels),
        two 2-layer experts (36 input channels for i2v), 1-layer umT5, character tokenizer."""
        tokenizer, text_encoder, extra = cls.tiny_text()
        vae = cls.calibrate_vae(diffusers.AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        ), size=32)
        channels = 36 if task == "i2v" else 16
        high, low = cls.tiny_transformer(channels, 16), cls.tiny_transformer(channels, 16)
        scheduler = diffusers.UniPCMultistepScheduler(**SCHEDULER_CONFIG, flow_shift=cls.task_flow_shift[task])
        extra[BOUNDARY_KEY] = cls.default_boundary[task]
        return Components(high, vae, text_encoder, tokenizer, scheduler, extra=extra, transformer_2=low)

    def pipeline_kwargs(self) -> dict[str, Any]:
        c = self.components
        return {"transformer_2": c.transformer_2, BOUNDARY_KEY: self.boundary, **super().pipeline_kwargs()}
