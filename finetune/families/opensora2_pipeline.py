"""Open-Sora 2.0 inference on diffusers' DiffusionPipeline conventions: text-to-video and
image-to-video with :class:`~finetune.families.opensora2_model.OpenSora2Transformer3DModel`, the
HunyuanVideo VAE, T5-XXL and CLIP-L.

What the official sampler does (``scripts/diffusion/inference.py`` with
``configs/diffusion/inference/256px.py``; ``opensora/utils/sampling.py``: ``prepare_api``,
``get_schedule``, ``I2VDenoiser``; ``opensora/utils/inference.py``), and what this pipeline does:

- prompt: the official inference appends the frame rate and the motion score to every prompt
  (``add_fps_info_to_text``: a full stop, then " 24 FPS."; ``add_motion_score_to_text``: " 4
  motion score."), not to the empty negative prompt. ``fps`` and ``motion_score`` (None: leave
  out) do the same here: :func:`describe_prompt`.
- text: T5-XXL last hidden states of the prompt padded to 512 tokens, and the CLIP-L pooled output
  of it padded to 77, both without an attention mask (the official encoders get none).
- schedule: ``t = linspace(1, 0, steps + 1)`` shifted by ``alpha * t / (1 + (alpha - 1) t)`` with
  ``alpha = (1 + 2 (n - 256) / 3840) * sqrt(f)``, n the tokens of one latent frame and f the
  latent frames (:func:`resolution_shift`, also the training shift); Euler steps
  ``x <- x + (t_next - t) v``. Here: ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting
  and ``mu = log(alpha)``, which is the same map; the model gets t (not 1000 t).
- guidance: three branches, cond (prompt, image), uncond (negative, image) and uncond_2
  (negative, no image); ``v = u2 + g_img (u - u2) + g_text (c - u)``, defaults g_text 7.5,
  g_img 3.0. Oscillation (on by default): from step 10, every odd step uses 1.0 for both.
  Image-to-video scales the image guidance along time (``scale_temporal_osci``): frame weights
  ``linspace(1, g, f)`` with g falling from g_img to 1 over the steps. Text-to-video has no image,
  so u2 = u. Branches a step does not need (a guidance of 1) are not computed: the same result.
- image-to-video ("i2v_head"): the image, resized and centre-cropped, VAE-encoded alone (a
  posterior sample), is the condition of latent frame 0 (a mask channel and the latents,
  :func:`~finetune.families.opensora2_model.first_frame_condition`); every frame is denoised, and
  frame 0 is replaced by the image latent before decoding.
- latents: the VAE's posterior times ``scaling_factor`` (0.476986, no shift), noise N(0, 1).
- defaults: 50 steps, 129 frames, 192x336 (the official "256px" at 16:9).

Not reproduced: bf16 latents (here float32 between steps), the other conditioning modes of the
official sampler (i2v_tail, i2v_loop, v2v_*), the text-to-image-to-video route through Flux-dev,
prompt refinement with an LLM, and the high-compression Video DC-AE checkpoint.
"""

from __future__ import annotations

import math
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

from finetune.families.opensora2_model import OpenSora2Transformer3DModel, first_frame_condition

# The official sampler's defaults (configs/diffusion/inference/256px.py, sampling_option).
DEFAULT_STEPS, DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 50, 129, 192, 336
TEXT_GUIDANCE, IMAGE_GUIDANCE = 7.5, 3.0
DEFAULT_FPS, DEFAULT_MOTION_SCORE = 24, 4
# get_oscillation_gs: guidance is applied on every step before this one, then on even steps only.
OSCILLATION_START = 10
# get_res_lin_function: the shift is 1 at 256 tokens per frame and 3 at 4096, linear between.
SHIFT_TOKENS, SHIFT_VALUES = (256, 4096), (1.0, 3.0)
# The scheduler the pipeline steps with: Euler on sigmas shifted by exp(mu) (mu from resolution_shift).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, time_shift_type="exponential")


def resolution_shift(latent_frames: int, latent_height: int, latent_width: int, patch: int = 2) -> float:
    """The official shift ``alpha`` for latents of f x h x w (``get_schedule`` at inference, the same
    expression in training): linear in the tokens of one frame, times sqrt(f)."""
    tokens = latent_height * latent_width // (patch * patch)
    (x1, x2), (y1, y2) = SHIFT_TOKENS, SHIFT_VALUES
    return (y1 + (tokens - x1) * (y2 - y1) / (x2 - x1)) * math.sqrt(latent_frames)


