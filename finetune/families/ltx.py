"""LTX-Video 0.9.x text-to-video (2B; 13B shares the classes) behind the family protocol.

Latent space: AutoencoderKLLTXVideo, 128 channels, 32x spatial (4x4 patchify then three 2x
downsamples) and 8x temporal compression, normalised with the VAE's latents_mean/latents_std
buffers and config.scaling_factor. Transformer: LTXVideoTransformer3DModel on packed tokens
[B, f*h*w, C], conditioned on T5-XXL hidden states with an attention mask, and on the frame
rate through its rotary position scale.
"""

from __future__ import annotations

from typing import ClassVar

import diffusers
import torch
import transformers

from finetune.families import register
from finetune.families._ltx import LTX_2B, LTXBase, ltx_full_size
from finetune.families._tiny import tiny_t5_text
from finetune.families.base import Components, FullSize

# Mirrors scheduler/scheduler_config.json of Lightricks/LTX-Video: flow-matching Euler whose
# shift grows with the latent token count (1024 -> 0.95, 4096 -> 2.05, exponential).
_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95,
                         max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)

@register
class LTXFamily(LTXBase):
    name = "ltx"
    # The diffusers-format folders at the root of this repo are LTX-Video 0.9.0 and load with
    # LTXPipeline as they are (revision=None: main). Lightricks/LTX-Video-0.9.1 (timestep-aware
    # VAE) also works with LTXPipeline; 0.9.5+ and the 13B models are meant for LTXConditionPipeline.
    default_model_id = "Lightricks/LTX-Video"
    pipeline_class = diffusers.LTXPipeline
    # LTX-Video is trained on and generates 24 fps video (model card); LTXPipeline's frame_rate
    # default is 25, so the family always passes the rate explicitly (pipeline_call_kwargs).
    default_fps = 24
    native_frames = 121
    # The scheduler's shift_terminal stretch divides by (1 - last sigma): one step is a zero division.
    min_inference_steps = 2

    # T5 tokens per prompt: LTXPipeline's default and what LTX-Video was trained with.
    max_sequence_length: ClassVar[int] = 128

    # --- loading ---
    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """LTX-Video 0.9.0/0.9.1 2B with the 0.9.0 VAE."""
        return {cls.default_model_id: ltx_full_size(LTX_2B, {})}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 8), a VAE with 8
        channels per block that keeps the real compression (patch 4, three 2x spatio-temporal
        downsamples: 32x space, 8x time) and 8 latent channels (its latent statistics measured on
        calibration clips), 1-layer T5 with d_model 32, character tokenizer, the real scheduler config."""
        tokenizer, text_encoder, extra = tiny_t5_text(transformers.T5EncoderModel, cls.tiny_max_sequence_length)
        vae = cls.calibrated(diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False), patch_size=4, patch_size_t=1,
            encoder_causal=True, decoder_causal=False,
            timestep_conditioning=False,  # as 0.9.0, the default checkpoint
        ))
        transformer = cls.tiny_transformer(attention_head_dim=8, cross_attention_dim=32)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)

    # --- training ---
    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
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
