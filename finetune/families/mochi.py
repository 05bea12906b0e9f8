"""Mochi 1 (genmo, 10B) text-to-video behind the family protocol, diffusers format.

Latent space: AutoencoderKLMochi, 12 channels, 8x spatial and 6x temporal compression (the
first frame kept: 6k+1 frames), per-channel latents_mean/std from the VAE config.
Transformer: MochiTransformer3DModel (asymmetric joint attention, (2, 2) patches) conditioned on
T5-XXL hidden states with an attention mask.

Mochi's time runs the other way from the rectified-flow convention of the other families. With
sigma the noise fraction (x_t = (1 - sigma) x_0 + sigma * noise):
  - the transformer's timestep input is 1000 * (1 - sigma) (MochiPipeline passes the inverted
    sigmas of its ``invert_sigmas`` scheduler; the genmo DiT embeds ``1 - sigma``), and
  - it predicts x_0 - noise, the negative of the usual velocity (genmo's fine-tuner regresses
    ``ut = z - eps``; the inverted Euler step x += (t_next - t) * v moves towards the data).

Attention masks: the blocks' joint attention already gathers each sample's valid prompt tokens
and runs without a mask (diffusers' MochiAttnProcessor2_0); only the text pooling (one query)
gets a [B, 1, 1, 1 + L] key mask whose first key, the mean token, is always valid. Safe as it is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.families import register
from finetune.families._encoders import T5_XXL
from finetune.families._loading import from_subfolders, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    channel_stats,
    refill_zero_params,
    tiny_t5_text,
)
from finetune.families.base import Components, Family, FrameRule, FullSize, ModelSpec, Noised
from finetune.lora_formats import KeyMap, alternatives, fused, swapped_halves

# Mirrors scheduler/scheduler_config.json of genmo/mochi-1-preview: plain flow-matching Euler with
# inverted sigmas (time 0 = noise), no shift.
_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, invert_sigmas=True, use_dynamic_shifting=False,
                         base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


# diffusers module name -> name in the original checkpoint (genmoai/mochi, src/genmo/mochi_preview/dit/
# joint_model/asymm_models_joint.py and layers.py; ComfyUI's Mochi model keeps them), the inverse of
# diffusers' scripts/convert_mochi_to_diffusers.py: q, k, v fused per stream (qkv_x, qkv_y), the
# SwiGLU input stored gate-second (diffusers swaps proj/gate halves), the final modulation
# shift-first. The last block's mod_y (no text update) is diffusers' norm1_context.linear_1, [d_y]
# rows instead of 4 d_y: fewer rows than its input (d_x) as d_y = d_x / 2, more for the others.
KEY_MAP = KeyMap((
    fused([f"transformer_blocks.{{i}}.attn1.to_{p}" for p in "qkv"], "blocks.{i}.attn.qkv_x"),
    fused([f"transformer_blocks.{{i}}.attn1.add_{p}_proj" for p in "qkv"], "blocks.{i}.attn.qkv_y"),
    ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn.proj_x"),
    ("transformer_blocks.{i}.attn1.to_add_out", "blocks.{i}.attn.proj_y"),
    ("transformer_blocks.{i}.norm1.linear", "blocks.{i}.mod_x"),
    alternatives(("transformer_blocks.{i}.norm1_context.linear", "transformer_blocks.{i}.norm1_context.linear_1"),
                 "blocks.{i}.mod_y", choose=lambda rows, cols: int(rows < cols)),
    swapped_halves("transformer_blocks.{i}.ff.net.0.proj", "blocks.{i}.mlp_x.w1"),
    ("transformer_blocks.{i}.ff.net.2", "blocks.{i}.mlp_x.w2"),
    swapped_halves("transformer_blocks.{i}.ff_context.net.0.proj", "blocks.{i}.mlp_y.w1"),
    ("transformer_blocks.{i}.ff_context.net.2", "blocks.{i}.mlp_y.w2"),
    ("patch_embed.proj", "x_embedder.proj"),
    ("time_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_embed.pooler.to_kv", "t5_y_embedder.to_kv"),
    ("time_embed.pooler.to_q", "t5_y_embedder.to_q"),
    ("time_embed.pooler.to_out", "t5_y_embedder.to_out"),
    ("time_embed.caption_proj", "t5_yproj"),
    swapped_halves("norm_out.linear", "final_layer.mod"),
    ("proj_out", "final_layer.linear"),
))


@register
class MochiFamily(Family):
    name = "mochi"
    frame_rule = FrameRule(6)
    spatial_factor = 16  # VAE 8 x transformer patch 2
    # The video stream's attention and MLP, and the text stream's attention (genmo's LoRA adapts
    # qkv_x, qkv_y, proj_x, proj_y). Text queries (add_q_proj) are left out: the last block
    # computes them but drops the text stream, so their adapter there never gets a gradient;
    # to_add_out exists only where the text stream goes on.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "to_add_out",
                            "ff.net.0.proj", "ff.net.2")
    default_model_id = "genmo/mochi-1-preview"
    pipeline_class = diffusers.MochiPipeline
    default_fps = 30  # Mochi 1 is trained on and generates 30 fps video (model card, genmo demos)
    native_frames = 163
    # linear_quadratic_schedule splits the steps into a linear and a quadratic half; one step
    # leaves the linear half empty (a zero division).
    min_inference_steps = 2
    # T5 tokens per prompt: MochiPipeline's default and the genmo model's text length.
    max_sequence_length: ClassVar[int] = 256

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        self._check_compression()

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        transformer = load_transformer(diffusers.MochiTransformer3DModel, spec)
        # The VAE stays in float32: the genmo reference decodes in fp32, and the diffusers docs
        # note bf16 decoding as a quality/memory trade-off.
        parts = from_subfolders(spec, vae=(diffusers.AutoencoderKLMochi, torch.float32),
                                text_encoder=transformers.T5EncoderModel, tokenizer=transformers.AutoTokenizer,
                                scheduler=diffusers.FlowMatchEulerDiscreteScheduler)
        return Components(transformer, **parts)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Mochi 1 preview: MochiTransformer3DModel (48 layers, 24 heads x 128, 12 latent channels)
        and AutoencoderKLMochi with their class defaults, which diffusers set to the released
        checkpoint (not re-read from the hub this session), and T5-XXL."""
        return {cls.default_model_id: {
            "transformer": FullSize(diffusers.MochiTransformer3DModel, dict(
                patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48,
                pooled_projection_dim=1536, in_channels=12, qk_norm="rms_norm", text_embed_dim=4096,
                time_embed_dim=256, activation_fn="swiglu", max_sequence_length=256)),
            "vae": FullSize(diffusers.AutoencoderKLMochi, {}),
            "text_encoder": FullSize(transformers.T5EncoderModel, T5_XXL)}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 12, f, h, w] (8x spatial, 6x temporal), T5 states [1, L, 4096] and mask."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        return (1, 12, f, h, w), {"prompt_embeds": ((1, text_len, 4096), torch.bfloat16),
                                  "prompt_attention_mask": ((1, text_len), torch.bool)}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 32, text stream 32
        wide), a VAE with 32 channels per block (GroupNorm needs 32) that keeps the real 8x
        spatial / 6x temporal compression and 12 latent channels (its latent statistics measured
        on calibration clips), 1-layer T5 with d_model 32, character tokenizer, the real
        scheduler config."""
        tokenizer, text_encoder, extra = tiny_t5_text(transformers.T5EncoderModel, cls.tiny_max_sequence_length)
        vae = diffusers.AutoencoderKLMochi(
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            add_attention_block=(False, False, False, False, False),
            temporal_expansions=(1, 2, 3),  # 6x in time, as the real VAE
            spatial_expansions=(2, 2, 2),  # 8x in space
        )
        # Statistics of posterior samples, what encode_videos uses.
        with torch.no_grad():
            raw = vae.encode(calibration_videos(frames=13, height=32, width=32)).latent_dist.sample()
        mean, std = channel_stats(raw)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        transformer = diffusers.MochiTransformer3DModel(
            patch_size=2, num_attention_heads=4, attention_head_dim=32, num_layers=2, pooled_projection_dim=32,
            in_channels=12, out_channels=12, text_embed_dim=32, time_embed_dim=32,
            max_sequence_length=cls.tiny_max_sequence_length,
        )
        refill_zero_params(transformer)  # pos_frequencies starts at zero
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra)

    # --- encoding ---
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L] bool}
        with L = :attr:`text_len`, by MochiPipeline's own encode_prompt. Raises RuntimeError if
        the text encoder was released."""
        c = self.components
        self.require("encode_prompts", "text_encoder")
        pipe = diffusers.MochiPipeline(scheduler=None, vae=None, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                       transformer=None)
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.text_len, device=c.text_encoder.device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 6k+1, H and W multiples of 16 -> latents
        [B, 12, (F-1)/6+1, H/8, W/8] normalised as (z - mean) * scaling_factor / std, the inverse
        of what MochiPipeline does before decoding. Samples the posterior with ``generator``, as
        genmo's fine-tuner does. Raises ValueError for a bad shape, RuntimeError if released."""
        return self.config_normalised(self.vae_latents(videos, generator), self.components.vae.config.scaling_factor)

    # --- training ---
    def training_sigmas(self, u: torch.Tensor, latent_shape: tuple[int, ...], logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> torch.Tensor:
        """Uniform noise levels, sigma = u, as genmo's fine-tuner draws them (``torch.rand``);
        ``logit_mean``/``logit_std`` do not apply to Mochi. The timestep shift is 1 (no shift)."""
        return self.shift_sigmas(u.float().clamp(0.0, 1.0), latent_shape)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """1.0 at every size: genmo's fine-tuner trains on unshifted uniform sigmas, and the
        scheduler config's shift is 1.0."""
        return 1.0

    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                               cond: dict[str, torch.Tensor] | None = None) -> Noised:
        """x_t = (1 - sigma) x_0 + sigma * noise as usual, but Mochi's target is x_0 - noise and its
        timestep 1000 * (1 - sigma) (module docstring). latents, noise: [B, C, f, h, w]; sigmas [B]."""
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return Noised((1 - s) * latents + s * noise, latents - noise, (1 - sigmas) * 1000.0)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] (Mochi's 1000 * (1 - sigma)), cond as from
        :meth:`encode_prompts` -> x_0 - noise [B, C, f, h, w] in the transformer's dtype, called as
        MochiPipeline's denoising loop calls it. Mochi has no frame-rate input."""
        # The pipeline's latents and embeddings share the text encoder's dtype (the spec's);
        # read it from the spec, since the transformer may be wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        return transformer(
            hidden_states=noisy_latents.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep=timesteps.to(dtype), encoder_attention_mask=cond["prompt_attention_mask"], return_dict=False,
        )[0]

    # --- inference ---
    def pipeline(self) -> diffusers.MochiPipeline:
        """MochiPipeline over the current components (the transformer with any LoRA in it).
        Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        return diffusers.MochiPipeline(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
                                       tokenizer=c.tokenizer, transformer=c.transformer)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """Prompts padded to the length training used."""
        return {"max_sequence_length": self.text_len, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original Mochi names (``blocks.{i}.attn.qkv_x`` fusing attn1's to_q/to_k/to_v,
        ``blocks.{i}.mlp_x.w1``, ``final_layer.linear``, ...)."""
        return KEY_MAP

    # --- checks ---
    def _check_compression(self) -> None:
        """The class-level frame and size rules must match the loaded checkpoint."""
        c = self.components
        if c.vae is None:
            return
        patch = int(c.transformer.config.patch_size)
        self.check_compression(c.vae.spatial_compression_ratio * patch, c.vae.temporal_compression_ratio,
                               f"use a Mochi 1 checkpoint such as {self.default_model_id}")
