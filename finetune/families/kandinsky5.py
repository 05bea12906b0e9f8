"""Kandinsky 5.0 Video Lite (2B) text-to-video and image-to-video, diffusers format.

Latent space: the HunyuanVideo VAE (AutoencoderKLHunyuanVideo), 16 channels, 8x spatial and 4x
temporal compression, latents multiplied by ``config.scaling_factor`` (no shift), as the
pipelines undo before decoding. Transformer: Kandinsky5Transformer3DModel, channels-last
([B, f, h, w, C]) with 1x2x2 patches; the Lite checkpoints have ``visual_cond``: the input is the
noisy latents, then C conditioning channels and 1 mask channel. Its context is
  Qwen2.5-VL-7B  last hidden states after a video system prompt that is cropped away, unpadded
                 (``prompt_embeds`` [B, L, 3584], zeros past ``prompt_lengths`` [B]; the
                 transformer has no text mask, so predict passes each prompt's own tokens);
  CLIP ViT-L/14  the pooled text embedding (``pooled_projections`` [B, 768]).
Image-to-video conditions the way kandinskylab/kandinsky-5 ``generation_utils.generate_sample``
and diffusers' Kandinsky5I2VPipeline do: the first latent frame of the noisy input is the clean
VAE latent of the image, the mask channel is 1 there, the conditioning channels stay zero; the
prediction on that frame is discarded, so training leaves it out of the loss
(``cond["first_latent"]`` [B, C, 1, h, w]). Text-to-video passes zero conditioning and mask.

Training: rectified flow x_t = (1 - t) x_0 + t * noise, velocity target noise - x_0 (the official
sampler integrates x += dt * v from t = 1 to 0), model time 1000 t. kandinskylab/kandinsky-5 ships
no training code; noise levels are logit-normal, shifted with the model's own ``scheduler_scale``
(10 for the Lite 5s t2v and i2v models: ``t2v_pipeline``/``i2v_pipeline`` and
``configs/k5_lite_i2v_5s_sft_sd.yaml``; the diffusers scheduler config's ``shift``).

The diffusers pipelines load LoRA files (KandinskyLoraLoaderMixin).

Attention masks: none at any batch size. There is no text padding (each prompt's own tokens, one
prompt length per transformer call) and the Lite models' ``attention_type`` is "regular" (the
Pro models' sparse "nabla" block mask is never built).
"""

from __future__ import annotations

import types
from typing import Any, ClassVar

import diffusers
import torch
import transformers
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor, nablaT_v2

from finetune.families import register
from finetune.families._encoders import CLIP_L_TEXT, QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION
from finetune.families._loading import from_subfolders, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    refill_zero_params,
    tiny_clip_text,
    tiny_qwen_text_config,
    tiny_qwen_tokenizer,
)
from finetune.families.base import TEXT_LEN_KEY, Components, Family, FrameRule, FullSize, ModelSpec
from finetune.lora_formats import KeyMap
from finetune.video import pil_image

# components.extra key: where a tiny build's system prompt ends (the real tokenizer's is 128)
CROP_KEY = "prompt_template_encode_start_idx"

_ATTN = ("to_query", "to_key", "to_value", "out_layer")
# diffusers module name -> name in the original checkpoint (kandinsky/models/dit.py, nn.py), which
# ComfyUI's Kandinsky 5 model loads. diffusers kept the original module names, so every pair is the
# identity; listing them makes the map complete and checks that it stays so.
KEY_MAP = KeyMap(tuple((n, n) for n in (
    "time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
    "pooled_text_embeddings.in_layer", "visual_embeddings.in_layer",
    "text_transformer_blocks.{i}.text_modulation.out_layer",
    *(f"text_transformer_blocks.{{i}}.self_attention.{a}" for a in _ATTN),
    "text_transformer_blocks.{i}.feed_forward.in_layer", "text_transformer_blocks.{i}.feed_forward.out_layer",
    "visual_transformer_blocks.{i}.visual_modulation.out_layer",
    *(f"visual_transformer_blocks.{{i}}.{kind}.{a}" for kind in ("self_attention", "cross_attention") for a in _ATTN),
    "visual_transformer_blocks.{i}.feed_forward.in_layer", "visual_transformer_blocks.{i}.feed_forward.out_layer",
    "out_layer.modulation.out_layer", "out_layer.out_layer",
)))


