"""LongCat-Video inference on diffusers' DiffusionPipeline conventions: T2V, I2V and video
continuation with :class:`~finetune.families.longcat_model.LongCatVideoTransformer3DModel`,
the Wan 2.1 VAE and umT5.

What the official sampler does (``longcat_video/pipeline_longcat_video.py``, generate_t2v /
generate_i2v / generate_vc), and what this pipeline reproduces:

- scheduler: ``FlowMatchEulerDiscreteScheduler`` (the official repo ships a copy of diffusers'
  class; ``scheduler/scheduler_config.json`` holds its config, including ``shift``). Sigmas are
  ``linspace(1, 0.001, steps)`` passed explicitly to ``set_timesteps``, which applies the static
  shift ``s' = shift * s / (1 + (shift - 1) * s)``; timesteps are ``1000 * s'``. Defaults: 50
  steps, 93 frames, 480x832, guidance 4.0, prompts padded to 512 umT5 tokens with a mask.
- model output is ``x0 - noise``; it is negated before ``scheduler.step`` (Euler:
  ``x <- x + (s_next - s) * (noise - x0)``).
- CFG: batch [negative, positive] (negative "" when none is given), combined with the CFG-Zero*
  rescale: ``st = <v_pos, v_neg> / |v_neg|^2`` per sample, ``v = st * v_neg + g * (v_pos - st *
  v_neg)``; off when guidance_scale <= 1.
- latents are normalised per channel with the VAE's ``latents_mean`` / ``latents_std``.
- I2V: the image, VAE-encoded as a 1-frame clip (a posterior sample), replaces latent frame 0;
  that frame gets timestep 0, ``num_cond_latents=1`` and is never stepped by the scheduler.
- continuation: the last ``num_cond_frames`` frames of the given video (4k+1 of them) are
  encoded to ``1 + (num_cond_frames - 1) // 4`` clean latent frames that lead the clip; same
  timestep-0 / not-stepped rule. The output video contains the conditioning frames (decoded).

Not reproduced: the official continuation caches the clean frames' keys and values once
(exact, since clean tokens never attend to noisy ones; the transformer tests check that
property) -- here they are recomputed each step; its optional ``enhance_hf`` tail (10 uniform
steps below t=500), the distilled 16-step schedule (needs the cfg-distill LoRA), the 720p
refinement stage (block-sparse attention, ``t_thresh``) and resolution buckets.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from finetune.families.longcat_model import (
    OFFICIAL_LORA_SEP,
    LongCatVideoTransformer3DModel,
    frame_timesteps,
    official_lora_to_peft,
)

# The official sigma grid before the scheduler's shift: 1 down to 0.001 (not to 0).
SIGMA_MAX, SIGMA_MIN = 1.0, 0.001


@dataclass
class LongCatVideoPipelineOutput(BaseOutput):
    """frames: [B, F, 3, H, W] tensor ("pt"), [B, F, H, W, 3] array ("np"), PIL lists ("pil"),
    or latents [B, C, f, h, w] ("latent")."""

    frames: Any


def clean_prompt(text: str) -> str:
    """The official prompt cleaning: ftfy repair when available, HTML unescape, one space."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unchanged without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG with the CFG-Zero* rescale of the unconditional branch, per sample (any shape [B, ...])."""
    c, u = cond.flatten(1), uncond.flatten(1)
    st = ((c * u).sum(1, keepdim=True) / ((u * u).sum(1, keepdim=True) + 1e-8)).view(-1, *[1] * (cond.ndim - 1))
    return uncond * st + guidance_scale * (cond - uncond * st)


class LongCatVideoLoraLoaderMixin(CogVideoXLoraLoaderMixin):
    """``load_lora_weights`` / ``fuse_lora`` / ``save_lora_weights`` for the transformer.
    diffusers' CogVideoX mixin is transformer-only and model-agnostic (``transformer.``-prefixed
    peft keys with their adapter metadata), which is the format our trainer writes; on top,
    files in the official LongCat LoRA format (the released cfg-distill / refinement LoRAs) are
    converted on load."""

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        out = super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        state, metadata = out if kwargs.get("return_lora_metadata") else (out, None)
        if any(OFFICIAL_LORA_SEP in k for k in state):
            # alpha_scale is folded into lora_B, so the adapter loads with alpha == rank
            state, metadata = {f"transformer.{k}": v for k, v in official_lora_to_peft(state).items()}, None
        return (state, metadata) if kwargs.get("return_lora_metadata") else state