def describe_prompt(prompt: str, fps: int | None = DEFAULT_FPS,
                    motion_score: int | str | None = DEFAULT_MOTION_SCORE) -> str:
    """The prompt as the official inference feeds it: ending in a full stop, then " {fps} FPS."
    (unless it already ends so) and " {motion_score} motion score."; None leaves a part out."""
    text = prompt.strip()
    if fps is not None:
        if not text.endswith("."):
            text += "."
        if not re.search(r"\d+ FPS\.$", text):
            text += f" {fps} FPS."
    if motion_score is not None:
        text += f" {motion_score} motion score."
    return text


def oscillated(scale: float, step: int) -> float:
    """The official guidance oscillation: ``scale`` before step 10 and on even steps, else 1."""
    return scale if step < OSCILLATION_START or step % 2 == 0 else 1.0


@dataclass
class OpenSora2PipelineOutput(BaseOutput):
    """frames: [B, F, 3, H, W] tensor ("pt"), [B, F, H, W, 3] array ("np"), PIL lists ("pil"),
    or latents [B, C, f, h, w] ("latent")."""

    frames: Any


class OpenSora2Pipeline(DiffusionPipeline, CogVideoXLoraLoaderMixin):
    """Text-to-video (no image) and image-to-video (``image``: the first frame) for Open-Sora 2.0.
    ``load_lora_weights`` (diffusers' transformer-only loader, model-agnostic) takes our adapter
    files."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(
        self,
        tokenizer: transformers.T5Tokenizer,
        text_encoder: transformers.T5EncoderModel,
        tokenizer_2: transformers.CLIPTokenizer,
        text_encoder_2: transformers.CLIPTextModel,
        vae: diffusers.AutoencoderKLHunyuanVideo,
        transformer: OpenSora2Transformer3DModel,
        scheduler: diffusers.FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                              text_encoder_2=text_encoder_2, vae=vae, transformer=transformer, scheduler=scheduler)
        self.vae_scale_factor_spatial = vae.spatial_compression_ratio if vae is not None else 8
        self.vae_scale_factor_temporal = vae.temporal_compression_ratio if vae is not None else 4
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # --- text ---
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt(s), as given (see :func:`describe_prompt`) -> (T5 states [B, L, 4096], L =
        max_sequence_length, and CLIP pooled [B, 768]), padded to the maximum length and encoded
        without an attention mask, as the official text embedders do."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                             return_tensors="pt").input_ids
        states = self.text_encoder(input_ids=ids.to(self.text_encoder.device)).last_hidden_state
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.tokenizer_2.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder_2(input_ids=clip_ids.to(self.text_encoder_2.device)).pooler_output
        return states.to(device), pooled.to(device)

    # --- image ---
    @torch.no_grad()
    def encode_image(self, image: Any, height: int, width: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """image (PIL, array or tensor; a list for a batch) -> latents [B, C, 1, h, w]: resized to
        cover height x width and centre-cropped (the official "resize_crop"), VAE-encoded alone,
        a posterior sample times the scaling factor."""
        pixels = self.video_processor.preprocess(image, height=height, width=width, resize_mode="crop")[:, :, None]
        vae = self.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return (posterior.sample(generator) * vae.config.scaling_factor).float()

    # --- call ---
    def check_inputs(self, height: int, width: int, num_frames: int) -> None:
        """Raise ValueError for a size the VAE and 2x2 patches cannot take, or a bad frame count."""
        factor = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        if height % factor or width % factor:
            raise ValueError(f"opensora2 pipeline: height={height} and width={width} must be multiples of {factor}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"opensora2 pipeline: num_frames={num_frames} must be {self.vae_scale_factor_temporal}k+1")

    def _guidance(self, step: int, steps: int, frames: int, text: float, image: float | None, oscillate: bool,
                  temporal: bool) -> tuple[float, float | torch.Tensor]:
        """(text scale, image scale: a float or per-frame weights [1, 1, f, 1, 1]) of ``step``."""
        g_text = oscillated(text, step) if oscillate else text
        if image is None:
            return g_text, 1.0
        g_img = oscillated(image, step) if oscillate else image
        if temporal and g_img > 1.0:
            upper = torch.linspace(g_img, 1.0, steps + 1)[step].item()
            return g_text, torch.linspace(1.0, upper, frames).view(1, 1, -1, 1, 1)
        return g_text, g_img

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        height: int = DEFAULT_HEIGHT,
        width: int = DEFAULT_WIDTH,
        num_frames: int = DEFAULT_FRAMES,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = TEXT_GUIDANCE,
        image_guidance_scale: float = IMAGE_GUIDANCE,
        guidance_oscillation: bool = True,
        temporal_image_guidance: bool = True,
        fps: int | None = DEFAULT_FPS,
        motion_score: int | str | None = DEFAULT_MOTION_SCORE,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> OpenSora2PipelineOutput | tuple:
        """Render ``num_frames`` frames; with ``image``, image-to-video from that first frame.

        ``fps`` / ``motion_score``: what the prompt says (:func:`describe_prompt`). ``guidance_scale``
        / ``image_guidance_scale``: text and image guidance (module docstring);
        ``guidance_oscillation`` and ``temporal_image_guidance`` switch the official schedules of
        them. ``latents`` [B, C, f, h, w] replaces the initial noise.
        Raises ValueError for bad sizes or frame counts."""
        self.check_inputs(height, width, num_frames)
        device = self._execution_device
        prompts = [describe_prompt(p, fps, motion_score) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        batch = len(prompts)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
        dtype = self.transformer.dtype
        text, pooled = self.encode_prompt(prompts, max_sequence_length, device)
        neg_text, neg_pooled = self.encode_prompt(negatives, max_sequence_length, device)

        shape = (batch, self.transformer.config.out_channels, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        first = None if image is None else self.encode_image(image, height, width, generator).to(device)
        condition = None if first is None else first_frame_condition(first.expand(batch, -1, -1, -1, -1), shape[2])

        alpha = resolution_shift(shape[2], shape[3], shape[4], self.transformer.config.patch_size)
        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].numpy()
        self.scheduler.set_timesteps(sigmas=sigmas, mu=math.log(alpha), device=device)
        image_scale = image_guidance_scale if condition is not None else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            g_text, g_img = self._guidance(i, num_inference_steps, shape[2], guidance_scale, image_scale,
                                           guidance_oscillation, temporal_image_guidance)
            sigma = self.scheduler.sigmas[i].expand(batch)
            pred = self._velocity(latents, sigma, (text, pooled), (neg_text, neg_pooled), condition, g_text, g_img,
                                  dtype, attention_kwargs)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]

        if first is not None:  # the official sampler puts the image latent back before decoding
            latents[:, :, :1] = first.to(latents)
        if output_type == "latent":
            frames = latents
        else:
            vae = self.vae
            decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
            frames = self.video_processor.postprocess_video(decoded[:, :, :num_frames], output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return OpenSora2PipelineOutput(frames=frames)

    def _velocity(self, latents: torch.Tensor, sigma: torch.Tensor, positive: tuple[torch.Tensor, torch.Tensor],
                  negative: tuple[torch.Tensor, torch.Tensor], condition: torch.Tensor | None, g_text: float,
                  g_img: float | torch.Tensor, dtype: torch.dtype,
                  attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """One guided velocity [B, C, f, h, w] float32: the branches the scales need, in one batch."""
        image_guided = condition is not None and (torch.is_tensor(g_img) or g_img != 1.0)
        branches = [(positive, condition)]
        if g_text != 1.0 or image_guided:
            branches.append((negative, condition))
        if image_guided:
            branches.append((negative, None if condition is None else torch.zeros_like(condition)))
        n = len(branches)
        conds = [c for _, c in branches]
        out = self.transformer(
            hidden_states=latents.repeat(n, 1, 1, 1, 1).to(dtype), timestep=sigma.repeat(n),
            encoder_hidden_states=torch.cat([t for (t, _), _ in branches]).to(dtype),
            pooled_projections=torch.cat([p for (_, p), _ in branches]).to(dtype),
            condition=None if condition is None else torch.cat(conds).to(dtype),
            return_dict=False, attention_kwargs=attention_kwargs,
        )[0].float().chunk(n)
        if n == 1:
            return out[0]
        cond, uncond = out[0], out[1]
        if n == 2:
            return uncond + g_text * (cond - uncond)
        uncond_image = out[2]
        g_img = g_img.to(cond) if torch.is_tensor(g_img) else g_img
        return uncond_image + g_img * (uncond - uncond_image) + g_text * (cond - uncond)
