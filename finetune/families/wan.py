"""Wan 2.1 text-to-video (1.3B and 14B, diffusers format) behind the family protocol.

Latent space: AutoencoderKLWan, 16 channels, 8x spatial and 4x temporal compression, per-channel
mean/std normalisation from the VAE config. Transformer: WanTransformer3DModel with (1, 2, 2)
patches, conditioned on umT5 hidden states (no attention mask: padded positions are zeros).
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

# Mirrors scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (UniPC on flow
# sigmas, shift 3.0), so tiny pipelines sample the way real ones do.
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
)

# diffusers module name -> name in the original Wan checkpoint (wan/modules/model.py), which
# ComfyUI's WanModel and musubi-tuner use; the inverse of diffusers' convert_wan_transformer_to_diffusers
# and _convert_non_diffusers_wan_lora_to_diffusers. k_img/v_img and img_emb exist in I2V models only.
_ATTN = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
_KEY_MAP = KeyMap((
    *((f"blocks.{{i}}.attn1.{d}", f"blocks.{{i}}.self_attn.{o}") for d, o in _ATTN),
    *((f"blocks.{{i}}.attn2.{d}", f"blocks.{{i}}.cross_attn.{o}") for d, o in _ATTN),
    ("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
    ("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
    ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
    ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("patch_embedding", "patch_embedding"),
    ("proj_out", "head.head"),
))


@register
class WanFamily(Family):
    name = "wan"
    frame_rule = FrameRule(4)
    spatial_factor = 16  # VAE 8 x transformer patch 2
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    default_model_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    pipeline_class = diffusers.WanPipeline
    default_fps = 16  # Wan 2.1 is trained and sampled at 16 fps (81 frames = 5 s)

    # umT5 context Wan was trained with (text_len=512 in the Wan configs); WanPipeline pads every
    # prompt to this length, so training must see the same length.
    max_sequence_length: ClassVar[int] = 512
    # Flow shift for training noise levels. Wan samples with 3.0 at 480p (its scheduler config)
    # and 5.0 at 720p; LoRA clips are 480p-sized or smaller, so 3.0 puts training noise levels
    # where 480p sampling spends its steps. Fixed, not resolution-dependent, as in Wan itself.
    train_flow_shift: ClassVar[float] = 3.0
    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        self._check_compression()

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        src = dict(pretrained_model_name_or_path=spec.pretrained, revision=spec.revision)
        transformer = diffusers.WanTransformer3DModel.from_pretrained(
            **src, subfolder="transformer", torch_dtype=spec.dtype, quantization_config=bnb_quantization_config(spec)
        )
        # The Wan docs recommend the VAE in float32 for decoding quality, whatever the rest uses.
        vae = diffusers.AutoencoderKLWan.from_pretrained(**src, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = transformers.UMT5EncoderModel.from_pretrained(**src, subfolder="text_encoder", dtype=spec.dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")
        scheduler = diffusers.UniPCMultistepScheduler.from_pretrained(**src, subfolder="scheduler")
        return Components(transformer, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def build_tiny(cls) -> Components:
        """Same classes as the real model: 2-layer transformer (4 heads x 32), 3-channel-base VAE
        that keeps the real 8x spatial / 4x temporal compression and 16 latent channels (its
        latent statistics measured on calibration clips), 1-layer umT5 with d_model 32, character
        tokenizer, the real UniPC scheduler config."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_t5_tokenizer(model_max_length=text_len)
        text_encoder = transformers.UMT5EncoderModel(tiny_t5_encoder_config(transformers.UMT5Config, tokenizer))
        vae = diffusers.AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],  # three 2x downsamples: 8x spatial, as the real VAE
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # two 2x in time: 4x, as the real VAE
        )
        # The shipped latents_mean/std fit the real VAE; measure the tiny one's the same way (on
        # posterior modes, what encode_videos uses) so normalised tiny latents are ~N(0, 1) too.
        with torch.no_grad():
            raw = vae.encode(calibration_videos(frames=9, height=32, width=32)).latent_dist.mode()
        mean, std = channel_stats(raw)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            # Inner dim 128, twice the 64 outputs per token (16 channels x (1, 2, 2) patch): like
            # the real model (1536), wide enough that a LoRA can fit a clip.
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=128,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        refill_zero_params(transformer)
        scheduler = diffusers.UniPCMultistepScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra={TEXT_LEN_KEY: text_len})

    # --- encoding ---
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D]} with L = :attr:`text_len`; positions
        past each prompt's end are zeros, exactly as WanPipeline feeds the transformer.
        Raises RuntimeError if the text encoder was released."""
        c = self.components
        self.require("encode_prompts", "text_encoder")
        # The pipeline's own encode_prompt (cleaning, padding, zeroing the pad positions) rather
        # than a copy of it; only the text parts are registered.
        pipe = diffusers.WanPipeline(
            tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=None, scheduler=None, transformer=None
        )
        embeds, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.text_len
        )
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 16
        -> latents [B, 16, (F-1)/4+1, H/8, W/8], normalised with the VAE's latents_mean/std.

        Takes the posterior mode, not a sample: the original Wan VAE's encode returns the mean,
        so that is what Wan was trained on, and it keeps the cache deterministic; ``generator``
        is therefore unused. Raises ValueError for a bad shape, RuntimeError if the VAE was released."""
        vae = self.components.vae
        self.require("encode_videos", "vae")
        self.check_videos(videos)
        latents = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        # Inverse of what WanPipeline does before decoding (latents * std + mean).
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) / std

    # --- training ---
    def predict(
        self,
        transformer: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        fps: float,
    ) -> torch.Tensor:
        """noisy_latents [B, 16, f, h, w], timesteps [B] in [0, 1000], text["prompt_embeds"]
        [B, L, D] -> velocity [B, 16, f, h, w] in the transformer's dtype. Wan has no frame-rate
        conditioning, so ``fps`` is unused."""
        # Cast to the model dtype as WanPipeline does; read it from the spec because the
        # transformer may be wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        return transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """:attr:`train_flow_shift` for every latent size (Wan's shift does not depend on it)."""
        return self.train_flow_shift

    # --- inference ---
    def pipeline(self) -> diffusers.WanPipeline:
        """WanPipeline over the current components (the transformer with any LoRA adapter in it).
        Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        return diffusers.WanPipeline(
            tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, scheduler=c.scheduler,
            transformer=c.transformer,
        )

    def pipeline_call_kwargs(self, fps: float) -> dict[str, Any]:
        """Prompts padded to the length training used (WanPipeline's own default is 512)."""
        return {"max_sequence_length": self.text_len}

    # --- checks ---
    def _check_compression(self) -> None:
        """The class-level frame and size rules must match the loaded checkpoint (a Wan 2.2 5B
        repo, say, has a 16x VAE and would silently break them)."""
        c = self.components
        if c.vae is None:
            return
        patch = c.transformer.config.patch_size
        spatial = c.vae.config.scale_factor_spatial * patch[1]
        temporal = c.vae.config.scale_factor_temporal * patch[0]
        if (spatial, temporal) != (self.spatial_factor, self.frame_rule.temporal_factor):
            raise ValueError(
                f"wan: {self.spec.display_id} compresses {spatial}x in space and {temporal}x in time, but the wan "
                f"family assumes {self.spatial_factor}x and {self.frame_rule.temporal_factor}x; use a Wan 2.1 T2V "
                f"checkpoint such as {self.default_model_id}"
            )

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original Wan names (``blocks.{i}.self_attn.q``, ``head.head``, ...); one transformer."""
        return _KEY_MAP
