"""What the CogVideoX families (1.0: 2B/5B, 1.5: 5B; t2v and i2v) share: the T5 text path, the
VAE's scaling factor, the v-prediction objective on the DDPM schedule, the i2v conditioning the
diffusers CogVideoX pipelines build, and tiny random builds of each part. ``cogvideox.py`` and
``cogvideox15.py`` subclass :class:`CogVideoXBase` with their facts.

Training objective (not flow matching). CogVideoX is a v-prediction model on a 1000-step DDPM
schedule (scaled-linear betas, zero terminal SNR, an SNR shift per model; the scheduler's
``alphas_cumprod`` carry all of it). The official fine-tuning (THUDM/CogVideo
``finetune/models/cogvideox_t2v|i2v/lora_trainer.py``, and diffusers'
``examples/cogvideo/train_cogvideox_lora.py``) samples the timestep uniformly from
{0, ..., 999}, builds x_t with ``scheduler.add_noise`` (sqrt(abar) x0 + sqrt(1 - abar) eps), turns
the model's v output into an x0 estimate with ``scheduler.get_velocity(v, x_t, t)``
(sqrt(abar) x_t - sqrt(1 - abar) v) and takes the mean of (x0_hat - x0)^2 / (1 - abar).

Since x0_hat - x0 = -sqrt(1 - abar) (v_hat - v), that weighted x0 loss is exactly the plain MSE
between the model output and v = sqrt(abar) eps - sqrt(1 - abar) x0 (the diffusers
``get_velocity(x0, eps, t)`` target). So the family returns v as the target and the trainer's
unweighted masked MSE reproduces the official loss, with no weights that blow up near t = 0.

Noise levels: the trainer's sigma in [0, 1] maps to the DDPM index t = floor(1000 sigma)
(clamped to 999); :meth:`CogVideoXBase.training_sigmas` draws sigma uniformly, so t is uniform as
in the official training. There is no flow shift (:meth:`CogVideoXBase.timestep_shift` is 1).

Image-to-video (CogVideoXImageToVideoPipeline): every latent frame is noised; the transformer
also sees, concatenated on the channel axis, the VAE latents of the first frame followed by
zeros (``cond["image_latents"]`` [B, 16, f', h, w], in_channels 32). CogVideoX 1.5 adds an
``ofs`` embedding (2.0, as the pipeline passes it) and, having 2-frame temporal patches, pads an
odd latent frame count by one frame in front, which the pipeline discards after denoising.

Frames: 4k+1, the VAE's rule; the pipelines take any such count (1.5 padding as above). The
official fine-tuning asks for 8N+1 (49, 81), which the shipped recipes use.

Attention masks: none; the 226 T5 tokens are attended with their padding, as the released models
were trained.
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffusers
import torch
import transformers

from finetune.families._encoders import T5_XXL
from finetune.families._loading import load_transformer
from finetune.families._tiny import calibration_videos, refill_zero_params, tiny_t5_encoder_config, tiny_t5_tokenizer
from finetune.families.base import TEXT_LEN_KEY, Components, Family, FrameRule, FullSize, ModelSpec, Noised
from finetune.lora_formats import KeyMap, fused

# scheduler/scheduler_config.json of the THUDM/CogVideoX repos (2B: snr_shift_scale 3.0; 5B, 5B-I2V and
# 1.5: 1.0). The families read the schedule from the loaded scheduler; the tiny builds use these.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)
# Full-size transformer configs of the released checkpoints (their transformer/config.json), for
# the memory planner; the VAE is AutoencoderKLCogVideoX's defaults (the released VAE, 16 latent
# channels, 8x spatial, 4x temporal) and the text encoder T5-XXL (v1.1). From the model cards'
# configs as diffusers' conversion script writes them; not re-read from the hub this session.
COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                    flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30,
                    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                    activation_fn="gelu-approximate", norm_elementwise_affine=True, norm_eps=1e-5,
                    spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                    use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False)
COGVIDEOX_5B = {**COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
COGVIDEOX_5B_I2V = {**COGVIDEOX_5B, "in_channels": 32, "use_learned_positional_embeddings": True}
COGVIDEOX15_5B = {**COGVIDEOX_5B, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300,
                  "sample_frames": 81}
COGVIDEOX15_5B_I2V = {**COGVIDEOX15_5B, "in_channels": 32, "ofs_embed_dim": 512}


def cogvideox_full_size(transformer: dict) -> dict[str, FullSize]:
    """One CogVideoX checkpoint: ``transformer``, the CogVideoX VAE and T5-XXL."""
    return {"transformer": FullSize(diffusers.CogVideoXTransformer3DModel, transformer),
            "vae": FullSize(diffusers.AutoencoderKLCogVideoX, {}),
            "text_encoder": FullSize(transformers.T5EncoderModel, T5_XXL)}


# The constant ofs value CogVideoXImageToVideoPipeline gives 1.5 I2V (and the official trainer trains with).
OFS = 2.0


# diffusers module name -> name in the original SAT checkpoint (THUDM/CogVideo sat/dit_video_concat.py,
# keys under model.diffusion_model.), the inverse of diffusers' scripts/convert_cogvideox_to_diffusers.py;
# the same for 1.0 and 1.5. SAT fuses q, k, v (query_key_value) and keeps both adaLN modulations of a
# block in one Linear of 12 chunks: norm1's chunks 0-2 and 3-5 at 0-2 and 6-8, norm2's at 3-5 and 9-11.
_ADALN_PIECES = (*((0, k) for k in range(3)), *((1, k) for k in range(3)),
                 *((0, k) for k in range(3, 6)), *((1, k) for k in range(3, 6)))
KEY_MAP = KeyMap((
    fused([f"transformer_blocks.{{i}}.attn1.to_{p}" for p in "qkv"],
          "transformer.layers.{i}.attention.query_key_value"),
    ("transformer_blocks.{i}.attn1.to_out.0", "transformer.layers.{i}.attention.dense"),
    ("transformer_blocks.{i}.ff.net.0.proj", "transformer.layers.{i}.mlp.dense_h_to_4h"),
    ("transformer_blocks.{i}.ff.net.2", "transformer.layers.{i}.mlp.dense_4h_to_h"),
    fused(("transformer_blocks.{i}.norm1.linear", "transformer_blocks.{i}.norm2.linear"),
          "mixins.adaln_layer.adaLN_modulations.{i}.1", chunks=6, pieces=_ADALN_PIECES),
    ("patch_embed.proj", "mixins.patch_embed.proj"),
    ("patch_embed.text_proj", "mixins.patch_embed.text_proj"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("ofs_embedding.linear_1", "ofs_embed.0"),  # CogVideoX 1.5 I2V
    ("ofs_embedding.linear_2", "ofs_embed.2"),
    ("norm_out.linear", "mixins.final_layer.adaLN_modulation.1"),
    ("proj_out", "mixins.final_layer.linear"),
))


class CogVideoXBase(Family):
    """Shared CogVideoX machinery; subclasses set the class facts and build their tiny models."""

    frame_rule = FrameRule(4)  # the VAE keeps the first frame and compresses the rest 4 to 1
    spatial_factor = 16  # VAE 8 x transformer patch 2
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    pipeline_class = diffusers.CogVideoXPipeline
    tasks = ("t2v", "i2v")
    task_pipeline_classes: ClassVar[dict[str, type]] = {"i2v": diffusers.CogVideoXImageToVideoPipeline}
    # T5 tokens per prompt: the transformers' max_text_seq_length and the pipelines' default.
    max_sequence_length: ClassVar[int] = 226
    # transformer.config.patch_size_t of the checkpoints this family takes (None: 1.0, 2: 1.5)
    patch_size_t: ClassVar[int | None] = None
    # what the wrong-checkpoint error suggests for the other generation: (family, checkpoint)
    other_generation: ClassVar[tuple[str, str]]

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        # Read once, unwrapped: predict() may get the transformer wrapped by DDP/PEFT.
        config, vae = components.transformer.config, components.vae
        self._patch, self._patch_t = int(config.patch_size), config.patch_size_t
        # the VAE's spatial factor as the pipelines compute it
        self._vae_spatial = 2 ** (len(vae.config.block_out_channels) - 1) if vae else self.spatial_factor // self._patch
        self._check_checkpoint()

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 16, f, h, w] (8x spatial, 4x temporal), T5 states [1, L, 4096]; i2v adds the
        image latents over the frames the transformer sees (1.5 pads f to its 2-frame patches)."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 8, width // 8
        cond = {"prompt_embeds": ((1, text_len, 4096), torch.bfloat16)}
        if task == "i2v":
            padded = f + ((-f) % cls.patch_size_t if cls.patch_size_t else 0)
            cond["image_latents"] = ((1, 16, padded, h, w), torch.bfloat16)
        return (1, 16, f, h, w), cond

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        """The diffusers repo layout; every part in ``spec.dtype`` as the CogVideoX docs load the
        pipeline (bf16 for 5B and 1.5, fp16 for 2B), the transformer quantised if asked."""
        src = dict(pretrained_model_name_or_path=spec.pretrained, revision=spec.revision)
        transformer = load_transformer(diffusers.CogVideoXTransformer3DModel, spec)
        vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(**src, subfolder="vae", torch_dtype=spec.dtype)
        text_encoder = transformers.T5EncoderModel.from_pretrained(**src, subfolder="text_encoder", dtype=spec.dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")
        # The repos ship CogVideoXDDIMScheduler; the DPM variant the 5B docs suggest for sampling has
        # the same training schedule (alphas_cumprod), so one class serves both.
        scheduler = diffusers.CogVideoXDDIMScheduler.from_pretrained(**src, subfolder="scheduler")
        return Components(transformer, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def tiny_text(cls) -> tuple[transformers.T5Tokenizer, transformers.T5EncoderModel, dict]:
        """Character tokenizer, 1-layer T5 (v1.1-style) with d_model 32, and the tiny prompt length."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_t5_tokenizer(model_max_length=text_len)
        encoder = transformers.T5EncoderModel(tiny_t5_encoder_config(transformers.T5Config, tokenizer))
        return tokenizer, encoder, {TEXT_LEN_KEY: text_len}

    @staticmethod
    @torch.no_grad()
    def tiny_vae(size: int = 32, **kw: Any) -> diffusers.AutoencoderKLCogVideoX:
        """4 blocks of 8 channels (8x spatial, 4x temporal as the real VAE), 16 latent channels,
        calibrated on smooth random clips: the encoder's output bias centres the posterior means
        per channel and gives them a small posterior std, and ``scaling_factor`` makes the scaled
        latents unit-variance, as the shipped factor does for the real VAE."""
        vae = diffusers.AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, sample_height=size, sample_width=size, **kw,
        )
        conv = vae.encoder.conv_out.conv
        raw = vae.encode(calibration_videos(frames=9, height=size, width=size)).latent_dist.mean
        mean = raw.mean(dim=(0, 2, 3, 4))
        conv.bias[:16] -= mean  # centred posterior means
        conv.bias[16:] -= 8.0  # log-variance about -8: posterior std ~0.02 of a unit-scale latent
        std = (raw - mean.view(1, -1, 1, 1, 1)).std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        # Its tile size follows sample_height (half of it: 16 px here), too small for the encoder's
        # convolutions once a frame is split; 64 px tiles keep memory.vae_tiling=on working.
        vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64)
        vae.disable_tiling()
        return vae

    @classmethod
    def tiny_transformer(cls, in_channels: int, text_len: int, **kw: Any) -> diffusers.CogVideoXTransformer3DModel:
        """2 layers, 4 heads x 32 (inner 128: wide enough for a LoRA to fit a clip), T5 d 32."""
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=in_channels, out_channels=16,
            time_embed_dim=64, text_embed_dim=32, num_layers=2, max_text_seq_length=text_len,
            patch_size=2, patch_size_t=cls.patch_size_t, **kw,
        )
        refill_zero_params(model)
        # The learned position table (5B-I2V) is built in float64; checkpoints store it in the weights' dtype.
        return model.float()

    # --- encoding ---
    def _text_pipe(self) -> diffusers.CogVideoXPipeline:
        c = self.components
        return diffusers.CogVideoXPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=None,
                                           transformer=None, scheduler=None)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D]} with L = :attr:`text_len`: T5 states
        of the prompt padded to L, pad positions included, as the pipelines feed them.
        Raises RuntimeError if the text encoder was released."""
        self.require("encode_prompts", "text_encoder")
        embeds, _ = self._text_pipe().encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                    max_sequence_length=self.text_len)
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 16 -> latents
        [B, 16, k+1, H/8, W/8]: a posterior sample (drawn with ``generator``) times the VAE's
        scaling_factor, as the official trainer encodes and the pipelines decode (1 / factor).
        Raises ValueError for a bad shape, RuntimeError if the VAE was released."""
        vae = self.components.vae
        self.require("encode_videos", "vae")
        self.check_videos(videos)
        latents = vae.encode(videos.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generator)
        return latents * vae.config.scaling_factor

    def padded_latent_frames(self, frames: int) -> tuple[int, int]:
        """(latent frames, padding frames) the pipelines use for ``frames`` video frames: 1.5's
        2-frame temporal patches need an even count, so an odd one gets a frame in front."""
        latent = (frames - 1) // self.frame_rule.temporal_factor + 1
        return latent, ((-latent) % self._patch_t if self._patch_t else 0)

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v: {"image_latents": [B, 16, f + pad, h, w]}, the first frame's latents then zeros,
        made by CogVideoXImageToVideoPipeline.prepare_latents for the padded frame count its
        __call__ uses (posterior sample from a fixed seed; 1.5 I2V's inverted scaling included).
        t2v: nothing."""
        if self.task == "t2v":
            return {}
        self.require("encode_conditioning", "vae")
        c, vae = self.components, self.components.vae
        b, _, frames, height, width = videos.shape
        _, pad = self.padded_latent_frames(frames)
        pipe = diffusers.CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                                       transformer=c.transformer, scheduler=c.scheduler)
        padded_frames = frames + pad * self.frame_rule.temporal_factor
        out = []
        for i in range(b):  # one image per call, as the pipeline conditions a batch on one image
            image = videos[i:i + 1, :, 0].to(vae.device, vae.dtype)
            gen = torch.Generator(vae.device).manual_seed(0)
            dummy = torch.zeros(1, device=vae.device)  # keeps prepare_latents from drawing noise
            _, image_latents = pipe.prepare_latents(image, 1, latents.shape[1], padded_frames, height, width,
                                                    torch.float32, vae.device, gen, dummy)
            out.append(image_latents.permute(0, 2, 1, 3, 4))  # [1, F, C, h, w] -> [1, C, F, h, w]
        return {"image_latents": torch.cat(out)}

    # --- training ---
    def training_sigmas(self, u: torch.Tensor, latent_shape: tuple[int, ...], logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> torch.Tensor:
        """Uniform noise levels, sigma = u, so the DDPM index t = floor(1000 sigma) is uniform over
        {0, ..., 999} as in the official training (torch.randint over num_train_timesteps). The
        logit-normal settings of flow-matching families do not apply and are ignored."""
        return u.float().clamp(0.0, 1.0)

    def ddpm_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """sigmas [B] in [0, 1] -> DDPM indices [B] (long) in [0, num_train_timesteps - 1]."""
        n = self.components.scheduler.config.num_train_timesteps
        # The small offset keeps float32 sigmas such as 0.3 (0.29999998) on their intended index.
        return (sigmas.double() * n + 1e-3).floor().long().clamp(0, n - 1)

    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                               cond: dict[str, torch.Tensor] | None = None) -> Noised:
        """DDPM noising at t = :meth:`ddpm_timesteps` (sigmas), v-prediction target (module
        docstring): noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target = sqrt(abar_t) eps -
        sqrt(1 - abar_t) x0, both from the scheduler's own add_noise / get_velocity. Every
        position counts (i2v conditions by channel concat, not on clean frames).
        latents, noise: [B, C, f, h, w]; sigmas: [B]."""
        scheduler = self.components.scheduler
        t = self.ddpm_timesteps(sigmas).to(latents.device)
        # In fp32 (the schedulers cast abar to the sample dtype): bf16 latents would round sqrt(abar).
        x0, eps = latents.float(), noise.float()
        noisy = scheduler.add_noise(x0, eps, t).to(latents.dtype)
        target = scheduler.get_velocity(x0, eps, t).to(latents.dtype)
        return Noised(noisy, target, t)

    def rotary_embeddings(self, frames: int, height: int, width: int, device: torch.device) -> Any:
        """The pipeline's own rotary embeddings for a latent grid (None for sin-cos models: 2B)."""
        if not self.components.transformer.config.use_rotary_positional_embeddings:
            return None
        pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                                           transformer=self.components.transformer, scheduler=None)
        pipe.vae_scale_factor_spatial = self._vae_spatial
        return pipe._prepare_rotary_positional_embeddings(height * self._vae_spatial, width * self._vae_spatial,
                                                          frames, device)

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float) -> torch.Tensor:
        """noisy_latents [B, C, f, h, w], timesteps [B] (DDPM indices), cond["prompt_embeds"]
        [B, L, D] (+ i2v "image_latents") -> v prediction [B, C, f, h, w] in the transformer's
        dtype, called as the pipelines' denoising loop calls it: frames-first latents in the
        model dtype, image latents concatenated on channels, rotary embeddings for the grid,
        ofs = 2 for 1.5 I2V. For 1.5, an odd latent frame count gets the pipelines' extra frame in
        front (here a copy of the first noisy frame, the official trainer's first-frame copy) and
        its output is dropped, as the pipelines drop it. CogVideoX has no frame-rate input."""
        dtype = self.spec.dtype  # from the spec: the transformer may be wrapped or quantised
        b, _, frames, height, width = noisy_latents.shape
        pad = (-frames) % self._patch_t if self._patch_t else 0
        hidden = noisy_latents
        if pad:
            hidden = torch.cat([hidden[:, :, :1].expand(-1, -1, pad, -1, -1), hidden], dim=2)
        if "image_latents" in cond:
            image = cond["image_latents"].to(hidden)
            if image.shape[2] != hidden.shape[2]:
                raise ValueError(f"{self.name}: image_latents have {image.shape[2]} frames, the (padded) latents "
                                 f"{hidden.shape[2]}; re-encode the conditioning for this clip length")
            hidden = torch.cat([hidden, image], dim=1)
        config = self.components.transformer.config
        ofs = hidden.new_full((1,), OFS, dtype=dtype) if config.ofs_embed_dim is not None else None
        out = transformer(
            hidden_states=hidden.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep=timesteps.expand(b) if timesteps.ndim == 0 else timesteps,
            ofs=ofs,
            image_rotary_emb=self.rotary_embeddings(hidden.shape[2], height, width, hidden.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)[:, :, pad:]

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """1.0: CogVideoX is a DDPM v-prediction model, not flow matching, so no flow shift applies;
        its schedule (SNR shift included) lives in the scheduler's alphas_cumprod."""
        return 1.0

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's CogVideoX pipeline over the current components (the transformer with any
        LoRA in it). Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "vae")
        return self.pipeline_class_for(self.task)(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                                                  transformer=c.transformer, scheduler=c.scheduler)

    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """Prompts padded to the length training used, and the first frame for i2v. The
        pipelines take no frame rate (the clip is written at ``fps``)."""
        return {"max_sequence_length": self.text_len, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """Original SAT names (``transformer.layers.{i}.attention.query_key_value`` fusing to_q,
        to_k, to_v; ``mixins.adaln_layer.adaLN_modulations.{i}.1`` holding norm1 and norm2)."""
        return KEY_MAP

    # --- checks ---
    def check_videos(self, videos: torch.Tensor) -> None:
        """The family rules, and for checkpoints with learned position embeddings (CogVideoX-5b-I2V)
        the one clip shape their table covers (49 frames at 720x480; other shapes would silently
        fall back to sin-cos positions it was not trained with). Raises ValueError naming the fix."""
        super().check_videos(videos)
        config = self.components.transformer.config
        if config.use_learned_positional_embeddings:
            need = (config.sample_frames, config.sample_height * self._vae_spatial,
                    config.sample_width * self._vae_spatial)
            if tuple(videos.shape[2:]) != need:
                f, h, w = videos.shape[2:]
                raise ValueError(
                    f"{self.name}: {self.spec.display_id} has learned position embeddings and only takes "
                    f"{need[0]}-frame {need[2]}x{need[1]} (width x height) clips, got {f} frames at {w}x{h} "
                    f"(try data.frames={need[0]} data.width={need[2]} data.height={need[1]})")

    def _check_checkpoint(self) -> None:
        """The class-level rules must match the loaded checkpoint: 8x VAE x patch 2 in space, 4x in
        time, and this generation's temporal patch (1.0 has none, 1.5 has 2)."""
        vae = self.components.vae
        temporal = vae.config.temporal_compression_ratio if vae is not None else self.frame_rule.temporal_factor
        found = (self._vae_spatial * self._patch, int(temporal), self._patch_t)
        want = (self.spatial_factor, self.frame_rule.temporal_factor, self.patch_size_t)
        if found != want:
            other, other_id = self.other_generation
            hint = (f" (patch_size_t={self._patch_t}: a checkpoint of family {other}, e.g. {other_id})"
                    if self._patch_t != self.patch_size_t else "")
            raise ValueError(
                f"{self.name}: {self.spec.display_id} compresses {found[0]}x in space and {found[1]}x in time with "
                f"temporal patch {found[2]}, but the {self.name} family assumes {want[0]}x, {want[1]}x and "
                f"{want[2]}; use a checkpoint such as {self.model_id_for(self.task)}{hint}")