class Kandinsky5I2VPipeline(diffusers.Kandinsky5I2VPipeline):
    """diffusers' Kandinsky5I2VPipeline for short clips too. Its last step matches the first 4
    latent frames' statistics to the next ones; clips under 17 frames have no next ones, and it
    returns NaN. Here those clips are left as sampled. Same class name, so a saved folder's
    model_index.json names diffusers' own class."""

    def normalize_first_frame(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if latents.shape[1] <= 4:
            return latents
        return super().normalize_first_frame(latents, *args, **kwargs)


class RopeInModelDtypeProcessor(Kandinsky5AttnProcessor):
    """Kandinsky5AttnProcessor, except that the rotated queries and keys are rounded to the
    model's dtype where diffusers' rounds them to bfloat16 whatever it is: the same in bfloat16
    (how the model runs), exact in float32 (the tiny test models, where the rounding would make a
    fused LoRA differ from the unfused one). Written out because the rounding sits inside
    diffusers' __call__."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 rotary_emb: torch.Tensor = None, sparse_params: dict | None = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = (attn.num_heads, -1)
        query = attn.to_query(hidden_states).unflatten(-1, heads)
        key = attn.to_key(context).unflatten(-1, heads)
        value = attn.to_value(context).unflatten(-1, heads)
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = (self.rotate(x, rotary_emb) for x in (query, key))
        mask = None if sparse_params is None else nablaT_v2(query, key, sparse_params["sta_mask"],
                                                            thr=sparse_params["P"])
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return attn.out_layer(out.flatten(-2, -1))

    @staticmethod
    def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x [..., heads, d] by rope [..., d/2, 2, 2] (pairs of channels as 2x2 rotations), in fp32."""
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2).float()
        return (rope * pairs).sum(dim=-1).reshape(x.shape).to(x.dtype)




