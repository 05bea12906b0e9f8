"""Open-Sora 2.0 (hpcaitech, Apache-2.0, 11B): text-to-video and image-to-video with one
transformer, behind the family protocol.

Latent space: the HunyuanVideo VAE (the official ``hunyuan_vae`` module is diffusers'
``AutoencoderKLHunyuanVideo``: the same module names and outputs), 16 channels, 8x spatial and 4x
temporal compression, posterior samples times ``scaling_factor`` 0.476986 (no shift), as the
official ``encode`` does in training and inference. Text: T5-v1.1-XXL last hidden states of the
prompt padded to 512 tokens and the CLIP-L pooled output, both encoded without an attention mask.
Transformer: :class:`~finetune.families.opensora2_model.OpenSora2Transformer3DModel` (2x2 patches).
Inference: :class:`~finetune.families.opensora2_pipeline.OpenSora2Pipeline`.

Training as the official trainer (``scripts/diffusion/train.py``, ``opensora/utils/train.py``):
  noise levels  t = sigmoid(N(0, 1)) (``optim.logit_mean`` / ``logit_std``, 0 and 1 by default),
                then the resolution shift ``alpha * t / (1 + (alpha - 1) t)`` of
                :func:`~finetune.families.opensora2_pipeline.resolution_shift`.
  input         x_t = (1 - t) x0 + (1 - (1 - sigma_min) (1 - t)) noise, sigma_min = 1e-5; the
                model gets t itself (it embeds 1000 t).
  target        (1 - sigma_min) noise - x0; mean squared error over every latent.
  i2v           "i2v_head" of the official condition_config: the first frame, VAE-encoded on its
                own (a posterior sample), enters through the condition channels (a mask and the
                latents on latent frame 0); the clip is noised everywhere and every frame counts
                in the loss (the official ``no_i2v_ref_loss`` is off). t2v: an all-zero condition.
  prompts       the caption as the official inference feeds prompts (:func:`describe_prompt`:
                " 24 FPS. 4 motion score." appended), the family's frame rate and motion score
                in training and rendering alike, so an adapter learns what it is later asked.

Checkpoints: the official repo layout (hpcai-tech/Open-Sora-v2: ``Open_Sora_v2.safetensors`` and
``hunyuan_vae.safetensors`` in official key names, with no config, and ``google/t5-v1_1-xxl/``,
``openai/clip-vit-large-patch14/``; the configs are inferred from the tensor shapes) and the
diffusers layout our pipeline's ``save_pretrained`` writes both load. The official transformer
is read tensor by tensor, so fp8 quantises while loading; bitsandbytes (int8/nf4) cannot quantise
the official file while reading it, so it is first converted once into a diffusers folder under
``$FINETUNE_CACHE`` (default ``~/.cache/finetune``)/opensora2/.

Attention masks: none at any batch size. As in the official model, T5 encodes the padded prompt
without a mask and the transformer attends all 512 text tokens, padding included (dropping them
would change the released model's outputs); no mask is built or passed anywhere.

Not covered: the high-compression checkpoint (hpcai-tech/Open-Sora-v2-Video-DC-AE: patch 1 on
Open-Sora's own Video DC-AE, 32x spatial, 128 channels), whose autoencoder has no diffusers
class; loading it is a named error.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.errors import UserError
from finetune.families import register
from finetune.families._encoders import CLIP_L_TEXT, T5_XXL
from finetune.families._loading import cache_root, check_quantization, load_transformer
from finetune.families._tiny import (
    calibration_videos,
    refill_zero_params,
    tiny_clip_tokenizer,
    tiny_t5_encoder_config,
    tiny_t5_tokenizer,
)
from finetune.families.base import TEXT_LEN_KEY, Components, Family, FrameRule, FullSize, ModelSpec, Noised
from finetune.families.opensora2_model import (
    KEY_MAP,
    OPEN_SORA_V2_CONFIG,
    OpenSora2Transformer3DModel,
    first_frame_condition,
    official_config,
)
from finetune.families.opensora2_pipeline import (
    DEFAULT_MOTION_SCORE,
    SCHEDULER_CONFIG,
    OpenSora2Pipeline,
    describe_prompt,
    resolution_shift,
)
from finetune.lora_formats import KeyMap

# The official repo layout (the inference configs' ./ckpts paths after
# ``huggingface-cli download hpcai-tech/Open-Sora-v2 --local-dir ./ckpts``).
OFFICIAL_TRANSFORMER, OFFICIAL_VAE = "Open_Sora_v2.safetensors", "hunyuan_vae.safetensors"
OFFICIAL_T5, OFFICIAL_CLIP = "google/t5-v1_1-xxl", "openai/clip-vit-large-patch14"
# official training: x_t = (1 - t) x0 + (1 - (1 - SIGMA_MIN)(1 - t)) noise
SIGMA_MIN = 1e-5


@register
class OpenSora2Family(Family):
    name = "opensora2"
    frame_rule = FrameRule(4)
    spatial_factor = 16  # Hunyuan VAE 8 x patch 2
    # Double-stream blocks: both streams' q/k/v/out and MLPs; single-stream blocks: q/k/v, the MLP
    # input and the joint output projection (proj_out, which also names the final projection).
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                            "proj_mlp", "proj_out")
    # One checkpoint and one pipeline serve both tasks ("Both T2V and I2V are supported by one model").
    default_model_id = "hpcai-tech/Open-Sora-v2"
    pipeline_class = OpenSora2Pipeline
    tasks = ("t2v", "i2v")
    # The release trains at up to 24 fps (dataset fps_max) and renders at 24 (fps_save).
    default_fps = 24
    native_frames = 129
    # T5 tokens per prompt (the official text embedder's max_length).
    max_sequence_length: ClassVar[int] = 512

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once here, unwrapped: predict() gets the transformer maybe wrapped by DDP/PEFT.
        self._patch = int(components.transformer.config.patch_size)
        self._check_checkpoint()

    # --- loading ---
    @classmethod
    def is_official_layout(cls, spec: ModelSpec) -> bool:
        """Whether ``spec.pretrained`` is the official repo layout (no ``model_index.json``)."""
        local = Path(spec.pretrained)
        if local.is_dir():
            return not (local / "model_index.json").is_file()
        from huggingface_hub import file_exists

        return not file_exists(spec.pretrained, "model_index.json", revision=spec.revision)

    @staticmethod
    def official_file(spec: ModelSpec, name: str) -> Path:
        """A file of the official layout: in the local folder, or fetched from the hub."""
        local = Path(spec.pretrained)
        if local.is_dir():
            if not (local / name).is_file():
                raise UserError(f"opensora2: {local} has no {name}; the official layout (hpcai-tech/Open-Sora-v2) "
                                f"has {OFFICIAL_TRANSFORMER} and {OFFICIAL_VAE} at its top")
            return local / name
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec.pretrained, name, revision=spec.revision))

    @classmethod
    def load_official_transformer(cls, spec: ModelSpec) -> OpenSora2Transformer3DModel:
        """The official ``Open_Sora_v2.safetensors`` in ``spec.dtype``, read tensor by tensor (fp8
        while loading for ``model.quantization=fp8``); for int8/nf4 converted once to a diffusers
        folder in the cache, which bitsandbytes quantises while loading."""
        path = cls.official_file(spec, OFFICIAL_TRANSFORMER)
        config = official_config(path)
        if spec.quantization in ("none", "fp8"):
            return OpenSora2Transformer3DModel.from_official(path, spec.dtype, fp8=spec.quantization == "fp8",
                                                             config=config)
        digest = hashlib.sha256(f"{spec.pretrained}@{spec.revision}:{spec.dtype}".encode()).hexdigest()[:16]
        folder = cache_root("opensora2") / digest
        if not (folder / "config.json").is_file():
            OpenSora2Transformer3DModel.from_official(path, spec.dtype, config=config).save_pretrained(str(folder))
        return load_transformer(OpenSora2Transformer3DModel, replace(spec, pretrained=str(folder), revision=None),
                                subfolder=None)

    @classmethod
    def load_official_vae(cls, spec: ModelSpec) -> diffusers.AutoencoderKLHunyuanVideo:
        """``hunyuan_vae.safetensors`` (official keys are diffusers' AutoencoderKLHunyuanVideo's) in
        ``spec.dtype``, read tensor by tensor into the config its shapes give."""
        from accelerate import init_empty_weights
        from safetensors import safe_open

        from finetune.weights.fp8 import fill

        path = cls.official_file(spec, OFFICIAL_VAE)
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        with init_empty_weights(include_buffers=False):
            vae = diffusers.AutoencoderKLHunyuanVideo.from_config(hunyuan_vae_config(shapes))

        def tensors():
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

        fill(vae, tensors(), spec.dtype, set(), what=str(path))
        return vae.eval()

    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """Every component from the official repo layout or a diffusers-saved folder (module
        docstring). Raises ValueError / QuantizationUnavailable for a bad ``model.quantization``
        before touching any file."""
        check_quantization(spec)
        src = dict(pretrained_model_name_or_path=spec.pretrained, revision=spec.revision)
        if cls.is_official_layout(spec):
            transformer = cls.load_official_transformer(spec)
            vae = cls.load_official_vae(spec)
            t5, clip = OFFICIAL_T5, OFFICIAL_CLIP
            tok_t5, tok_clip = OFFICIAL_T5, OFFICIAL_CLIP
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        else:
            transformer = load_transformer(OpenSora2Transformer3DModel, spec)
            vae = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(**src, subfolder="vae", torch_dtype=spec.dtype)
            t5, clip, tok_t5, tok_clip = "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(**src, subfolder="scheduler")
        text_encoder = transformers.T5EncoderModel.from_pretrained(**src, subfolder=t5, dtype=spec.dtype)
        # The official T5 tokenizer is built with legacy=True.
        tokenizer = transformers.AutoTokenizer.from_pretrained(**src, subfolder=tok_t5, legacy=True)
        text_encoder_2 = transformers.CLIPTextModel.from_pretrained(**src, subfolder=clip, dtype=spec.dtype)
        tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(**src, subfolder=tok_clip)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, text_encoder_2=text_encoder_2,
                          tokenizer_2=tokenizer_2)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Open-Sora 2.0 11B: the released transformer config (configs/diffusion/inference/256px.py,
        read from the official repo this session), AutoencoderKLHunyuanVideo's defaults (the
        official hunyuan_vae config: 128/256/512/512 channels, 2 layers per block, 16 latent
        channels, scaling 0.476986), T5-v1.1-XXL's encoder and CLIP ViT-L/14's text model (their
        well-known configs, not re-read from the hub). One checkpoint for both tasks."""
        return {cls.default_model_id: {
            "transformer": FullSize(OpenSora2Transformer3DModel, dict(OPEN_SORA_V2_CONFIG),
                                  block_keys=("depth", "depth_single_blocks")),
            "vae": FullSize(diffusers.AutoencoderKLHunyuanVideo, {}),
            "text_encoder": FullSize(transformers.T5EncoderModel, T5_XXL),
            "text_encoder_2": FullSize(transformers.CLIPTextModel, CLIP_L_TEXT)}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 16, f, h, w] (8x spatial, 4x temporal), T5 states [1, L, 4096] and the CLIP
        pooled [1, 768]; i2v adds the first frame's latents [1, 16, 1, h, w]."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        cond = {"prompt_embeds": ((1, text_len, 4096), torch.bfloat16),
                "pooled_prompt_embeds": ((1, 768), torch.bfloat16)}
        if task == "i2v":
            cond["cond_latents"] = ((1, 16, 1, h, w), torch.bfloat16)
        return (1, 16, f, h, w), cond

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model, one build for both tasks: 2 double- and 2 single-stream
        blocks (4 heads x 32, rotary axes 4/14/14 as the release's 16/56/56 scaled), T5 and CLIP
        text models of width 32 with character tokenizers, a HunyuanVideo VAE of 32 channels that
        keeps the real 8x/4x compression and 16 latent channels, with a narrow posterior like a
        trained VAE's and a scaling factor giving unit-variance latents; the real scheduler config."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_t5_tokenizer(model_max_length=text_len)
        text_encoder = transformers.T5EncoderModel(tiny_t5_encoder_config(transformers.T5Config, tokenizer))
        tokenizer_2 = tiny_clip_tokenizer()
        text_encoder_2 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        ))
        transformer = OpenSora2Transformer3DModel(
            in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=4, depth=2,
            depth_single_blocks=2, axes_dim=[4, 14, 14],
        )
        refill_zero_params(transformer)
        return Components(transformer, cls.tiny_vae(), text_encoder, tokenizer,
                          diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), extra={TEXT_LEN_KEY: text_len},
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @staticmethod
    def tiny_vae() -> diffusers.AutoencoderKLHunyuanVideo:
        """32 channels in 4 blocks (8x spatial, 4x temporal), 16 latent channels, 32 norm groups
        (the release's, which the official layout's loader assumes)."""
        vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
        with torch.no_grad():
            # A random encoder's log-variance is ~0, so posterior samples would be mostly noise; the
            # moments leave through quant_conv, so lower the log-variance half there.
            vae.quant_conv.bias[vae.config.latent_channels:] -= 12.0
            raw = vae.encode(calibration_videos(frames=9, height=32, width=32)).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        return vae

    # --- encoding ---
    def _pipe(self, **parts: Any) -> OpenSora2Pipeline:
        c = self.components
        kw = dict(tokenizer=c.tokenizer, text_encoder=c.text_encoder, tokenizer_2=c.tokenizer_2,
                  text_encoder_2=c.text_encoder_2, vae=c.vae, transformer=c.transformer, scheduler=c.scheduler)
        kw.update(parts)
        return OpenSora2Pipeline(**kw)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": T5 states [B, L, D], "pooled_prompt_embeds":
        CLIP pooled [B, P]}, L = :attr:`text_len`, each caption as the pipeline describes a prompt
        (the family's frame rate and motion score appended; module docstring) and encoded by its
        own encode_prompt. Raises RuntimeError if the text encoders were released."""
        self.require("encode_prompts", "text_encoder", "text_encoder_2")
        pipe = self._pipe(vae=None, transformer=None, scheduler=None)
        described = [describe_prompt(p, self.default_fps, DEFAULT_MOTION_SCORE) for p in prompts]
        embeds, pooled = pipe.encode_prompt(described, self.text_len, device=self.components.text_encoder.device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 16 -> latents
        [B, 16, (F-1)/4+1, H/8, W/8]: a posterior sample (with ``generator``) times the VAE's
        scaling_factor, as the official encode. Raises ValueError for a bad shape, RuntimeError if
        the VAE was released."""
        return self.scaled_latents(videos, generator).float()

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor,
                            captions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """i2v: {"cond_latents": [B, 16, 1, h, w]}, each clip's first frame VAE-encoded on its own
        (the official trainer encodes it apart "to prevent information leakage": the VAE's group
        norms span the clip, so it differs from the clip's first latent frame), a posterior sample
        seeded by the clip's own latents, so a cached clip always gets the same one. t2v: nothing."""
        if self.task != "i2v":
            return {}
        self.require("encode_conditioning", "vae")
        vae = self.components.vae
        out = []
        for i in range(videos.shape[0]):
            seed = zlib.crc32(latents[i].float().cpu().numpy().tobytes())
            gen = torch.Generator(device=vae.device).manual_seed(seed)
            frame = videos[i:i + 1, :, :1].to(device=vae.device, dtype=vae.dtype)
            out.append(vae.encode(frame).latent_dist.sample(gen) * vae.config.scaling_factor)
        return {"cond_latents": torch.cat(out).float()}

    # --- training ---
    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The official resolution shift for latents [B, C, f, h, w]: linear in the tokens of a
        frame (1 at 256, 3 at 4096), times sqrt(f)."""
        _, _, f, h, w = latent_shape
        return resolution_shift(f, h, w, self._patch)

    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                               cond: dict[str, torch.Tensor] | None = None) -> Noised:
        """The official rectified flow with sigma_min (module docstring): every latent noised and
        in the loss, i2v too; timesteps are t itself."""
        t = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1 - t) * latents + (1 - (1 - SIGMA_MIN) * (1 - t)) * noise
        return Noised(noisy, (1 - SIGMA_MIN) * noise - latents, sigmas)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, 16, f, h, w], timesteps [B] = t in [0, 1], cond["prompt_embeds"]
        [B, L, D], ["pooled_prompt_embeds"] [B, P] (+ ["cond_latents"] [B, 16, 1, h, w] for i2v)
        -> velocity [B, 16, f, h, w], called as the pipeline calls the transformer (the i2v
        condition built by :func:`first_frame_condition`). No frame-rate input (the prompt says it)."""
        dtype = self.spec.dtype
        condition = None
        if "cond_latents" in cond:
            condition = first_frame_condition(cond["cond_latents"].to(noisy_latents), noisy_latents.shape[2])
        return transformer(
            hidden_states=noisy_latents.to(dtype), timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            condition=None if condition is None else condition.to(dtype), return_dict=False,
        )[0]

    # --- inference ---
    def pipeline(self) -> OpenSora2Pipeline:
        """The Open-Sora 2.0 pipeline over the current components (the transformer with any LoRA in
        it); one pipeline renders both tasks. Raises RuntimeError if the encoders were released."""
        self.require("pipeline()", "text_encoder", "text_encoder_2", "vae")
        return self._pipe()

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The training prompt length; the frame rate and motion score the captions were trained
        with (the family's, whatever ``fps`` the clip is written at); the first frame for i2v."""
        out: dict[str, Any] = {"max_sequence_length": self.text_len, "fps": self.default_fps,
                               "motion_score": DEFAULT_MOTION_SCORE}
        if image is not None:
            out["image"] = image
        return out

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Official Open-Sora 2.0 names (``double_blocks.{i}.img_attn.q_proj``,
        ``single_blocks.{i}.v_mlp`` fusing to_v and proj_mlp, ``final_layer.adaLN_modulation.1``
        with its halves swapped, ...): the key map of opensora2_model."""
        return KEY_MAP

    # --- checks ---
    def _check_checkpoint(self) -> None:
        """The class rules (16x space, 4x time, 16 channels) and the task's image condition must
        fit the loaded checkpoint: the Video DC-AE model (32x, 128 channels, patch 1) would
        silently break them, and a transformer without ``cond_embed`` cannot do i2v."""
        c = self.components
        config = c.transformer.config
        if self.task == "i2v" and not config.cond_embed:
            raise ValueError(f"opensora2: {self.spec.display_id} has no image-condition input (cond_embed=False), "
                             f"so it cannot train model.task=i2v; use {self.default_model_id}")
        if c.vae is None:
            return
        if c.vae.config.latent_channels != config.out_channels:
            raise ValueError(f"opensora2: {self.spec.display_id} pairs a {c.vae.config.latent_channels}-channel VAE "
                             f"with a transformer for {config.out_channels} channels; use {self.default_model_id}")
        self.check_compression(c.vae.spatial_compression_ratio * self._patch, c.vae.temporal_compression_ratio,
                               f"use {self.default_model_id} (the high-compression Video DC-AE model is not supported)")


def hunyuan_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """AutoencoderKLHunyuanVideo config of an official ``hunyuan_vae.safetensors`` from its tensor
    shapes: channels per block, layers per block, latent channels and the mid-block attention; the
    norm groups (32) and the compression (8x, 4x) are the official defaults, not in the weights.
    Raises UserError for a file that is no Hunyuan VAE."""
    blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    if not blocks or "post_quant_conv.weight" not in shapes:
        raise UserError("opensora2: the VAE file is not a HunyuanVideo VAE (no encoder.down_blocks / post_quant_conv); "
                        "the Video DC-AE of the high-compression model is not supported")
    channels = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in blocks]
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    return dict(block_out_channels=channels, layers_per_block=layers,
                latent_channels=shapes["post_quant_conv.weight"][0],
                mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in shapes))
