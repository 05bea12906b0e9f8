"""HunyuanVideo (13B) text-to-video and image-to-video behind the family protocol, diffusers format.

Latent space: AutoencoderKLHunyuanVideo, 16 channels, 8x spatial and 4x temporal compression,
scaled by ``scaling_factor`` (no mean shift). Transformer: HunyuanVideoTransformer3DModel
(dual-stream then single-stream blocks, (1, 2, 2) patches), conditioned on

  - the hidden states of a Llama-3 LLM (layer -3) over the prompt wrapped in a chat template,
    with the template tokens cropped off and an attention mask,
  - the pooled CLIP-L text embedding,
  - an embedded guidance strength (the models are guidance-distilled): 1000 * g.

Image-to-video (HunyuanVideoImageToVideoPipeline, ``image_condition_type="token_replace"``): the
first latent frame is the clean latent of the image (its tokens are modulated with timestep 0
inside the transformer) and is left out of the loss; the text encoder is a Llava model that reads
the image and the prompt together, so the prompt embeddings of a clip depend on its first frame
and are built with the caption at cache time (:meth:`encode_conditioning`).

Training follows the community trainers for HunyuanVideo (the official training code is not
released): rectified flow with target noise - x_0 (diffusion-pipe models/hunyuan_video.py,
musubi-tuner hv_train_network.py), logit-normal sigmas shifted by the checkpoint's flow shift
(7.0: musubi-tuner's documented HunyuanVideo setting and the scheduler config), embedded
guidance 1.0 (diffusion-pipe's default; musubi-tuner's guidance_scale default is 1.0 too).

Attention masks: diffusers gives the blocks a [B, 1, 1, S] key mask (the prompt padding; small,
no fully masked row, but SDPA cannot use flash with it) and the token refiner a [B, 1, L, L] one
in which every row also sees token 0 (never fully masked). The family's processors
(``_attention.py``) cut each sample's padding instead, so no mask reaches SDPA; same outputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video as t2v_module
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video_image2video as i2v_module
from PIL import Image

from finetune.families import register
from finetune.families._attention import PadFreeJointProcessor
from finetune.families._encoders import CLIP_L_336_VISION, CLIP_L_TEXT, LLAMA3_8B
from finetune.families._hunyuan import FINAL_PAIRS, SHARED_PAIRS, HunyuanVideoBase
from finetune.families._loading import from_subfolders, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    refill_zero_params,
    tiny_clip_text,
    tiny_llama3_tokenizer,
)
from finetune.families.base import TEXT_LEN_KEY, Components, FullSize, ModelSpec
from finetune.lora_formats import KeyMap, fused
from finetune.video import pil_image

# Mirrors scheduler/scheduler_config.json of hunyuanvideo-community/HunyuanVideo: Euler with flow shift 7.
_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=7.0, use_dynamic_shifting=False, base_image_seq_len=256,
                         max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
# components.extra key of the prompt template fitted to a tiny tokenizer (real checkpoints use the pipelines')
TEMPLATE_KEY = "prompt_template"
# Chat-template pieces that are single tokens in the Llama-3 vocabulary.
_TEMPLATE_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "assistant")
# What the I2V pipeline conditions on: the image latents replace the first frame's tokens.
_I2V_KIND = "token_replace"




def fit_template(template: dict[str, Any], tokenizer: Any, image_tokens: int | None = None) -> dict[str, Any]:
    """``template`` (a pipeline's DEFAULT_PROMPT_TEMPLATE) with its token offsets measured for
    ``tokenizer``: ``crop_start`` = the tokens before the prompt (``<image>`` counted once), and
    for i2v where ``<image>`` sits and how many tokens (``image_tokens``) the vision tower puts
    there. The real checkpoints' values are the pipelines' defaults; tiny tokenizers need their own."""
    prefix = template["template"].split("{}")[0]
    ids = tokenizer(prefix)["input_ids"]
    out = {"template": template["template"], "crop_start": len(ids)}
    if image_tokens is not None:
        start = ids.index(tokenizer.convert_tokens_to_ids("<image>"))
        out.update(image_emb_start=start, image_emb_end=start + image_tokens, image_emb_len=image_tokens)
    return out


def llava_image_tokens(text_encoder: transformers.LlavaForConditionalGeneration) -> int:
    """Tokens the Llava vision tower puts in place of ``<image>`` (patches, CLS dropped)."""
    vision = text_encoder.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


# diffusers module name -> name in the original checkpoint (Tencent/HunyuanVideo, hyvideo/modules/
# models.py, token_refiner.py, embed_layers.py; also ComfyUI's HunyuanVideo model and musubi-tuner),
# the inverse of diffusers' scripts/convert_hunyuan_video_to_diffusers.py and of its LoRA converter
# _convert_hunyuan_video_lora_to_diffusers. The original fuses q, k, v (img_attn_qkv, txt_attn_qkv,
# the refiner's self_attn_qkv) and the single blocks' q, k, v and mlp input (linear1, 1:1:1:4 at
# mlp_ratio 4); its final adaLN stores shift before scale, diffusers scale before shift.
KEY_MAP = KeyMap((
    fused([f"transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv"], "double_blocks.{i}.img_attn_qkv"),
    fused([f"transformer_blocks.{{i}}.attn.add_{p}_proj" for p in "qkv"], "double_blocks.{i}.txt_attn_qkv"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn_proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn_proj"),
    *SHARED_PAIRS,  # double-block modulation and MLPs, token refiner, text embedders (_hunyuan.py)
    fused([*(f"single_transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv"), "single_transformer_blocks.{i}.proj_mlp"],
          "single_blocks.{i}.linear1", sizes=(1, 1, 1, 4)),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.linear"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("x_embedder.proj", "img_in.proj"),
    *FINAL_PAIRS,
))


@register
class HunyuanVideoFamily(HunyuanVideoBase):
    name = "hunyuanvideo"
    # Dual-stream blocks: both streams' attention and MLPs; single-stream blocks: q/k/v, the MLP
    # input (proj_mlp) and the joint attention+MLP output (proj_out, which also names the final
    # projection). The token refiner's attention and MLP share the to_q/ff names.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                            "proj_mlp", "proj_out")
    default_model_id = "hunyuanvideo-community/HunyuanVideo"
    pipeline_class = diffusers.HunyuanVideoPipeline
    tasks = ("t2v", "i2v")
    task_model_ids: ClassVar[dict[str, str]] = {"i2v": "hunyuanvideo-community/HunyuanVideo-I2V"}
    task_pipeline_classes: ClassVar[dict[str, type]] = {"i2v": diffusers.HunyuanVideoImageToVideoPipeline}
    default_fps = 24  # HunyuanVideo is trained on and generates 24 fps video (model card, pipeline docs)
    native_frames = 129
    # Llama tokens per prompt (after the template is cropped): the pipelines' default.
    max_sequence_length: ClassVar[int] = 256
    # Embedded guidance strength during training (module docstring); the pipeline multiplies by 1000 too.
    train_guidance: ClassVar[float] = 1.0
    # Every 4th image token kept in the I2V prompt: the pipeline's default for token_replace.
    image_embed_interleave: ClassVar[int] = 4
    key_map = KEY_MAP

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once here, unwrapped: predict() gets the transformer maybe wrapped by DDP/PEFT.
        self._guidance_embeds = bool(components.transformer.config.guidance_embeds)

    @staticmethod
    def set_block_processors(transformer: torch.nn.Module) -> None:
        """diffusers gives the dual- and single-stream blocks a [B, 1, 1, S] key mask that only marks
        the prompt padding (small, no fully masked row, but no flash kernel with it): each runs
        through :class:`PadFreeJointProcessor` instead."""
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            if not isinstance(block.attn.processor, PadFreeJointProcessor):
                block.attn.set_processor(PadFreeJointProcessor(block.attn.processor))

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """The diffusers layout; i2v reads prompts with a Llava (its image processor beside it), t2v
        with a Llama. The HunyuanVideo docs load the VAE in float16/bfloat16 with the rest: the
        spec's dtype for every part."""
        transformer = load_transformer(diffusers.HunyuanVideoTransformer3DModel, spec)
        i2v = spec.task == "i2v"
        parts = from_subfolders(
            spec, vae=diffusers.AutoencoderKLHunyuanVideo, tokenizer=transformers.AutoTokenizer,
            text_encoder_2=transformers.CLIPTextModel, tokenizer_2=transformers.CLIPTokenizer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler,
            text_encoder=transformers.LlavaForConditionalGeneration if i2v else transformers.LlamaModel,
            **({"image_processor": transformers.CLIPImageProcessor} if i2v else {}))
        extra: dict[str, Any] = {}
        if i2v:
            default, tokens = i2v_module.DEFAULT_PROMPT_TEMPLATE, llava_image_tokens(parts["text_encoder"])
            if tokens != default["image_emb_len"]:  # not the real vision tower
                extra[TEMPLATE_KEY] = fit_template(default, parts["tokenizer"], tokens)
        return Components(transformer, extra=extra, **parts)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """HunyuanVideo 13B: HunyuanVideoTransformer3DModel (20 dual-stream + 40 single-stream
        blocks, 24 heads x 128), AutoencoderKLHunyuanVideo, Llama-3-8B (I2V: llava-llama-3-8b with
        its CLIP ViT-L/14-336 tower) and CLIP ViT-L/14 text. The class defaults are the community
        diffusers repos' configs; I2V adds token_replace. Not re-read from the hub this session
        (the I2V repo's guidance_embeds is assumed true)."""
        transformer = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                           num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                           patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                           pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=[16, 56, 56])
        text_encoder = FullSize(transformers.LlamaModel, LLAMA3_8B)
        if task == "i2v":
            transformer["image_condition_type"] = _I2V_KIND
            text_encoder = FullSize(transformers.LlavaForConditionalGeneration, dict(
                text_config=LLAMA3_8B, vision_config=CLIP_L_336_VISION, image_token_index=128257,
                projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2))
        return {cls.model_id_for(task): {
            "transformer": FullSize(diffusers.HunyuanVideoTransformer3DModel, transformer),
            "vae": FullSize(diffusers.AutoencoderKLHunyuanVideo, {}),
            "text_encoder": text_encoder,
            "text_encoder_2": FullSize(transformers.CLIPTextModel, CLIP_L_TEXT)}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 16, f, h, w] (8x spatial, 4x temporal), Llama states [1, L, 4096] with their
        mask (I2V: plus the first frame's 576 image tokens pooled 4 to 1) and the pooled CLIP
        embedding [1, 768]; I2V adds the clean first latent frame."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        length = text_len + (576 // cls.image_embed_interleave if task == "i2v" else 0)
        cond = {"prompt_embeds": ((1, length, 4096), torch.bfloat16),
                "prompt_attention_mask": ((1, length), torch.bfloat16),
                "pooled_prompt_embeds": ((1, 768), torch.bfloat16)}
        if task == "i2v":
            cond["first_latent"] = ((1, 16, 1, h, w), torch.bfloat16)
        return (1, 16, f, h, w), cond

    @classmethod
    def fit_random_parts(cls, components: Components) -> None:
        """i2v: the prompt template's image-token span measured for the full-size vision tower."""
        super().fit_random_parts(components)
        if isinstance(components.text_encoder, transformers.LlavaForConditionalGeneration):
            components.extra[TEMPLATE_KEY] = fit_template(i2v_module.DEFAULT_PROMPT_TEMPLATE, components.tokenizer,
                                                          llava_image_tokens(components.text_encoder))

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2 dual- and 2 single-stream blocks (4 heads x 32),
        1 refiner block, a VAE with 32 channels per block that keeps the real 8x spatial / 4x
        temporal compression and 16 latent channels (its scaling factor measured on calibration
        clips), a 3-layer Llama (d 32) with a byte-level Llama-3-style tokenizer, a 1-layer CLIP
        text model (d 32) with a CLIP tokenizer, the real scheduler config; for i2v a Llava with a
        2-layer CLIP vision tower on 32 px images and the token_replace transformer."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_llama3_tokenizer(model_max_length=4096, special_tokens=_TEMPLATE_TOKENS)
        llama = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        extra: dict[str, Any] = {TEXT_LEN_KEY: text_len}
        image_processor = None
        if task == "i2v":
            vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8)
            text_encoder = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
                vision_config=vision, text_config=llama, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
                image_seq_length=(32 // 8) ** 2, pad_token_id=tokenizer.pad_token_id,
            ))
            image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32})
            extra[TEMPLATE_KEY] = fit_template(i2v_module.DEFAULT_PROMPT_TEMPLATE, tokenizer,
                                               llava_image_tokens(text_encoder))
        else:
            text_encoder = transformers.LlamaModel(llama)
            extra[TEMPLATE_KEY] = fit_template(t2v_module.DEFAULT_PROMPT_TEMPLATE, tokenizer)
        tokenizer_2, text_encoder_2 = tiny_clip_text()
        vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                                  norm_num_groups=8, mid_block_add_attention=False)
        # The shipped scaling_factor fits the real VAE; measure the tiny one's on posterior
        # samples (what encode_videos uses) so that scaled latents have unit variance.
        with torch.no_grad():
            raw = vae.encode(calibration_videos(frames=9, height=32, width=32)).latent_dist.sample()
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        transformer = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
            pooled_projection_dim=32, rope_axes_dim=(8, 12, 12), guidance_embeds=True,
            image_condition_type=_I2V_KIND if task == "i2v" else None,
        )
        refill_zero_params(transformer)  # the refiner's norm biases start at zero
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, extra=extra,
                          image_processor=image_processor, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    # --- encoding ---
    def prompt_template(self) -> dict[str, Any]:
        """The chat template the task's pipeline wraps prompts in (fitted to tiny tokenizers)."""
        default = i2v_module.DEFAULT_PROMPT_TEMPLATE if self.task == "i2v" else t2v_module.DEFAULT_PROMPT_TEMPLATE
        return self.components.extra.get(TEMPLATE_KEY, default)

    def _text_pipe(self, with_vae: bool = False) -> diffusers.DiffusionPipeline:
        c = self.components
        parts = dict(text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=None,
                     vae=c.vae if with_vae else None, scheduler=None, text_encoder_2=c.text_encoder_2,
                     tokenizer_2=c.tokenizer_2)
        if self.task == "i2v":
            parts["image_processor"] = c.image_processor
        return self.pipeline_class_for(self.task)(**parts)

    def _encode(self, pipe: diffusers.DiffusionPipeline, prompts: list[str], image: Any = None) -> dict[str, torch.Tensor]:
        device = self.components.text_encoder.device
        kw = dict(prompt=list(prompts), prompt_template=self.prompt_template(), device=device,
                  max_sequence_length=self.text_len)
        if self.task == "i2v":
            kw.update(image=image, image_embed_interleave=self.image_embed_interleave)
        embeds, pooled, mask = pipe.encode_prompt(**kw)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, D2],
        "prompt_attention_mask": [B, L]} by the task pipeline's own encode_prompt (template,
        cropping, layer -3, CLIP pooled output). L = :attr:`text_len` for t2v. For i2v the Llava
        reads a black image here, as the I2V pipeline encodes prompts that come without one; a
        clip's own embeddings (its first frame and caption together) come from
        :meth:`encode_conditioning` and replace these. Raises RuntimeError if released."""
        self.require("encode_prompts", "text_encoder", "text_encoder_2")
        pipe = self._text_pipe()
        if self.task == "i2v":
            black = Image.new("RGB", (64, 64), 0)
            outs = [self._encode(pipe, [p], black) for p in prompts]  # the pipeline encodes one image per call
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return self._encode(pipe, prompts)

    def conditioning_uses_captions(self) -> bool:
        """i2v: the Llava text encoder reads the first frame and the caption together."""
        return self.task == "i2v"

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor,
                            captions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """i2v: {"first_latent": [B, 16, 1, h, w]} the image latent the I2V pipeline's own
        ``prepare_latents`` makes from the first frame (posterior mode x scaling_factor), and with
        ``captions`` the prompt embeddings of each caption read together with its first frame
        (``prompt_embeds`` [B, L', D], ``prompt_attention_mask``, ``pooled_prompt_embeds``), which
        replace the caption's image-less ones. t2v: nothing."""
        if self.task == "t2v":
            return {}
        self.require("encode_conditioning", "vae")
        vae = self.components.vae
        b, _, frames, height, width = videos.shape
        pipe = self._text_pipe(with_vae=True)
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(b):  # the pipeline conditions a batch on one image
            image = videos[i:i + 1, :, 0].to(vae.device, vae.dtype)
            _, first = pipe.prepare_latents(image, 1, latents.shape[1], height, width, frames, torch.float32,
                                            vae.device, None, latents[i:i + 1].float(), _I2V_KIND)
            parts.setdefault("first_latent", []).append(first)
            if captions is not None:
                self.require("encode_conditioning", "text_encoder", "text_encoder_2")
                for k, v in self._encode(pipe, [captions[i]], pil_image(videos[i, :, 0])).items():
                    parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}

    # --- training ---
    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The checkpoint's flow shift (scheduler config: 7.0 for HunyuanVideo, musubi-tuner's
        documented training shift), whatever the latent size."""
        return float(self.components.scheduler.config.shift)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, 16, f, h, w] (the clean first frame in place for i2v), timesteps [B]
        in [0, 1000], cond as from :meth:`encode_prompts` / :meth:`encode_conditioning` -> velocity
        [B, 16, f, h, w] in the transformer's dtype, called as the pipelines' denoising loops call
        it, with embedded guidance :attr:`train_guidance`. HunyuanVideo has no frame-rate input."""
        # The pipelines cast the text tensors and guidance to the transformer dtype; read it from
        # the spec, since the transformer may be wrapped (DDP, PEFT) or quantised.
        dtype = self.spec.dtype
        b = noisy_latents.shape[0]
        guidance = None
        if self._guidance_embeds:
            guidance = torch.full((b,), self.train_guidance, device=noisy_latents.device, dtype=dtype) * 1000.0
        return transformer(
            hidden_states=noisy_latents.to(dtype), timestep=timesteps.to(noisy_latents.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["prompt_attention_mask"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype), guidance=guidance, return_dict=False,
        )[0]

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's HunyuanVideo pipeline over the current components (the transformer with any
        LoRA in it). Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "text_encoder_2", "vae")
        parts = dict(text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer, vae=c.vae,
                     scheduler=c.scheduler, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
        if self.task == "i2v":
            parts["image_processor"] = c.image_processor
        return self.pipeline_class_for(self.task)(**parts)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The training prompt length and template, and the first frame for i2v."""
        kwargs = super().pipeline_call_kwargs(fps, image)
        if TEMPLATE_KEY in self.components.extra:
            kwargs["prompt_template"] = self.components.extra[TEMPLATE_KEY]
        return kwargs

    # --- LoRA interchange ---
    # --- checks ---
    def _check_checkpoint(self) -> None:
        """The class-level frame and size rules, and the task's conditioning, must match the
        loaded checkpoint (a HunyuanVideo 1.5 or I2V-33ch folder, say, would break them)."""
        c = self.components
        config = c.transformer.config
        kind = config.image_condition_type
        want = _I2V_KIND if self.task == "i2v" else None
        if kind != want:
            task_of = {None: "t2v", _I2V_KIND: "i2v"}.get(kind)
            fix = (f"set model.task={task_of}" if task_of else
                   f"image_condition_type={kind!r} (HunyuanVideo-I2V-33ch) is not supported")
            raise ValueError(
                f"hunyuanvideo: {self.spec.display_id} has image_condition_type={kind!r}, but model.task={self.task} "
                f"needs {want!r}; {fix}, or use a checkpoint such as {self.model_id_for(self.task)}")
        super()._check_checkpoint()

    def checkpoint_fix(self) -> str:
        return f"use a HunyuanVideo checkpoint such as {self.model_id_for(self.task)}"