@register
class Kandinsky5Family(Family):
    name = "kandinsky5"
    frame_rule = FrameRule(4)
    spatial_factor = 16  # VAE 8 x transformer patch 2
    # Every block's attention (query/key/value/output of the visual self- and cross-attention and
    # of the text blocks' self-attention) and MLP, under Kandinsky 5's names. Not "out_layer" alone:
    # it also names the final projection module, which is no Linear.
    default_lora_targets = (
        "to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer",
        "feed_forward.in_layer", "feed_forward.out_layer",
    )
    default_model_id = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    tasks = ("t2v", "i2v")
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers"}
    pipeline_class = diffusers.Kandinsky5T2VPipeline
    task_pipeline_classes: ClassVar[dict[str, type]] = {"i2v": Kandinsky5I2VPipeline}
    default_fps = 24  # the official pipelines write 24 fps videos
    native_frames = 121
    # Qwen tokens after the system prompt: text_embedder.qwen.max_length of the official configs.
    max_sequence_length: ClassVar[int] = 256
    tiny_max_sequence_length: ClassVar[int] = 32

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once, unwrapped: predict() may get the transformer wrapped by DDP/PEFT.
        self._config = components.transformer.config
        self._check_checkpoint()
        components.transformer.set_attn_processor(RopeInModelDtypeProcessor())

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """Every component from the kandinskylab diffusers layout in ``spec.dtype`` (the docs load
        the pipeline in bfloat16), the transformer maybe quantised; the VAE tiled as the docs
        advise for 5 s clips."""
        transformer = load_transformer(diffusers.Kandinsky5Transformer3DModel, spec)
        parts = from_subfolders(
            spec, vae=diffusers.AutoencoderKLHunyuanVideo, text_encoder=transformers.Qwen2_5_VLForConditionalGeneration,
            tokenizer=transformers.AutoProcessor, text_encoder_2=transformers.CLIPTextModel,
            tokenizer_2=transformers.CLIPTokenizer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler)
        parts["vae"].enable_tiling()
        return Components(transformer, **parts)

    # Lite (2B) transformer/config.json: in/out 16 latent channels, Qwen 3584 / CLIP 768 text
    # inputs, time_dim 512, patch [1, 2, 2], model_dim 1792, ff_dim 7168, 2 text + 32 visual blocks,
    # rope axes [16, 24, 24], visual_cond true. Values as quoted from the Lite checkpoints' configs in
    # public code (code search, this session: kandinskylab's get_default_conf for the Lite t2v/i2v
    # DiT, and a test quoting Lite's transformer/config.json); the 5 s checkpoints use full
    # ("regular") attention, diffusers' default (NABLA is for the 10 s ones).
    _LITE_TRANSFORMER: ClassVar[dict[str, Any]] = dict(
        in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512,
        patch_size=[1, 2, 2], model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
        axes_dims=[16, 24, 24], visual_cond=True, attention_type="regular")

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Kandinsky 5.0 Video Lite (t2v sft 5 s; i2v Lite 5 s, the same transformer layout): the
        Lite transformer (:attr:`_LITE_TRANSFORMER`), the HunyuanVideo VAE with
        AutoencoderKLHunyuanVideo's defaults (16 channels, 8x/4x: the HunyuanVideo VAE the repos
        ship; not re-read from the hub), the whole Qwen2.5-VL-7B (load_pretrained loads
        Qwen2_5_VLForConditionalGeneration: text model, lm_head and vision tower) and CLIP ViT-L/14
        text."""
        return {cls.model_id_for(task): {
            "transformer": FullSize(diffusers.Kandinsky5Transformer3DModel, dict(cls._LITE_TRANSFORMER),
                                    block_keys=("num_text_blocks", "num_visual_blocks")),
            "vae": FullSize(diffusers.AutoencoderKLHunyuanVideo, {}),
            "text_encoder": FullSize(transformers.Qwen2_5_VLForConditionalGeneration, dict(
                text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False)),
            "text_encoder_2": FullSize(transformers.CLIPTextModel, CLIP_L_TEXT)}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 16, f, h, w] (8x spatial, 4x temporal); what :meth:`encode_prompts` gives:
        Qwen states [1, L, 3584], prompt_lengths [1] (int64) and the pooled CLIP embedding [1, 768];
        i2v adds the clean first latent frame [1, 16, 1, h, w] (:meth:`encode_conditioning`).
        Under the planner's fake tensors prompt_lengths reads as 1 (trace._ValueFree), so the
        trace sees one text token, not L: an underestimate of the text blocks and the
        cross-attention keys/values, small next to the video tokens."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        bf16 = torch.bfloat16
        cond = {"prompt_embeds": ((1, text_len, 3584), bf16), "prompt_lengths": ((1,), torch.int64),
                "pooled_projections": ((1, 768), bf16)}
        if task == "i2v":
            cond["first_latent"] = ((1, 16, 1, h, w), bf16)
        return (1, 16, f, h, w), cond

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 1 text and 2 visual blocks (width 128, 4 heads x 32),
        ``visual_cond`` as the Lite checkpoints; a HunyuanVideo VAE with 8 channels per block
        that keeps the real 8x / 4x compression and 8 latent channels (scaling factor measured on
        calibration clips); a 2-layer Qwen2.5-VL (hidden 32) with a byte-level Qwen2 tokenizer; a
        1-layer CLIP text model (hidden 32) with a character CLIP tokenizer; scheduler shift 5."""
        tokenizer, text_encoder, crop = cls.tiny_qwen()
        tokenizer_2, text_encoder_2 = tiny_clip_text()
        vae = cls.tiny_vae()
        latent = vae.config.latent_channels
        transformer = diffusers.Kandinsky5Transformer3DModel(
            in_visual_dim=latent, out_visual_dim=latent, in_text_dim=32, in_text_dim2=32, time_dim=64,
            patch_size=(1, 2, 2), model_dim=128, ff_dim=256, num_text_blocks=1, num_visual_blocks=2,
            axes_dims=(8, 12, 12), visual_cond=True,
        )
        refill_zero_params(transformer)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
        extra = {TEXT_LEN_KEY: cls.tiny_max_sequence_length, CROP_KEY: crop}
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra,
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @staticmethod
    def tiny_qwen() -> tuple[transformers.Qwen2Tokenizer, transformers.Qwen2_5_VLForConditionalGeneration, int]:
        """A byte-level Qwen2 tokenizer built in code (one token per byte, no merges, Qwen's chat
        special tokens), a 2-layer Qwen2.5-VL (hidden 32, a 1-block vision tower the text path
        never runs) for it, and the number of tokens the pipelines' system prompt takes with it."""
        tokenizer = tiny_qwen_tokenizer()
        text = tiny_qwen_text_config(tokenizer, layers=2)
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32,
                      fullatt_block_indexes=[0])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        # The pipelines crop everything before the prompt: the template up to "{}".
        names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        template = diffusers.Kandinsky5T2VPipeline(**dict.fromkeys(names)).prompt_template
        crop = len(tokenizer(template.split("{}")[0]).input_ids)
        return tokenizer, transformers.Qwen2_5_VLForConditionalGeneration(config), crop

    @staticmethod
    def tiny_vae() -> diffusers.AutoencoderKLHunyuanVideo:
        """8 latent channels, four blocks (8x spatial, 4x temporal as the real VAE), a narrow
        posterior like a trained VAE's, and a scaling factor that gives the calibration clips'
        latents unit variance."""
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4,
        )
        with torch.no_grad():
            # A random encoder's log-variance is ~0: posterior samples would be mostly noise. The
            # encoder's moments pass through quant_conv last, so shift the log-variance there.
            vae.quant_conv.bias[vae.config.latent_channels:] -= 12.0
            raw = vae.encode(calibration_videos(frames=9, height=32, width=32)).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        return vae

    # --- encoding ---
    def _pipe(self, **parts: Any) -> diffusers.Kandinsky5T2VPipeline:
        """A pipeline object over some components, to call its own helpers."""
        names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
        pipe = self.pipeline_class_for(self.task)(**{n: parts.get(n) for n in names})
        if CROP_KEY in self.components.extra:
            pipe.prompt_template_encode_start_idx = self.components.extra[CROP_KEY]
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D] (Qwen, L = :attr:`text_len`, zeros
        past each prompt's tokens), "prompt_lengths": [B] (int64), "pooled_projections": [B, D2]
        (CLIP)}, each prompt through the pipeline's own encode_prompt alone, as inference encodes
        it. Raises RuntimeError if the text encoders were released."""
        self.require("encode_prompts", "text_encoder", "text_encoder_2")
        c = self.components
        pipe = self._pipe(text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                          tokenizer_2=c.tokenizer_2)
        dtype, device = c.text_encoder.dtype, c.text_encoder.device
        embeds, lengths, pooled = [], [], []
        for prompt in prompts:
            qwen, clip, cu = pipe.encode_prompt([prompt], max_sequence_length=self.text_len, device=device,
                                                dtype=dtype)
            n = int(cu[-1])
            embeds.append(torch.nn.functional.pad(qwen[0, :n], (0, 0, 0, self.text_len - n)))
            lengths.append(n)
            pooled.append(clip[0])
        return {"prompt_embeds": torch.stack(embeds), "prompt_lengths": torch.tensor(lengths),
                "pooled_projections": torch.stack(pooled)}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 16 -> latents
        [B, C, (F-1)/4+1, H/8, W/8]: a posterior sample (with ``generator``) times the VAE's scaling
        factor, as the I2V pipeline encodes its image and the pipelines undo before decoding.
        Raises ValueError for a bad shape, RuntimeError if the VAE was released."""
        return self.scaled_latents(videos, generator)

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor,
                            captions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """i2v: {"first_latent": [B, C, 1, h, w]}, the latent the I2V pipeline's own
        prepare_latents puts in the first frame, from each clip's first frame as a PIL image (so
        training sees what inference feeds; seeded). t2v: nothing."""
        if self.task == "t2v":
            return {}
        self.require("encode_conditioning", "vae")
        c = self.components
        pipe = self._pipe(vae=c.vae, transformer=c.transformer)
        b, ch, frames, height, width = videos.shape[0], latents.shape[1], *videos.shape[2:]
        firsts = []
        for i in range(b):  # the pipeline conditions a batch on one image
            gen = torch.Generator(c.vae.device).manual_seed(0)
            # in the VAE's dtype, as the pipeline's call does (it passes the model dtype)
            out = pipe.prepare_latents(pil_image(videos[i, :, 0]), 1, ch, height, width, frames, c.vae.dtype,
                                       c.vae.device, gen)
            firsts.append(out[:, :1, :, :, :ch].permute(0, 4, 1, 2, 3).float())  # [1, 1, h, w, C] -> [1, C, 1, h, w]
        return {"first_latent": torch.cat(firsts)}

    # --- training ---
    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The model's scheduler_scale (its scheduler config's ``shift``) at every size."""
        return float(self.components.scheduler.config.shift)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond from
        :meth:`encode_prompts` (+ :meth:`encode_conditioning`) -> velocity [B, C, f, h, w], called
        as the pipelines' denoising loop calls the transformer: channels last, zero conditioning
        channels, mask 1 on a clean first frame, each prompt's own tokens (prompts of different
        lengths run one at a time: the transformer has no text mask). No frame-rate input."""
        lengths = cond["prompt_lengths"].tolist()
        if len(set(lengths)) > 1:
            return torch.cat([self.predict(transformer, noisy_latents[i:i + 1], timesteps[i:i + 1],
                                           {k: v[i:i + 1] for k, v in cond.items()}, fps)
                              for i in range(len(lengths))])
        dtype = self.spec.dtype  # the pipelines' transformer.dtype; the transformer may be wrapped or quantised
        b, ch, f, h, w = noisy_latents.shape
        hidden = noisy_latents.permute(0, 2, 3, 4, 1)
        if self._config.visual_cond:
            mask = hidden.new_zeros(b, f, h, w, 1)
            if "first_latent" in cond:
                mask[:, :1] = 1
            hidden = torch.cat([hidden, torch.zeros_like(hidden), mask], dim=-1)
        patch = self._config.patch_size
        device = noisy_latents.device
        rope = [torch.arange(f // patch[0], device=device), torch.arange(h // patch[1], device=device),
                torch.arange(w // patch[2], device=device)]
        vae_spatial = self.spatial_factor // patch[1]
        scale = self.pipeline_class._get_scale_factor(None, h * vae_spatial, w * vae_spatial)
        shim = types.SimpleNamespace(transformer=types.SimpleNamespace(config=self._config),
                                     fast_sta_nabla=self.pipeline_class.fast_sta_nabla)
        sparse = self.pipeline_class.get_sparse_params(shim, hidden, device)
        n = lengths[0]
        out = transformer(
            hidden_states=hidden.to(dtype), encoder_hidden_states=cond["prompt_embeds"][:, :n].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype), timestep=timesteps.to(dtype),
            visual_rope_pos=rope, text_rope_pos=torch.arange(n, device=device), scale_factor=scale,
            sparse_params=sparse, return_dict=False,
        )
        return (out[0] if isinstance(out, tuple) else out).permute(0, 4, 1, 2, 3)

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's pipeline over the current components (the transformer with any LoRA in it),
        with a tiny build's system-prompt length. Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "text_encoder_2", "vae")
        return self._pipe(transformer=c.transformer, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                          text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, scheduler=c.scheduler)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The training prompt length, and the first frame for i2v (no frame-rate input)."""
        return {"max_sequence_length": self.text_len, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """The original Kandinsky 5 names, which diffusers kept (``visual_transformer_blocks.{i}.
        self_attention.to_query``, ...)."""
        return KEY_MAP

    # --- checks ---
    def _check_checkpoint(self) -> None:
        """The class-level frame and size rules, the VAE/transformer channel match, and for i2v
        the conditioning channels must fit the loaded checkpoint."""
        c, config = self.components, self._config
        fix = f"use a Kandinsky 5 Video checkpoint such as {self.model_id_for(self.task)}"
        if c.vae is not None:
            spatial = c.vae.config.spatial_compression_ratio * config.patch_size[1]
            temporal = c.vae.config.temporal_compression_ratio * config.patch_size[0]
            self.check_compression(spatial, temporal, fix)
            latent = c.vae.config.latent_channels
            if (config.in_visual_dim, config.out_visual_dim) != (latent, latent):
                raise ValueError(
                    f"{self.name}: {self.spec.display_id}'s transformer maps {config.in_visual_dim} -> "
                    f"{config.out_visual_dim} latent channels but its VAE has {latent}; {fix}"
                )
        if self.task == "i2v" and not config.visual_cond:
            raise ValueError(
                f"{self.name}: {self.spec.display_id} has no visual conditioning channels (visual_cond=false), so it "
                f"cannot take a first frame for task i2v; {fix}"
            )