class LongCatVideoPipeline(DiffusionPipeline, LongCatVideoLoraLoaderMixin):
    """T2V (no image, no video), I2V (``image``) and continuation (``video``) for LongCat-Video."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        text_encoder: transformers.UMT5EncoderModel,
        vae: diffusers.AutoencoderKLWan,
        transformer: LongCatVideoTransformer3DModel,
        scheduler: diffusers.FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # --- text ---
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt(s) -> (umT5 states [B, L, C], mask [B, L] int64), L = max_sequence_length."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_sequence_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        states = self.text_encoder(ids, mask).last_hidden_state
        return states, mask

    # --- latents ---
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(like)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(like)
        return mean, std

    @torch.no_grad()
    def encode_condition(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """pixels [B, 3, Fc, H, W] in [-1, 1] (Fc = 4k+1) -> normalised latents [B, C, 1 + k, h, w],
        a posterior sample as in the official pipeline."""
        vae = self.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std).float()

    def _conditioning(self, image: Any, video: Any, num_cond_frames: int | None, height: int, width: int,
                      generator: torch.Generator | None) -> torch.Tensor | None:
        """The clean leading latents for I2V / continuation, or None for T2V."""
        if image is not None and video is not None:
            raise ValueError("longcat pipeline: pass image (I2V) or video (continuation), not both")
        if image is not None:
            pixels = self.video_processor.preprocess(image, height=height, width=width)[:, :, None]
            return self.encode_condition(pixels, generator)
        if video is None:
            return None
        pixels = self.video_processor.preprocess_video(video, height=height, width=width)  # [B, 3, F, H, W]
        n = pixels.shape[2] if num_cond_frames is None else num_cond_frames
        if n < 1 or n > pixels.shape[2] or (n - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"longcat pipeline: num_cond_frames={n} must be {self.vae_scale_factor_temporal}k+1 and "
                             f"at most the {pixels.shape[2]} frames given")
        return self.encode_condition(pixels[:, :, -n:], generator)

    # --- call ---
    def check_inputs(self, height: int, width: int, num_frames: int) -> None:
        """Raise ValueError for a size the VAE and 2x2 patches cannot take, or a bad frame count."""
        factor = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % factor or width % factor:
            raise ValueError(f"longcat pipeline: height={height} and width={width} must be multiples of {factor}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"longcat pipeline: num_frames={num_frames} must be {self.vae_scale_factor_temporal}k+1")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        video: Any = None,
        num_cond_frames: int | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 93,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> LongCatVideoPipelineOutput | tuple:
        """Render a clip of ``num_frames`` frames (conditioning frames included).

        ``image``: PIL/array/tensor for I2V (the first frame). ``video``: frames to continue
        (list of PIL or [F, 3, H, W] / batched tensors); its last ``num_cond_frames`` (default:
        all, 4k+1) frames lead the clip. ``latents`` [B, C, f, h, w] replaces the initial noise.
        Raises ValueError for bad sizes, frame counts, or both image and video."""
        self.check_inputs(height, width, num_frames)
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0
        dtype = self.transformer.dtype

        embeds, mask = self.encode_prompt(prompts, max_sequence_length, device)
        if do_cfg:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
            neg_embeds, neg_mask = self.encode_prompt(negatives, max_sequence_length, device)
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        embeds = embeds.to(dtype)

        # torch's float32 linspace, as the official pipeline builds it (numpy's differs in the last bit).
        sigmas = torch.linspace(SIGMA_MAX, SIGMA_MIN, num_inference_steps).numpy()
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)

        shape = (batch, self.transformer.config.in_channels, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32).clone()
        cond = self._conditioning(image, video, num_cond_frames, height, width, generator)
        k = 0 if cond is None else cond.shape[2]
        if k:
            if k >= latents.shape[2]:
                raise ValueError(f"longcat pipeline: {k} conditioning latent frames leave nothing to generate in "
                                 f"{latents.shape[2]}; raise num_frames")
            latents[:, :, :k] = cond.to(latents)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            timestep = frame_timesteps(t.expand(model_in.shape[0]), latents.shape[2], k)
            pred = self.transformer(model_in.to(dtype), timestep, embeds, mask, num_cond_latents=k,
                                    return_dict=False, attention_kwargs=attention_kwargs)[0].float()
            if do_cfg:
                uncond, cond_pred = pred.chunk(2)
                pred = cfg_zero_star(cond_pred, uncond, guidance_scale)
            # The model predicts x0 - noise; the scheduler steps along noise - x0.
            latents[:, :, k:] = self.scheduler.step(-pred[:, :, k:], t, latents[:, :, k:], return_dict=False)[0]

        if output_type == "latent":
            frames = latents
        else:
            mean, std = self._latent_stats(latents)
            decoded = self.vae.decode((latents * std + mean).to(self.vae.dtype), return_dict=False)[0]
            frames = self.video_processor.postprocess_video(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return LongCatVideoPipelineOutput(frames=frames)
