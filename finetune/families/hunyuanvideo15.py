"""HunyuanVideo-1.5 (8.3B) text-to-video and image-to-video, 480p and 720p, diffusers format.

Latent space: AutoencoderKLHunyuanVideo15, 32 channels, 16x spatial and 4x temporal compression,
latents multiplied by ``config.scaling_factor`` (no shift). Transformer:
HunyuanVideo15Transformer3DModel with 1x1x1 patches on 65 input channels: 32 noisy latent channels,
then 32 conditioning-latent channels and 1 mask channel. Its context is three token sets:
  Qwen2.5-VL-7B   hidden states of the third layer from the end, after a video system prompt that
                  is cropped away (``prompt_embeds`` [B, 1000, 3584] + mask);
  byT5 (Glyph)    embeddings of the text the prompt puts in quotes, for rendering it in the video;
                  zeros with an all-zero mask when it quotes nothing (``prompt_embeds_2`` [B, 256, 1472]);
  SigLIP          i2v: the image's patch embeddings (``image_embeds`` [B, 729, 1152]); t2v: zeros,
                  which the transformer masks out.
i2v conditions through the concat channels: the VAE latent of the first frame at latent frame 0 and
mask 1 there, zeros elsewhere (``cond["condition"]`` [B, 33, f, h, w]); t2v passes zeros.

Training follows Tencent-Hunyuan/HunyuanVideo-1.5 ``train.py``: rectified flow
x_t = (1 - t) x_0 + t * noise with target noise - x_0 and a plain MSE over every latent, the first
frame of i2v included (the clean image reaches the model through the concat channels, not through
the noisy input); t from a logit-normal (``snr_type`` lognorm) squeezed into [1e-5, 1 - 1e-5] and
then shifted with ``train_timestep_shift`` 3.0, not with the sampling flow shift (5 at 480p, 7 or 9
at 720p). The VAE posterior is sampled, as its ``encode_vae`` does.

The diffusers pipelines have no ``load_lora_weights``; adapters load at transformer level
(:meth:`Family.load_adapter`).

Attention masks: diffusers builds a dense [B, 1, S, S] mask from the text masks in every block (S
video + text tokens: 51k at 480p x 121, 2.6 GB as bool, 5 GB as a bf16 bias) and runs the token
refiner with fully masked padding rows, which cuDNN's SDPA backward on H100/H200 turns into NaN
(pytorch/pytorch#196678). The family sets processors that attend over each sample's valid tokens
without a mask (``_attention.py``): the same outputs, nothing S x S, flash possible, no fully
masked row; :meth:`predict` and :meth:`pipeline` both run through them.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ClassVar, Iterator

import diffusers
import torch
import transformers
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

from finetune.families import register
from finetune.families._attention import HunyuanVideo15Processor
from finetune.families._encoders import BYT5_SMALL, QWEN25_VL_7B_TEXT, SIGLIP_SO400M_384
from finetune.families._hunyuan import FINAL_PAIRS, SHARED_PAIRS, HunyuanVideoBase
from finetune.families._loading import from_subfolders, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    refill_zero_params,
    tiny_qwen_text_config,
    tiny_qwen_tokenizer,
    tiny_t5_encoder_config,
)
from finetune.families.base import TEXT_LEN_KEY, Components, Family, FullSize, ModelSpec
from finetune.lora_formats import KeyMap, embedding
from finetune.video import pil_image

# components.extra keys: the CFG guider, and the tiny builds' shorter text/image token counts
GUIDER_KEY = "guider"
BYT5_LEN_KEY = "byt5_max_length"
CROP_KEY = "prompt_template_crop"
VISION_TOKENS_KEY = "vision_tokens"

# Qwen2.5's chat template for plain-text messages: what the pipeline's apply_chat_template renders.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- the diffusers pipelines, taking the arguments every family's pipeline call takes ---
@contextlib.contextmanager
def _call_settings(pipe: Any, guidance_scale: float | None, max_sequence_length: int | None) -> Iterator[None]:
    """For one call: the guider's scale (the HunyuanVideo-1.5 pipelines keep it in their guider,
    not in a call argument) and the Qwen tokens per prompt (a pipeline attribute)."""
    guider, text_len = pipe.guider, pipe.tokenizer_max_length
    try:
        if guidance_scale is not None:
            pipe.guider = guider.new(guidance_scale=guidance_scale)
        if max_sequence_length is not None:
            pipe.tokenizer_max_length = max_sequence_length
        yield
    finally:
        pipe.guider, pipe.tokenizer_max_length = guider, text_len


class HunyuanVideo15Pipeline(diffusers.HunyuanVideo15Pipeline):
    """diffusers' HunyuanVideo15Pipeline that also takes ``guidance_scale`` and
    ``max_sequence_length`` in its call, as the other families' pipelines do. Same class name, so a
    saved folder's model_index.json names diffusers' own class."""

    def __call__(self, *args: Any, guidance_scale: float | None = None, max_sequence_length: int | None = None,
                 **kwargs: Any) -> Any:
        with _call_settings(self, guidance_scale, max_sequence_length):
            return super().__call__(*args, **kwargs)


class _SizedImageProcessor(HunyuanVideo15ImageProcessor):
    """Returns a fixed (height, width) where the I2V pipeline would pick the bucket closest to the
    image's aspect ratio at the model's target size."""

    fixed_size: tuple[int, int] | None = None

    def calculate_default_height_width(self, height: int, width: int, target_size: int) -> tuple[int, int]:
        if self.fixed_size is not None:
            return self.fixed_size
        return super().calculate_default_height_width(height, width, target_size)


class HunyuanVideo15ImageToVideoPipeline(diffusers.HunyuanVideo15ImageToVideoPipeline):
    """diffusers' HunyuanVideo15ImageToVideoPipeline that also takes ``guidance_scale``,
    ``max_sequence_length`` and ``height``/``width`` in its call. diffusers picks the size from the
    image and the model's resolution buckets; given both, this renders at that size (the clip size
    the adapter was trained at), the image cropped to it. Same class name as diffusers'."""

    def __call__(self, *args: Any, height: int | None = None, width: int | None = None,
                 guidance_scale: float | None = None, max_sequence_length: int | None = None, **kwargs: Any) -> Any:
        if (height is None) != (width is None):
            raise ValueError(f"pass both height and width or neither, got height={height}, width={width}")
        processor = self.video_processor
        try:
            if height is not None:
                keys = ("do_resize", "vae_scale_factor", "vae_latent_channels", "do_convert_rgb")
                self.video_processor = _SizedImageProcessor(**{k: processor.config[k] for k in keys})
                self.video_processor.fixed_size = (int(height), int(width))
            with _call_settings(self, guidance_scale, max_sequence_length):
                return super().__call__(*args, **kwargs)
        finally:
            self.video_processor = processor


