"""What the Wan families (2.1 T2V/I2V, 2.2 TI2V-5B, 2.2 A14B) share: the umT5 text path, the Wan
VAE's latent normalisation, the image-to-video conditioning the diffusers Wan pipelines build,
and tiny random builds of each part. Each family file subclasses :class:`WanBase` with its facts.

Image-to-video comes in two forms, both the way the released models were trained:
  concat       (2.1 I2V, 2.2 A14B I2V): every latent frame is noised; the transformer also sees
               4 mask channels + the VAE latents of [first frame, zeros...] concatenated on the
               channel axis (``cond["condition"]`` [B, 20, f, h, w]), and for 2.1 the CLIP image
               embedding of the first frame (``cond["image_embeds"]`` [B, 257, 1280]).
  first_frame  (2.2 TI2V-5B): the first latent frame is the clean latent of the image, its tokens
               get timestep 0, and it is left out of the loss (``cond["first_latent"]`` [B, C, 1, h, w]).

Attention masks: none; the umT5 padding is zeroed and cross-attention attends it, as the released
models do.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.families._encoders import CLIP_VIT_H_14, UMT5_XXL
from finetune.families._loading import from_subfolders, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    channel_stats,
    refill_zero_params,
    tiny_t5_text,
)
from finetune.families.base import Components, Family, FrameRule, FullSize, ModelSpec
from finetune.lora_formats import KeyMap
from finetune.video import pil_image

# Flow-sigma UniPC as in the Wan diffusers repos' scheduler configs; flow_shift is per model.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
)


# diffusers module name -> name in the original Wan checkpoint (wan/modules/model.py), which
# ComfyUI's WanModel and musubi-tuner use; the inverse of diffusers' convert_wan_transformer_to_diffusers
# and _convert_non_diffusers_wan_lora_to_diffusers. The same layout for every Wan transformer (2.1,
# each 2.2 A14B expert, 2.2 TI2V-5B); k_img/v_img and img_emb exist in Wan 2.1 I2V only.
_ATTN = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
KEY_MAP = KeyMap((
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


# Full-size configs of the released Wan checkpoints (their ``*/config.json`` values), for the
# memory planner (encoders in _encoders.py). Sources: Wan2.1-T2V-1.3B transformer as quoted from
# the checkpoint's config.json in public code (code search, this session); the 14B numbers
# (40 heads x 128, ffn 13824, 40 layers) and the I2V additions (36 input channels, CLIP image
# dim 1280, added K/V 5120) are the Wan 2.1 / 2.2 A14B configs as diffusers' converter
# (scripts/convert_wan_to_diffusers.py) writes them -- not re-read from the hub this session.
WAN_TRANSFORMER_1_3B = dict(
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
WAN_TRANSFORMER_14B = {**WAN_TRANSFORMER_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
WAN_TRANSFORMER_I2V_14B = {**WAN_TRANSFORMER_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
# Wan 2.1 VAE: the AutoencoderKLWan defaults are the released VAE (base_dim 96, z_dim 16,
# dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsample [F, T, T]). Loaded in float32.
WAN_VAE_2_1 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True])
# Wan 2.2 A14B: each expert has the Wan 2.1 14B layout (T2V: 16 input channels; I2V: 36, and no
# CLIP image branch). Wan 2.2 TI2V-5B: 24 heads x 128, ffn 14336, 30 layers, 48 latent channels,
# and its own residual VAE (16x spatial via 2x2 patchify). Not re-read from the hub this session.
WAN22_TRANSFORMER_I2V_A14B = {**WAN_TRANSFORMER_14B, "in_channels": 36}
WAN22_TRANSFORMER_5B = {**WAN_TRANSFORMER_1_3B, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48,
                        "out_channels": 48}
WAN22_VAE_5B = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)


def wan_full_size(transformers_: dict[str, dict], vae: dict, image_encoder: bool = False) -> dict[str, FullSize]:
    """Components of one Wan checkpoint: the given transformer config(s), the VAE (float32, as
    :meth:`WanBase.load_parts` loads it) and umT5-XXL (+ the CLIP ViT-H/14 of Wan 2.1 I2V)."""
    out = {name: FullSize(diffusers.WanTransformer3DModel, cfg) for name, cfg in transformers_.items()}
    out["vae"] = FullSize(diffusers.AutoencoderKLWan, vae, torch.float32)
    out["text_encoder"] = FullSize(transformers.UMT5EncoderModel, UMT5_XXL)
    if image_encoder:
        out["image_encoder"] = FullSize(transformers.CLIPVisionModel, CLIP_VIT_H_14)
    return out




class WanBase(Family):
    """Shared Wan machinery; subclasses set the class facts and build their tiny models."""

    frame_rule = FrameRule(4)
    spatial_factor = 16  # Wan 2.1 VAE 8 x transformer patch 2 (TI2V-5B's 16x VAE: 32)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    pipeline_class = diffusers.WanPipeline
    task_pipeline_classes: ClassVar[dict[str, type]] = {"i2v": diffusers.WanImageToVideoPipeline}
    default_fps = 16  # Wan 2.1 and the 2.2 A14B models are trained and sampled at 16 fps
    native_frames = 81
    # umT5 context Wan was trained with (text_len=512); the pipelines pad every prompt to it.
    max_sequence_length: ClassVar[int] = 512
    # Flow shift of training noise levels (sampling shift of the model at LoRA clip sizes).
    train_flow_shift: ClassVar[float] = 3.0
    # "concat" or "first_frame" (module docstring)
    i2v_kind: ClassVar[str] = "concat"
    # diffusers pipeline config flags
    expand_timesteps: ClassVar[bool] = False

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        self._check_compression()

    # latent channels and VAE spatial factor of the released VAE (planning_inputs)
    latent_channels: ClassVar[int] = 16
    vae_spatial: ClassVar[int] = 8

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, C, f, h, w]; umT5 states [1, L, 4096]; for concat i2v the 4 mask + C
        first-frame channels (and the CLIP ViT-H patch states [1, 257, 1280] where the
        checkpoint has an image encoder), for first_frame i2v the clean first latent frame."""
        s = cls.vae_spatial
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // s, width // s
        c, bf16 = cls.latent_channels, torch.bfloat16
        cond = {"prompt_embeds": ((1, text_len, 4096), bf16)}
        if task == "i2v" and cls.i2v_kind == "concat":
            cond["condition"] = ((1, 4 + c, f, h, w), bf16)
            if "image_encoder" in next(iter(cls.full_size_configs(task).values())):
                cond["image_embeds"] = ((1, 257, 1280), bf16)
        elif task == "i2v":
            cond["first_latent"] = ((1, c, 1, h, w), bf16)
        return (1, c, f, h, w), cond

    # --- loading ---
    @classmethod
    def load_parts(cls, spec: ModelSpec, transformers_: tuple[str, ...] = ("transformer",),
                   **more: type) -> Components:
        """Every component with ``from_pretrained`` from the diffusers repo layout: the transformers
        ``transformers_``, the VAE, umT5 and its tokenizer, the scheduler, and ``more`` (Components
        attribute = class: image encoder and processor)."""
        loaded = {
            name: load_transformer(diffusers.WanTransformer3DModel, spec, subfolder=name)
            for name in transformers_
        }
        # The Wan docs recommend the VAE in float32 for decoding quality, whatever the rest uses.
        parts = from_subfolders(spec, vae=(diffusers.AutoencoderKLWan, torch.float32),
                                text_encoder=transformers.UMT5EncoderModel, tokenizer=transformers.AutoTokenizer,
                                scheduler=diffusers.UniPCMultistepScheduler, **more)
        return Components(**loaded, **parts)

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        return cls.load_parts(spec)

    @classmethod
    def tiny_text(cls) -> tuple[transformers.T5Tokenizer, transformers.UMT5EncoderModel, dict]:
        """Character tokenizer, 1-layer umT5 with d_model 32, and the tiny prompt length."""
        return tiny_t5_text(transformers.UMT5EncoderModel, cls.tiny_max_sequence_length)

    @staticmethod
    def calibrate_vae(vae: diffusers.AutoencoderKLWan, size: int) -> diffusers.AutoencoderKLWan:
        """Set the tiny VAE's latents_mean/std from calibration clips (posterior modes, what
        encode_videos uses), as the shipped statistics fit the real VAE."""
        with torch.no_grad():
            raw = vae.encode(calibration_videos(frames=9, height=size, width=size)).latent_dist.mode()
        mean, std = channel_stats(raw)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        return vae

    @staticmethod
    def tiny_transformer(in_channels: int, out_channels: int, **kw: Any) -> diffusers.WanTransformer3DModel:
        """2 layers, 4 heads x 32 (inner 128: wide enough for a LoRA to fit a clip), umT5 d 32."""
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=in_channels,
            out_channels=out_channels, text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **kw,
        )
        refill_zero_params(model)
        return model

    @staticmethod
    def tiny_image_encoder() -> tuple[transformers.CLIPVisionModel, transformers.CLIPImageProcessor]:
        """A 2-layer CLIP vision tower (hidden 32) on 32 px images and its processor, standing in
        for Wan 2.1 I2V's ViT-H/14."""
        config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32})
        return transformers.CLIPVisionModel(config), processor

    # --- encoding ---
    def _text_pipe(self) -> diffusers.WanPipeline:
        c = self.components
        return diffusers.WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=None, scheduler=None,
                                     transformer=None)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D]} with L = :attr:`text_len`; positions
        past each prompt's end are zeros, exactly as the Wan pipelines feed the transformer.
        Raises RuntimeError if the text encoder was released."""
        self.require("encode_prompts", "text_encoder")
        # The pipeline's own encode_prompt (cleaning, padding, zeroing the pad positions).
        embeds, _ = self._text_pipe().encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.text_len
        )
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1] fitting the family rules -> latents [B, C, f, h, w]
        normalised with the VAE's latents_mean/std (the inverse of what the pipelines do before
        decoding). Takes the posterior mode, as the original Wan VAE's encode does, so
        ``generator`` is unused. Raises ValueError for a bad shape, RuntimeError if released."""
        return self.config_normalised(self.vae_latents(videos, sample=False))

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v: the first frame's conditioning in this model's form (module docstring), built
        by the diffusers pipeline's own ``prepare_latents``/``encode_image`` on the clip's first
        frame, so training sees what inference feeds. t2v: nothing."""
        if self.task == "t2v":
            return {}
        self.require("encode_conditioning", "vae")
        b, _, frames, height, width = videos.shape
        pipe = self.pipeline_class_for("i2v")(
            tokenizer=None, text_encoder=None, vae=self.components.vae, scheduler=None,
            image_processor=self.components.image_processor, image_encoder=self.components.image_encoder,
            transformer=None, expand_timesteps=self.expand_timesteps,
        )
        vae = self.components.vae
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(b):  # the pipeline conditions a batch on one image
            image = videos[i:i + 1, :, 0].to(vae.device, torch.float32)
            out = pipe.prepare_latents(image, 1, latents.shape[1], height, width, frames, torch.float32, vae.device,
                                       None, latents[i:i + 1].to(vae.device, torch.float32))
            key = "first_latent" if self.i2v_kind == "first_frame" else "condition"
            parts.setdefault(key, []).append(out[1])
            if self.components.image_encoder is not None:
                embeds = pipe.encode_image(pil_image(videos[i, :, 0]), vae.device)
                parts.setdefault("image_embeds", []).append(embeds)
        return {k: torch.cat(v) for k, v in parts.items()}

    # --- training ---
    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond["prompt_embeds"]
        [B, L, D] (+ the i2v tensors) -> velocity [B, C, f, h, w] in the transformer's dtype,
        called as the Wan pipelines call the transformer. Wan has no frame-rate input."""
        # Cast to the model dtype as the pipelines do; from the spec, since the transformer may be
        # wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        hidden = noisy_latents
        if "condition" in cond:
            hidden = torch.cat([noisy_latents, cond["condition"].to(noisy_latents)], dim=1)
        if self.expand_timesteps:
            timesteps = self.token_timesteps(noisy_latents.shape, timesteps, clean_first="first_latent" in cond)
        image = cond.get("image_embeds")
        return transformer(
            hidden_states=hidden.to(dtype), timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_image=None if image is None else image.to(dtype), return_dict=False,
        )[0]

    @staticmethod
    def token_timesteps(shape: tuple[int, ...], timesteps: torch.Tensor, clean_first: bool) -> torch.Tensor:
        """timesteps [B] -> [B, f * h/2 * w/2], one per token as the TI2V-5B pipelines pass them;
        0 on the first frame's tokens when it is the clean conditioning frame."""
        b, _, f, h, w = shape
        mask = torch.ones(f, h // 2, w // 2, device=timesteps.device, dtype=timesteps.dtype)
        if clean_first:
            mask[0] = 0
        return mask.flatten()[None] * timesteps.view(b, 1)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """:attr:`train_flow_shift` for every latent size (Wan's shift does not depend on it)."""
        return self.train_flow_shift

    # --- inference ---
    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra constructor arguments of this family's pipelines (experts, boundary)."""
        return {"expand_timesteps": self.expand_timesteps}

    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's Wan pipeline over the current components (transformers with any LoRA in
        them). Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        parts = dict(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, scheduler=c.scheduler,
                     transformer=c.transformer, **self.pipeline_kwargs())
        if self.task == "i2v":
            parts.update(image_processor=c.image_processor, image_encoder=c.image_encoder)
        return self.pipeline_class_for(self.task)(**parts)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """Prompts padded to the length training used (the pipelines' own default is 512), and
        the first frame for i2v."""
        return {"max_sequence_length": self.text_len, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original Wan names (``blocks.{i}.self_attn.q``, ``head.head``, ...); every Wan
        transformer (both experts of a two-expert model) has this layout."""
        return KEY_MAP

    # --- checks ---
    def _check_compression(self) -> None:
        """The class-level frame and size rules must match the loaded checkpoint (a Wan 2.2 5B
        repo loaded as Wan 2.1, say, has a 16x VAE and would silently break them)."""
        c = self.components
        if c.vae is None:
            return
        patch = (c.transformer or c.transformer_2).config.patch_size
        spatial = c.vae.config.scale_factor_spatial * patch[1]
        temporal = c.vae.config.scale_factor_temporal * patch[0]
        self.check_compression(spatial, temporal, f"use a checkpoint such as {self.model_id_for(self.task)}"
                                                  f"{self.wrong_family_hint(spatial)}")

    def wrong_family_hint(self, spatial: int) -> str:
        """Which family a checkpoint with this compression belongs to, for the error above."""
        return " (16x VAE x 2 patch = 32: a Wan 2.2 TI2V-5B checkpoint, family wan22_5b)" if spatial == 32 else ""
