"""What the LTX-Video families (0.9.0/0.9.1 ``ltx``, 0.9.5+ ``ltxv095``) share: the classes
(LTXVideoTransformer3DModel, AutoencoderKLLTXVideo, T5), so loading, the text path, latent
normalisation, the original checkpoint's key names and the checkpoint checks.

Attention masks: only the T5 cross-attention gets one, the prompt padding as a [B, heads, 1, L]
additive bias (-10000, finite; L = 128 or 256 tokens); its queries are video tokens and always see
the valid prompt tokens, so no row is fully masked. Self-attention gets none. Safe as it is."""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.families._encoders import T5_XXL
from finetune.families._loading import load_transformer
from finetune.families.base import Components, Family, FrameRule, FullSize, ModelSpec
from finetune.lora_formats import KeyMap

# diffusers module name -> name in the original LTX-Video checkpoint (ltx_video/models/transformers,
# also ComfyUI's LTXV model): the blocks keep their names; the inverse of diffusers'
# convert_ltx_transformer_checkpoint_to_diffusers renames the rest (patchify_proj, adaln_single).
LTX_KEY_MAP = KeyMap((
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


# The VAE block type that marks a 0.9.5+ checkpoint (diffusers' own encoder switches on it).
VAE_095_BLOCK = "LTXVideo095DownBlock3D"


# Full-size configs for the memory planner. LTX-Video 2B (0.9.0 to 0.9.5: 32 heads x 64, cross
# dim 2048, 28 layers) and 13B (0.9.7/0.9.8: 32 heads x 128, cross dim 4096, 48 layers) as quoted
# from their transformer/config.json in public code (code search, this session). The 0.9.0 VAE is
# AutoencoderKLLTXVideo's defaults; the 0.9.5+ VAE (timestep-conditioned decoder, 4x4 patchify,
# 0.9.5 down blocks) as diffusers' conversion script sets it -- not re-read from the hub.
LTX_2B = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
              attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
              qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
              attention_bias=True, attention_out_bias=True)
LTX_13B = {**LTX_2B, "attention_head_dim": 128, "cross_attention_dim": 4096, "num_layers": 48}
LTX_VAE_095 = dict(
    block_out_channels=(128, 256, 512, 1024, 2048), down_block_types=(VAE_095_BLOCK,) * 4,
    decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
    patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False,
    spatial_compression_ratio=32, temporal_compression_ratio=8,
)


def ltx_full_size(transformer: dict, vae: dict) -> dict[str, FullSize]:
    """One LTX-Video checkpoint: ``transformer``, the VAE and T5-XXL."""
    return {"transformer": FullSize(diffusers.LTXVideoTransformer3DModel, transformer),
            "vae": FullSize(diffusers.AutoencoderKLLTXVideo, vae),
            "text_encoder": FullSize(transformers.T5EncoderModel, T5_XXL)}


class LTXBase(Family):
    """Shared LTX-Video machinery: loading, the T5 text path, VAE latent normalisation, the
    pipeline and its call arguments, the compression check. ``pipeline_class`` (LTXPipeline or
    LTXConditionPipeline) is the subclass's; its static helpers do the normalisation."""

    frame_rule = FrameRule(8)
    spatial_factor = 32  # VAE 32 x transformer patch 1
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    # Decode settings the LTX docs recommend for timestep-aware VAEs (0.9.1+); unused otherwise.
    decode_timestep: ClassVar[float] = 0.05
    decode_noise_scale: ClassVar[float] = 0.025
    # Whether the family's checkpoints have the 0.9.5+ VAE (checked on load).
    vae_095: ClassVar[bool] = False

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 128, f, h, w] (32x spatial, 8x temporal), T5 states [1, L, 4096] and their
        mask; i2v (0.9.5) adds the clean first latent frame."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 32, width // 32
        cond = {"prompt_embeds": ((1, text_len, 4096), torch.bfloat16),
                "prompt_attention_mask": ((1, text_len), torch.bfloat16)}
        if task == "i2v":
            cond["first_latent"] = ((1, 128, 1, h, w), torch.bfloat16)
        return (1, 128, f, h, w), cond

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once here, unwrapped: predict() gets the transformer maybe wrapped by DDP/PEFT,
        # and the VAE may have been released by then.
        config = components.transformer.config
        self._patch, self._patch_t = int(config.patch_size), int(config.patch_size_t)
        self._vae_spatial = self.spatial_factor // self._patch
        self._vae_temporal = self.frame_rule.temporal_factor // self._patch_t
        self._check_checkpoint()

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        src = dict(pretrained_model_name_or_path=spec.pretrained, revision=spec.revision)
        transformer = load_transformer(diffusers.LTXVideoTransformer3DModel, spec)
        # The LTX docs recommend one dtype (bfloat16) for transformer, VAE and text encoder.
        vae = diffusers.AutoencoderKLLTXVideo.from_pretrained(**src, subfolder="vae", torch_dtype=spec.dtype)
        text_encoder = transformers.T5EncoderModel.from_pretrained(**src, subfolder="text_encoder", dtype=spec.dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(**src, subfolder="scheduler")
        return Components(transformer, vae, text_encoder, tokenizer, scheduler)

    # --- encoding ---
    def _pipe(self, **parts: Any) -> diffusers.DiffusionPipeline:
        """The family's pipeline over ``parts`` (the rest None), to call its own helpers."""
        names = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
        return self.pipeline_class(**{n: parts.get(n) for n in names})

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "prompt_attention_mask": [B, L] bool}
        with L = :attr:`text_len`, by the pipeline's own encode_prompt. Raises RuntimeError if
        the text encoder was released."""
        c = self.components
        self.require("encode_prompts", "text_encoder")
        embeds, mask, _, _ = self._pipe(text_encoder=c.text_encoder, tokenizer=c.tokenizer).encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.text_len
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 8k+1, H and W multiples of 32
        -> unpacked latents [B, C, (F-1)/8+1, H/32, W/32], normalised as the pipeline expects.

        Samples the posterior with ``generator``, as the original LTX-Video ``vae_encode`` and
        LTX-Video-Trainer do (the model was trained on sampled latents). Raises ValueError for a
        bad shape, RuntimeError if the VAE was released."""
        vae = self.components.vae
        self.require("encode_videos", "vae")
        self.check_videos(videos)
        latents = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
        return self.pipeline_class._normalize_latents(latents, vae.latents_mean, vae.latents_std,
                                                      vae.config.scaling_factor)

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The family's pipeline over the current components (the transformer with any LoRA in
        it). Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        return self._pipe(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                          transformer=c.transformer)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The clip frame rate (RoPE time axis), the training prompt length, for timestep-aware
        VAEs (0.9.1+) the recommended decode noise, and for i2v the image."""
        kwargs: dict[str, Any] = {"frame_rate": fps, "max_sequence_length": self.text_len}
        vae = self.components.vae
        if vae is not None and vae.config.timestep_conditioning:
            kwargs.update(decode_timestep=self.decode_timestep, decode_noise_scale=self.decode_noise_scale)
        return {**kwargs, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original LTX-Video names (``patchify_proj``, ``adaln_single.*``; blocks as in diffusers)."""
        return LTX_KEY_MAP

    # --- checks ---
    def _check_checkpoint(self) -> None:
        """The checkpoint's VAE generation (0.9.0/0.9.1 or 0.9.5+) must be the family's, and its
        compression the class's frame and size rules; each error names the family to use."""
        vae = self.components.vae
        if vae is None:
            return
        is_095 = tuple(vae.config.down_block_types)[-1] == VAE_095_BLOCK
        if is_095 != self.vae_095:
            found, other = ("0.9.5 or later", "ltxv095") if is_095 else ("0.9.0/0.9.1", "ltx")
            raise ValueError(
                f"{self.name}: {self.spec.display_id} is an LTX-Video {found} checkpoint (its VAE's last down "
                f"block is {tuple(vae.config.down_block_types)[-1]}); use model.family={other} for it, or a "
                f"checkpoint such as {self.default_model_id} with {self.name}"
            )
        self.check_compression(vae.spatial_compression_ratio * self._patch,
                               vae.temporal_compression_ratio * self._patch_t,
                               f"use a checkpoint such as {self.default_model_id}")