# diffusers module name -> name in the original checkpoint (Tencent-Hunyuan/HunyuanVideo-1.5,
# hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py and modules/), the inverse of diffusers'
# scripts/convert_hunyuan_video1_5_to_diffusers.py. The double blocks keep q, k, v apart; the token
# refiner fuses them (self_attn_qkv), and the final adaLN stores shift before scale (diffusers swaps).
KEY_MAP = KeyMap((
    *((f"transformer_blocks.{{i}}.attn.{d}", f"double_blocks.{{i}}.{o}") for d, o in (
        ("to_q", "img_attn_q"), ("to_k", "img_attn_k"), ("to_v", "img_attn_v"), ("to_out.0", "img_attn_proj"),
        ("add_q_proj", "txt_attn_q"), ("add_k_proj", "txt_attn_k"), ("add_v_proj", "txt_attn_v"),
        ("to_add_out", "txt_attn_proj"))),
    *SHARED_PAIRS,  # double-block modulation and MLPs, token refiner, text embedders (_hunyuan.py)
    ("context_embedder_2.linear_1", "byt5_in.fc1"),
    ("context_embedder_2.linear_2", "byt5_in.fc2"),
    ("context_embedder_2.linear_3", "byt5_in.fc3"),
    ("image_embedder.linear_1", "vision_in.proj.1"),
    ("image_embedder.linear_2", "vision_in.proj.3"),
    ("time_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("time_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("time_embed.timestep_embedder_r.linear_1", "time_r_in.mlp.0"),  # step-distilled (meanflow) models
    ("time_embed.timestep_embedder_r.linear_2", "time_r_in.mlp.2"),
    ("x_embedder.proj", "img_in.proj"),
    embedding("cond_type_embed", "cond_type_embedding"),
    *FINAL_PAIRS,
))




@register
class HunyuanVideo15Family(HunyuanVideoBase):
    name = "hunyuanvideo15"
    # Every double-stream block's video attention q/k/v/out, the text keys/values the video tokens
    # attend to, and the video MLP (the names also match the text refiner's attention and MLP): a
    # superset of diffusers' and finetrainers' HunyuanVideo default (to_q/k/v/out.0). The text
    # stream's own queries, output and MLP (add_q_proj, to_add_out, ff_context.*) are left out:
    # they only reshape text tokens, and in the last block they reach nothing (its text output is
    # dropped); add them with lora.targets if wanted.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2",
    )
    default_model_id = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
    tasks = ("t2v", "i2v")
    # 720p: hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v / _i2v via model.pretrained
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"}
    pipeline_class = HunyuanVideo15Pipeline
    task_pipeline_classes: ClassVar[dict[str, type]] = {"i2v": HunyuanVideo15ImageToVideoPipeline}
    default_fps = 24  # the model card and the official scripts write 24 fps videos
    native_frames = 121
    # Qwen tokens per prompt after the system prompt is cropped: the pipelines' tokenizer_max_length.
    max_sequence_length: ClassVar[int] = 1000
    tiny_extras: ClassVar[tuple[str, ...]] = (*Family.tiny_extras, BYT5_LEN_KEY, VISION_TOKENS_KEY)
    byt5_max_length: ClassVar[int] = 256  # the pipelines' tokenizer_2_max_length
    vision_num_tokens: ClassVar[int] = 729  # SigLIP 384 px / 14 px patches = 27 x 27: vision_num_semantic_tokens
    # train.py: --train_timestep_shift 3.0 (sampling uses flow_shift 5/7/9 from the scheduler config)
    train_timestep_shift: ClassVar[float] = 3.0
    # train.py TimestepSampler.TRAIN_EPS: training t stays in [eps, 1 - eps]
    train_eps: ClassVar[float] = 1e-5
    key_map = KEY_MAP

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once, unwrapped: predict() may get the transformer wrapped by DDP/PEFT.
        self._image_embed_dim = int(components.transformer.config.image_embed_dim)

    @staticmethod
    def set_block_processors(transformer: torch.nn.Module) -> None:
        """The double-stream blocks without diffusers' dense [B, 1, S, S] text mask
        (:class:`HunyuanVideo15Processor`); the token refiner's padding rows are never fully masked."""
        for block in transformer.transformer_blocks:
            block.attn.set_processor(HunyuanVideo15Processor())

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """Every component from the hunyuanvideo-community diffusers layout in ``spec.dtype`` (the
        docs load the whole pipeline in bfloat16), the transformer maybe quantised; the VAE tiled
        and sliced as the docs advise."""
        transformer = load_transformer(diffusers.HunyuanVideo15Transformer3DModel, spec)
        i2v = dict(image_encoder=transformers.SiglipVisionModel, feature_extractor=transformers.SiglipImageProcessor)
        parts = from_subfolders(
            spec, vae=diffusers.AutoencoderKLHunyuanVideo15, text_encoder=transformers.Qwen2_5_VLTextModel,
            tokenizer=transformers.Qwen2Tokenizer, text_encoder_2=transformers.T5EncoderModel,
            tokenizer_2=transformers.ByT5Tokenizer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler,
            guider=diffusers.ClassifierFreeGuidance, **(i2v if spec.task == "i2v" else {}))
        parts["vae"].enable_tiling()
        parts["vae"].enable_slicing()  # its causal mid-block attention only handles one clip at a time
        return Components(transformer, extra={GUIDER_KEY: parts.pop("guider")},
                          image_processor=parts.pop("feature_extractor", None), **parts)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """HunyuanVideo-1.5 8.3B at 480p and 720p (same weights layout; target_size 640 / 960):
        the transformer config as quoted from the diffusers repos' transformer/config.json in
        public code (code search, this session); AutoencoderKLHunyuanVideo15's defaults (32
        channels, 16x), Qwen2.5-VL-7B's text model, byT5-small, and for i2v SigLIP so400m/384."""
        out = {}
        for res, target in (("480p", 640), ("720p", 960)):
            parts = {
                "transformer": FullSize(diffusers.HunyuanVideo15Transformer3DModel, dict(
                    in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                    num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                    text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                    rope_axes_dim=[16, 56, 56], target_size=target, task_type=task, use_meanflow=False)),
                "vae": FullSize(diffusers.AutoencoderKLHunyuanVideo15, {}),
                "text_encoder": FullSize(transformers.Qwen2_5_VLTextModel, QWEN25_VL_7B_TEXT),
                "text_encoder_2": FullSize(transformers.T5EncoderModel, BYT5_SMALL),
            }
            if task == "i2v":
                parts["image_encoder"] = FullSize(transformers.SiglipVisionModel, SIGLIP_SO400M_384)
            out[f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{res}_{task}"] = parts
        return out

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 32, f, h, w] (16x spatial, 4x temporal); Qwen states [1, L, 3584] and byT5
        states [1, 256, 1472] with masks; the 33 conditioning channels and the SigLIP tokens
        [1, 729, 1152] (zeros for t2v, as :meth:`predict` passes them)."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 16, width // 16
        bf16 = torch.bfloat16
        return (1, 32, f, h, w), {
            "prompt_embeds": ((1, text_len, 3584), bf16), "prompt_embeds_mask": ((1, text_len), bf16),
            "prompt_embeds_2": ((1, cls.byt5_max_length, 1472), bf16),
            "prompt_embeds_mask_2": ((1, cls.byt5_max_length), bf16),
            "condition": ((1, 33, f, h, w), bf16), "image_embeds": ((1, cls.vision_num_tokens, 1152), bf16)}

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2 double-stream blocks (4 heads x 32) with a 1-block text
        refiner, a VAE with 8-16 channels per block that keeps the real 16x spatial / 4x temporal
        compression and 8 latent channels (scaling factor measured on calibration clips), a 3-layer
        Qwen2.5-VL text model (hidden 32) with a byte-level Qwen2 tokenizer, a 1-layer byT5 (d 32)
        with the real ByT5 tokenizer, the 480p scheduler and guider settings; for i2v a 2-layer
        SigLIP vision tower on 32 px images."""
        tokenizer, text_encoder, crop = cls.tiny_qwen()
        tokenizer_2 = transformers.ByT5Tokenizer(extra_ids=0)
        text_encoder_2 = transformers.T5EncoderModel(tiny_t5_encoder_config(transformers.T5Config, tokenizer_2))
        vae = cls.tiny_vae()
        image_encoder = image_processor = None
        vision_tokens = 16
        if task == "i2v":
            config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, patch_size=8)
            image_encoder = transformers.SiglipVisionModel(config)
            image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
            vision_tokens = (config.image_size // config.patch_size) ** 2
        latent = vae.config.latent_channels
        transformer = diffusers.HunyuanVideo15Transformer3DModel(
            in_channels=2 * latent + 1, out_channels=latent, num_attention_heads=4, attention_head_dim=32,
            num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=32,
            image_embed_dim=32, rope_axes_dim=(8, 12, 12), target_size=32, task_type=task,
        )
        refill_zero_params(transformer)
        # 480p settings (README "Optimal Inference Configurations"): flow shift 5, CFG 6.
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
        guider = diffusers.ClassifierFreeGuidance(guidance_scale=6.0)
        extra = {GUIDER_KEY: guider, TEXT_LEN_KEY: cls.tiny_max_sequence_length, BYT5_LEN_KEY: 8, CROP_KEY: crop,
                 VISION_TOKENS_KEY: vision_tokens}
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra,
                          image_encoder=image_encoder, image_processor=image_processor,
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @staticmethod
    def tiny_qwen() -> tuple[transformers.Qwen2Tokenizer, transformers.Qwen2_5_VLTextModel, int]:
        """A byte-level Qwen2 tokenizer built in code (one token per byte, no merges, Qwen's chat
        special tokens and template), a 3-layer Qwen2.5-VL text model (hidden 32, multimodal rope)
        for it, and the number of tokens its rendering of the pipeline's system prompt takes (the
        real tokenizer's is the pipelines' 108)."""
        tokenizer = tiny_qwen_tokenizer()
        tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
        config = transformers.Qwen2_5_VLTextConfig(**tiny_qwen_text_config(tokenizer, layers=3))
        helper = inspect.signature(diffusers.HunyuanVideo15Pipeline._get_mllm_prompt_embeds)
        system = helper.parameters["system_message"].default
        prefix = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": ""}],
                                               tokenize=False)
        crop = len(tokenizer(prefix.removesuffix("<|im_end|>\n")).input_ids)
        return tokenizer, transformers.Qwen2_5_VLTextModel(config), crop

    @staticmethod
    def tiny_vae() -> diffusers.AutoencoderKLHunyuanVideo15:
        """8 latent channels, five blocks (four 2x spatial downsamples, the last two also 2x in
        time: 16x / 4x as the real VAE), a narrow posterior like a trained VAE's, and a scaling
        factor that gives the calibration clips' latents unit variance."""
        vae = diffusers.AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(8, 16, 16, 16, 16),
                                                    layers_per_block=1)
        vae.enable_slicing()
        with torch.no_grad():
            # A random encoder's log-variance is ~0: posterior samples would be mostly noise.
            vae.encoder.conv_out.conv.bias[vae.config.latent_channels:] -= 12.0
            raw = vae.encode(calibration_videos(frames=9, height=32, width=32)).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        return vae

    @property
    def byt5_len(self) -> int:
        return int(self.components.extra.get(BYT5_LEN_KEY, self.byt5_max_length))

    @property
    def vision_tokens(self) -> int:
        """Zero image tokens a t2v call passes: the pipelines' vision_num_semantic_tokens, or the
        tiny model's count."""
        return int(self.components.extra.get(VISION_TOKENS_KEY, self.vision_num_tokens))

    # --- encoding ---
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "prompt_embeds_mask": [B, L],
        "prompt_embeds_2": [B, L2, D2], "prompt_embeds_mask_2": [B, L2]} with L = :attr:`text_len`
        Qwen tokens after the system prompt and L2 byT5 tokens of the quoted text, through the
        pipeline's own helpers. Raises RuntimeError if the text encoders were released."""
        self.require("encode_prompts", "text_encoder", "text_encoder_2")
        c, pipe = self.components, diffusers.HunyuanVideo15Pipeline
        crop = c.extra.get(CROP_KEY)
        embeds, mask = pipe._get_mllm_prompt_embeds(
            c.text_encoder, c.tokenizer, list(prompts), c.text_encoder.device, tokenizer_max_length=self.text_len,
            **({} if crop is None else {"crop_start": crop}),
        )
        embeds_2, mask_2 = pipe._get_byt5_prompt_embeds(c.tokenizer_2, c.text_encoder_2, list(prompts),
                                                        c.text_encoder_2.device, tokenizer_max_length=self.byt5_len)
        # encode_prompt's last step: everything in the text encoder's dtype, masks included.
        dtype = c.text_encoder.dtype
        return {"prompt_embeds": embeds.to(dtype), "prompt_embeds_mask": mask.to(dtype),
                "prompt_embeds_2": embeds_2.to(dtype), "prompt_embeds_mask_2": mask_2.to(dtype)}

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v: {"condition": [B, C+1, f, h, w] (first-frame latent at frame 0, then the mask
        channel), "image_embeds": [B, N, D] (SigLIP)} from each clip's first frame, built by the I2V
        pipeline's own prepare_cond_latents_and_mask / encode_image on that frame as a PIL image,
        so training sees what inference feeds. t2v: nothing (predict passes the zeros the T2V
        pipeline passes)."""
        if self.task == "t2v":
            return {}
        self.require("encode_conditioning", "vae", "image_encoder")
        c = self.components
        b, _, _, height, width = videos.shape
        pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(
            text_encoder=None, tokenizer=None, transformer=None, vae=c.vae, scheduler=None, text_encoder_2=None,
            tokenizer_2=None, guider=None, image_encoder=c.image_encoder, feature_extractor=c.image_processor,
        )
        conditions, embeds = [], []
        for i in range(b):  # the pipeline conditions a batch on one image
            image = pil_image(videos[i, :, 0])
            cond, mask = pipe.prepare_cond_latents_and_mask(
                latents[i:i + 1].to(c.vae.device), image, 1, height, width, torch.float32, c.vae.device)
            conditions.append(torch.cat([cond, mask], dim=1))
            embeds.append(pipe.encode_image(image, 1, c.image_encoder.device, torch.float32))
        return {"condition": torch.cat(conditions), "image_embeds": torch.cat(embeds)}

    # --- training ---
    def training_sigmas(self, u: torch.Tensor, latent_shape: tuple[int, ...], logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> torch.Tensor:
        """train.py's lognorm sampler: t = sigmoid(N(logit_mean, logit_std)) squeezed into
        [eps, 1 - eps], then the training shift; through the inverse CDF of ``u`` [B] so it stays
        monotone in ``u``."""
        z = torch.distributions.Normal(0.0, 1.0).icdf(u.double().clamp(1e-7, 1 - 1e-7))
        t = torch.sigmoid(logit_mean + logit_std * z) * (1 - 2 * self.train_eps) + self.train_eps
        return self.shift_sigmas(t.float(), latent_shape)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """train.py's train_timestep_shift (3.0) at every size."""
        return self.train_timestep_shift

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond from
        :meth:`encode_prompts` (+ :meth:`encode_conditioning` for i2v) -> velocity [B, C, f, h, w]
        in the transformer's dtype, called as the pipelines' denoising loop calls it: noisy latents,
        conditioning latents and mask concatenated on the channel axis, zero conditioning and zero
        image tokens for t2v. HunyuanVideo-1.5 has no frame-rate input."""
        dtype = self.spec.dtype  # the pipelines' transformer.dtype; the transformer may be wrapped or quantised
        b, ch, f, h, w = noisy_latents.shape
        condition = cond.get("condition")
        if condition is None:
            condition = noisy_latents.new_zeros(b, ch + 1, f, h, w)
        image = cond.get("image_embeds")
        if image is None:
            image = noisy_latents.new_zeros(b, self.vision_tokens, self._image_embed_dim)
        hidden = torch.cat([noisy_latents, condition.to(noisy_latents)], dim=1).to(dtype)
        return transformer(
            hidden_states=hidden, image_embeds=image.to(dtype), timestep=timesteps.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["prompt_embeds_mask"].to(dtype),
            encoder_hidden_states_2=cond["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=cond["prompt_embeds_mask_2"].to(dtype), return_dict=False,
        )[0]

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's pipeline over the current components (the transformer with any LoRA in it),
        with a tiny build's shorter token counts. Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "text_encoder_2", "vae")
        parts = dict(text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer, vae=c.vae,
                     scheduler=c.scheduler, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                     guider=c.extra[GUIDER_KEY])
        if self.task == "i2v":
            parts.update(image_encoder=c.image_encoder, feature_extractor=c.image_processor)
        pipe = self.pipeline_class_for(self.task)(**parts)
        pipe.tokenizer_max_length = self.text_len
        pipe.tokenizer_2_max_length = self.byt5_len
        if CROP_KEY in c.extra:
            pipe.prompt_template_encode_start_idx = c.extra[CROP_KEY]
        pipe.vision_num_semantic_tokens = self.vision_tokens
        return pipe

    # --- LoRA interchange ---
    # --- checks ---
    def checkpoint_fix(self) -> str:
        return f"use a HunyuanVideo-1.5 checkpoint such as {self.model_id_for(self.task)}"

    def _check_checkpoint(self) -> None:
        """The class-level frame and size rules and the 2C+1 input-channel layout must match the
        loaded checkpoint."""
        super()._check_checkpoint()
        c = self.components
        if c.vae is None:
            return
        config, fix = c.transformer.config, self.checkpoint_fix()
        latent = c.vae.config.latent_channels
        if config.in_channels != 2 * latent + 1 or config.out_channels != latent:
            raise ValueError(
                f"{self.name}: {self.spec.display_id}'s transformer maps {config.in_channels} -> {config.out_channels} "
                f"channels, but HunyuanVideo-1.5 takes {2 * latent + 1} (noisy latents, conditioning latents, mask) "
                f"and predicts {latent}; {fix}"
            )
