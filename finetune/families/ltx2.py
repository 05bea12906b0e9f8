"""LTX-2 (19B audio-video model; diffusers ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline``) behind
the family protocol: video LoRA and audio-video LoRA (recipe ``data.audio: true``), text-to-video
and image-to-video.

What this file follows, and where it comes from:
  text         Gemma-3 (``Gemma3ForConditionalGeneration``): the hidden states of every layer,
               stacked, go through ``LTX2TextConnectors`` (a frozen part of the text path: feature
               projection + two 1-D transformers, one per stream). Both run at cache time through
               the pipeline's own ``encode_prompt`` and the connectors' forward; the connectors
               live in ``Components.text_encoder_2`` so they are released, moved and hashed with
               the text encoder.
  latents      AutoencoderKLLTX2Video: 128 channels, 32x space, 8x time, normalised with its
               latents_mean/std as ``LTX2Pipeline._normalize_latents``; encoded with the posterior
               mean, as the i2v pipeline encodes its image (``argmax``) and ltx-core's encoder does.
  positions    the transformer's own ``rope.prepare_video_coords`` at the clip frame rate, as
               the pipeline builds them.
  timesteps    official ltx-trainer ``ShiftedLogitNormalTimestepSampler``: sigmoid(N(mu, 1)) with mu
               linear in the video token count (1024 -> 0.95, 4096 -> 2.05, capped at 4096),
               stretched between its 0.5th and 99.9th percentiles, mixed with 10% uniform; the
               family samples it by inverting that mixture's CDF (:meth:`training_sigmas`).
  target       velocity noise - x_0 (ltx-trainer's ``video_targets``).
  i2v          same weights; the first latent frame is the clean image latent, its tokens get
               timestep 0 and no loss (ltx-trainer's first-frame conditioning mask;
               ``LTX2ImageToVideoPipeline``'s ``conditioning_mask``).
  audio        video-only runs: the diffusers transformer always runs its audio stream; ltx-trainer's
               video-only mode disables that modality. The closest diffusers can express is an audio
               stream that carries nothing: fresh Gaussian noise at sigma 1 (timestep 1000), the state
               the pipeline's audio is in at its first step.
               audio-video runs (``data.audio``), as ltx-trainer's ``with_audio`` / audio
               ``is_generated``: the clip's sound, resampled to the audio VAE's rate (16 kHz stereo),
               becomes a log-mel spectrogram with ltx-core's ``AudioProcessor`` settings (n_fft 1024,
               hop and mel bins from the audio VAE config, Slaney mel scale and norm, magnitude,
               log of max(x, 1e-5)), the audio VAE encodes it (posterior mean), and the latents are
               packed [L, C*M] and normalised with the audio VAE's latents_mean/std as the pipeline
               does (``_pack_audio_latents``, ``_normalize_audio_latents``), trimmed to the
               pipeline's ``audio_num_frames`` for the clip. Training noises audio with the video's
               sigma, its timesteps are that sigma on every token, its target is the velocity, and
               its plain MSE is added to the video loss with weight 1 (ltx-trainer's
               ``compute_loss``). The adapter then also covers the audio stream and the two
               cross-modal attentions (:meth:`LTX2Family.default_targets`).
  masks        only the two text cross-attentions get one: a [B, heads, 1, L] additive key bias
               (L = 1024 at full size), 0 everywhere since the connectors replace the padding
               (with their registers); self- and audio-video attentions get none. Nothing S x S
               and no fully masked row, so safe as it is.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import diffusers
import torch
import transformers
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

from finetune.families import register
from finetune.families._encoders import GEMMA3_12B_TEXT, GEMMA3_SIGLIP_896
from finetune.families._loading import check_quantization, from_subfolders, load_transformer
from finetune.families._ltx import TRAINER_SHIFT_MU, TRAINER_SHIFT_TOKENS, LTXBase
from finetune.families._tiny import refill_zero_params, tiny_gemma_tokenizer
from finetune.families.base import TEXT_LEN_KEY, Components, FullSize, ModelSpec, Noised, Stream
from finetune.lora_formats import KeyMap

Pipeline = diffusers.LTX2Pipeline

# Mirrors scheduler/scheduler_config.json of the LTX-2 diffusers repo: flow-matching Euler whose
# shift grows with the video token count (1024 -> 0.95, 4096 -> 2.05) with a terminal stretch.
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
)
# ltx-trainer ShiftedLogitNormalTimestepSampler constants (mu through _ltx.TRAINER_SHIFT_*).
_STRETCH_Z = (-2.5758, 3.0902)  # the normal's 0.5th and 99.9th percentiles
_UNIFORM_P = 0.1
_REFLECT_EPS = 1e-3  # raw samples below this are reflected around it
# Video-only runs: the audio stream is pure noise at this timestep (sigma 1).
_SILENT_AUDIO_T = 1000.0

# Adapted block modules: the video stream's self-attention, text cross-attention and MLP. The
# audio stream's modules and the cross-modal attentions are left alone: a video-only run gives
# them no signal (ltx-trainer disables the audio modality there).
_BLOCK_TARGETS = (
    *(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj", "ff.net.2",
)
# Audio-video runs add the audio stream's attentions and MLP and both cross-modal attentions:
# ltx-trainer's audio-video recommendation (to_q/to_k/to_v/to_out.0 of every attention, which
# includes audio_attn1/2, audio_to_video_attn and video_to_audio_attn) plus its FFN tip, matching
# the video stream's targets here.
_AUDIO_BLOCK_TARGETS = (
    *(f"{a}.{p}" for a in ("audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
      for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "audio_ff.net.0.proj", "audio_ff.net.2",
)
# ltx-core AudioProcessor / audio VAE encoder: FFT size of the mel spectrogram (its default; the
# diffusers audio VAE config does not record it), floor before the log.
_MEL_N_FFT = 1024
_MEL_FLOOR = 1e-5


def _key_map() -> KeyMap:
    """diffusers module name -> name in the original LTX-2 checkpoint (``diffusion_model.*``; also
    ComfyUI's): the inverse of diffusers' ``_convert_non_diffusers_ltx2_lora_to_diffusers``.
    Blocks keep their names (the converter renames only q_norm/k_norm, which are not linear)."""
    block = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    pairs = [(f"transformer_blocks.{{i}}.{a}.{p}",) * 2 for a in block for p in ("to_q", "to_k", "to_v", "to_out.0")]
    pairs += [(f"transformer_blocks.{{i}}.{a}.to_gate_logits",) * 2 for a in block]
    pairs += [(f"transformer_blocks.{{i}}.{f}.{p}",) * 2 for f in ("ff", "audio_ff") for p in ("net.0.proj", "net.2")]
    renames = {
        "proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj",
        "time_embed": "adaln_single", "audio_time_embed": "audio_adaln_single",
        "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
        "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
        "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
        "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
        "prompt_adaln": "prompt_adaln_single", "audio_prompt_adaln": "audio_prompt_adaln_single",
    }
    for d, o in renames.items():
        if d.endswith("proj_in"):
            pairs.append((d, o))
            continue
        pairs += [(f"{d}.{s}", f"{o}.{s}") for s in
                  ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")]
    for same in ("caption_projection", "audio_caption_projection"):
        pairs += [(f"{same}.linear_1",) * 2, (f"{same}.linear_2",) * 2]
    pairs += [("proj_out", "proj_out"), ("audio_proj_out", "audio_proj_out")]
    return KeyMap(tuple(pairs))


LTX2_KEY_MAP = _key_map()


def _audio_latent_rate(sampling_rate: float, hop_length: float) -> float:
    """Audio latent frames per second: sampling rate / mel hop / the audio VAE's 4x time compression."""
    return float(sampling_rate) / float(hop_length) / 4.0


def _audio_latent_frames(pixel_frames: int, fps: float, rate: float) -> int:
    """The pipeline's audio_num_frames: round(clip duration x audio latents per second)."""
    return round(pixel_frames / fps * rate)


@register
class LTX2Family(LTXBase):
    name = "ltx2"
    default_lora_targets = _BLOCK_TARGETS
    # The diffusers-format LTX-2 19B dev checkpoint; image-to-video uses the same weights.
    default_model_id = "Lightricks/LTX-2"
    pipeline_class = Pipeline
    tasks = ("t2v", "i2v")
    task_pipeline_classes = {"i2v": diffusers.LTX2ImageToVideoPipeline}
    # ltx-trainer's DEFAULT_FPS and the pipeline's frame_rate default.
    default_fps = 24
    native_frames = 121
    # The scheduler's shift_terminal stretch divides by (1 - last sigma): one step is a zero division.
    min_inference_steps = 2
    # Gemma tokens per prompt: LTX2Pipeline's max_sequence_length default.
    max_sequence_length: ClassVar[int] = 1024
    supports_audio = True
    # Latents are posterior means, as the i2v pipeline encodes its image (``argmax``) and ltx-core's encoder.
    posterior_sample = False
    pipeline_parts = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer",
                      "vocoder")
    key_map = LTX2_KEY_MAP

    @classmethod
    def default_targets(cls, audio: bool = False) -> tuple[str, ...]:
        """The video stream's modules; audio-video runs add the audio stream's and the cross-modal ones."""
        return _BLOCK_TARGETS + _AUDIO_BLOCK_TARGETS if audio else _BLOCK_TARGETS

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        config = components.transformer.config
        self._audio_channels = int(config.audio_in_channels)
        self._audio_rate = _audio_latent_rate(config.audio_sampling_rate, config.audio_hop_length)

    # --- loading ---
    @classmethod
    def load_pretrained(cls, spec: ModelSpec) -> Components:
        check_quantization(spec)
        cls._check_model_index(spec)
        transformer = load_transformer(diffusers.LTX2VideoTransformer3DModel, spec)
        # The LTX-2 model card runs every component in bfloat16.
        parts = from_subfolders(
            spec, vae=diffusers.AutoencoderKLLTX2Video, text_encoder=transformers.Gemma3ForConditionalGeneration,
            tokenizer=transformers.AutoTokenizer, connectors=LTX2TextConnectors,
            audio_vae=diffusers.AutoencoderKLLTX2Audio, vocoder=LTX2Vocoder,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler)
        extra = {name: parts.pop(name) for name in cls._AUDIO_PARTS}
        return Components(transformer, text_encoder_2=parts.pop("connectors"), extra=extra, **parts)

    # LTX-2 19B, as diffusers' scripts/convert_ltx2_to_diffusers.py (version "2.0") writes the
    # Lightricks/LTX-2 transformer/, connectors/ and vae/ config.json (quoted from it in public
    # code, code search, this session). Keys it leaves out keep LTX2VideoTransformer3DModel's /
    # LTX2TextConnectors' defaults.
    _TRANSFORMER: ClassVar[dict[str, Any]] = dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=128, cross_attention_dim=4096, vae_scale_factors=[8, 32, 32], pos_embed_max_pos=20,
        base_height=2048, base_width=2048, audio_in_channels=128, audio_out_channels=128, audio_patch_size=1,
        audio_patch_size_t=1, audio_num_attention_heads=32, audio_attention_head_dim=64,
        audio_cross_attention_dim=2048, audio_scale_factor=4, audio_pos_embed_max_pos=20,
        audio_sampling_rate=16000, audio_hop_length=160, num_layers=48, activation_fn="gelu-approximate",
        qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
        attention_bias=True, attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True,
        causal_offset=1, timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000,
        rope_type="split")
    _CONNECTORS: ClassVar[dict[str, Any]] = dict(
        caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=30,
        video_connector_attention_head_dim=128, video_connector_num_layers=2,
        video_connector_num_learnable_registers=128, audio_connector_num_attention_heads=30,
        audio_connector_attention_head_dim=128, audio_connector_num_layers=2,
        audio_connector_num_learnable_registers=128, connector_rope_base_seq_len=4096, rope_theta=10000.0,
        rope_double_precision=True, causal_temporal_positioning=False, rope_type="split")
    _VAE: ClassVar[dict[str, Any]] = dict(
        in_channels=3, out_channels=3, latent_channels=128, block_out_channels=[256, 512, 1024, 2048],
        decoder_block_out_channels=[256, 512, 1024], layers_per_block=[4, 6, 6, 2, 2],
        decoder_layers_per_block=[5, 5, 5, 5], spatio_temporal_scaling=[True, True, True, True],
        decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[False, False, False, False],
        downsample_type=["spatial", "temporal", "spatiotemporal", "spatiotemporal"],
        upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=False,
        patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False,
        encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="reflect",
        spatial_compression_ratio=32, temporal_compression_ratio=8)
    # The audio VAE: AutoencoderKLLTX2Audio's defaults, which are LTX-2's (8 latent channels x 64
    # mel bins / 4 = the transformer's 128 audio channels; the pipeline's fallbacks say the same).
    _AUDIO_VAE: ClassVar[dict[str, Any]] = dict(
        base_channels=128, output_channels=2, ch_mult=[1, 2, 4], num_res_blocks=2, in_channels=2,
        latent_channels=8, norm_type="pixel", causality_axis="height", mid_block_add_attention=False,
        sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=64, double_z=True)

    @classmethod
    def full_size_configs(cls, task: str) -> dict[str, dict[str, FullSize]]:
        """Lightricks/LTX-2 (both tasks, same weights): the 19B transformer, the video VAE, the
        whole Gemma-3 12B (load_pretrained loads Gemma3ForConditionalGeneration, vision tower
        included; _encoders.GEMMA3_12B_TEXT), the text connectors as text_encoder_2 (where
        Components keeps them), the audio VAE (components.extra; the planner counts it for
        ``data.audio: true``, whose caching encodes sound) and the vocoder at its class defaults
        (components.extra; renders only, so the planner does not count it; model.weights=random
        builds it)."""
        return {cls.default_model_id: {
            "transformer": FullSize(diffusers.LTX2VideoTransformer3DModel, dict(cls._TRANSFORMER)),
            "vae": FullSize(diffusers.AutoencoderKLLTX2Video, dict(cls._VAE)),
            "text_encoder": FullSize(transformers.Gemma3ForConditionalGeneration, dict(
                text_config=GEMMA3_12B_TEXT, vision_config=GEMMA3_SIGLIP_896, mm_tokens_per_image=256)),
            "text_encoder_2": FullSize(LTX2TextConnectors, dict(cls._CONNECTORS)),
            "audio_vae": FullSize(diffusers.AutoencoderKLLTX2Audio, dict(cls._AUDIO_VAE)),
            "vocoder": FullSize(LTX2Vocoder, {})}}

    @classmethod
    def planning_inputs(cls, task: str, frames: int, height: int, width: int,
                        text_len: int) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
        """Latents [1, 128, f, h, w] (32x spatial, 8x temporal); what :meth:`encode_prompts` gives:
        the connectors' video and audio streams [1, L, 3840] each (30 heads x 128) and their
        binary mask [1, L] (int64); i2v adds the clean first latent frame [1, 128, 1, h, w]. The
        audio stream's noise is drawn inside :meth:`predict` (no ``audio_noise`` key)."""
        f, h, w = (frames - 1) // cls.frame_rule.temporal_factor + 1, height // 32, width // 32
        bf16 = torch.bfloat16
        cond = {"prompt_embeds": ((1, text_len, 3840), bf16), "audio_prompt_embeds": ((1, text_len, 3840), bf16),
                "prompt_attention_mask": ((1, text_len), torch.int64)}
        if task == "i2v":
            cond["first_latent"] = ((1, 128, 1, h, w), bf16)
        return (1, 128, f, h, w), cond

    @classmethod
    def planning_streams(cls, task: str, frames: int, height: int, width: int,
                         fps: float) -> dict[str, tuple[int, ...]]:
        """Audio-video runs: the audio stream [1, La, 128] with La = :meth:`audio_frames` of the
        clip at ``fps`` (about 25 latents per second), what :meth:`encode_audio` caches."""
        t = cls._TRANSFORMER
        rate = _audio_latent_rate(t["audio_sampling_rate"], t["audio_hop_length"])
        return {"audio": (1, _audio_latent_frames(frames, fps, rate), t["audio_in_channels"])}

    @classmethod
    def tiny_vae(cls) -> diffusers.AutoencoderKLLTX2Video:
        """The LTX-2 VAE layout at width 8: patch 4, then spatial, temporal and two spatio-temporal
        2x downsamples (32x space, 8x time), three 2x upsamplers, 8 latent channels; its latent
        statistics measured on calibration clips (posterior means, what encode_videos uses)."""
        vae = diffusers.AutoencoderKLLTX2Video(
            latent_channels=8, block_out_channels=(8, 16, 32, 64), decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False, False, False, False),
            downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=False,
            patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
            spatial_compression_ratio=32, temporal_compression_ratio=8,
            # The real decoder pads by reflection, which needs latents at least 2x2; zero padding lets
            # the tiny model decode the 1x1 latents of the smallest test clips (32x32).
            decoder_spatial_padding_mode="zeros",
        )
        return cls.calibrated(vae, sample=False)

    @classmethod
    def build_tiny(cls, task: str = "t2v") -> Components:
        """Same classes as the real model: 2-layer Gemma-3 (width 32) with a character tokenizer,
        1-layer connectors, the LTX-2 VAE layout at width 8 (:meth:`tiny_vae`), a tiny audio VAE and
        vocoder (the pipeline renders sound too), a 2-layer transformer (video 4 heads x 8, audio
        2 heads x 8), the real scheduler config. Both tasks share it, as the real checkpoint does."""
        text_len = cls.tiny_max_sequence_length
        tokenizer = tiny_gemma_tokenizer(model_max_length=text_len)
        text_config = dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        vision_config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=16, patch_size=8)
        text_encoder = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4,
        ))
        hidden = text_config["hidden_size"]
        connectors = LTX2TextConnectors(
            caption_channels=hidden, text_proj_in_factor=text_config["num_hidden_layers"] + 1,
            video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=text_len,
        )
        vae = cls.tiny_vae()
        # Three levels: two 2x downsamples, the 4x time and mel compression the pipeline assumes.
        audio_vae = diffusers.AutoencoderKLLTX2Audio(
            base_channels=4, output_channels=2, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=None,
            in_channels=2, resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height",
            dropout=0.0, mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True,
            mel_bins=8,
        )
        with torch.no_grad():  # like tiny_vae: latent statistics of the random VAE, measured on tones
            seconds = torch.arange(32000) / 16000
            freqs = 100 + 2000 * torch.rand(4, 2, 3, 1)  # 4 sounds, 2 channels, 3 partials each
            waves = 0.3 * torch.sin(2 * torch.pi * freqs * seconds).sum(dim=2)  # [4, 2, n]
            raw = cls._raw_audio_latents(audio_vae, waves)
            audio_vae.latents_mean.copy_(raw.mean(dim=(0, 1)))
            audio_vae.latents_std.copy_(raw.std(dim=(0, 1)).clamp_min(1e-6))
        # The real vocoder's 240x upsampling (mel hop 160 at 16 kHz -> 24 kHz), so the sound is as
        # long as the video, at a narrow width.
        vocoder = LTX2Vocoder(
            in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[12, 10, 4, 4, 4],
            upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
            leaky_relu_negative_slope=0.1, output_sampling_rate=24000,
        )
        transformer = diffusers.LTX2VideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
            audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
            num_layers=2, caption_channels=hidden,
        )
        refill_zero_params(transformer)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
        return Components(transformer, vae, text_encoder, tokenizer, scheduler, text_encoder_2=connectors,
                          extra={TEXT_LEN_KEY: text_len, "audio_vae": audio_vae, "vocoder": vocoder})

    # --- encoders beyond Components.ENCODERS: the audio VAE and vocoder (rendering only) ---
    _AUDIO_PARTS = ("audio_vae", "vocoder")

    def release_encoders(self) -> None:
        super().release_encoders()
        for name in self._AUDIO_PARTS:
            self.components.extra.pop(name, None)

    def move_encoders(self, device: torch.device | str) -> None:
        super().move_encoders(device)
        for name in self._AUDIO_PARTS:
            if (m := self.components.extra.get(name)) is not None:
                m.to(device)

    # --- encoding ---
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> {"prompt_embeds": [B, L, D] (video stream), "audio_prompt_embeds":
        [B, L, Da], "prompt_attention_mask": [B, L]} with L = :attr:`text_len`: the pipeline's own
        encode_prompt (Gemma hidden states of every layer), then the connectors as the pipeline
        calls them. Raises RuntimeError if the text encoder was released."""
        c = self.components
        self.require("encode_prompts", "text_encoder", "text_encoder_2")
        te = c.text_encoder
        pipe = self._pipe(text_encoder=te, tokenizer=c.tokenizer)
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.text_len, device=te.device)
        connectors = c.text_encoder_2
        video, audio, conn_mask = connectors(embeds.to(connectors.dtype), mask,
                                             padding_side=getattr(c.tokenizer, "padding_side", "left"))
        return {"prompt_embeds": video, "audio_prompt_embeds": audio, "prompt_attention_mask": conn_mask}

    @torch.no_grad()
    def encode_conditioning(self, videos: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """i2v: {"first_latent": [B, C, 1, h, w]}, the normalised latent of each clip's first frame
        encoded alone, as LTX2ImageToVideoPipeline.prepare_latents encodes its image. t2v: nothing.
        Raises RuntimeError if the VAE was released."""
        if self.task == "t2v":
            return {}
        vae = self.components.vae
        self.require("encode_conditioning", "vae")
        image = videos[:, :, :1].to(vae.device, vae.dtype)  # [B, 3, 1, H, W]
        first = vae.encode(image).latent_dist.mode()
        first = Pipeline._normalize_latents(first, vae.latents_mean, vae.latents_std)
        return {"first_latent": first.to(latents.dtype)}

    # --- sound (audio-video runs) ---
    def _audio_vae(self, what: str) -> diffusers.AutoencoderKLLTX2Audio:
        vae = self.components.extra.get("audio_vae")
        if vae is None:
            raise RuntimeError(f"{self.name}: {what} needs the audio VAE, but release_encoders() dropped it; do this "
                               f"before releasing the encoders")
        return vae

    def audio_format(self) -> tuple[int, int]:
        """(16000, 2) for LTX-2: the audio VAE's sample rate and input channels (stereo)."""
        config = self._audio_vae("audio_format").config
        return int(config.sample_rate), int(config.in_channels)

    @staticmethod
    def log_mel(waveforms: torch.Tensor, config: Any) -> torch.Tensor:
        """waveforms [B, channels, n] at the rate of the audio VAE whose ``config`` is given -> log-mel
        spectrograms [B, channels, 1 + n // hop, mel_bins]: ltx-core's AudioProcessor (torchaudio
        MelSpectrogram with n_fft 1024, centred reflect-padded Hann frames, magnitude, Slaney mel
        scale and norm over 0..rate/2, then log of max(x, 1e-5)), written with torch.stft and the
        transformers mel filter bank because torchaudio is not a dependency."""
        from transformers.audio_utils import mel_filter_bank

        rate, hop, bins = int(config.sample_rate), int(config.mel_hop_length), int(config.mel_bins)
        b, c, n = waveforms.shape
        x = waveforms.reshape(b * c, n).float()
        window = torch.hann_window(_MEL_N_FFT, device=x.device)
        spec = torch.stft(x, _MEL_N_FFT, hop_length=hop, win_length=_MEL_N_FFT, window=window, center=True,
                          pad_mode="reflect", return_complex=True).abs()  # [B*C, n_fft/2+1, T]
        fb = torch.from_numpy(mel_filter_bank(num_frequency_bins=_MEL_N_FFT // 2 + 1, num_mel_filters=bins,
                                              min_frequency=0.0, max_frequency=rate / 2, sampling_rate=rate,
                                              norm="slaney", mel_scale="slaney")).float().to(x.device)
        mel = torch.log(torch.clamp(fb.T @ spec, min=_MEL_FLOOR))  # [B*C, bins, T]
        return mel.reshape(b, c, bins, -1).transpose(2, 3).contiguous()

    @torch.no_grad()
    def encode_audio(self, waveforms: torch.Tensor, latents: torch.Tensor, fps: float) -> dict[str, torch.Tensor]:
        """waveforms [B, 2, n] at 16 kHz in [-1, 1], the sound of clips whose video latents are
        ``latents`` [B, C, f, h, w] at ``fps`` -> {"audio_latents": [B, La, Ca]}: packed,
        normalised audio latents as the pipeline's denoising loop holds them, La =
        :meth:`audio_frames` (the encoder's extra causal frame at the end is dropped; a shorter
        result repeats its last frame). Raises RuntimeError if the audio VAE was released."""
        vae = self._audio_vae("encode_audio")
        packed = Pipeline._normalize_audio_latents(self._raw_audio_latents(vae, waveforms), vae.latents_mean,
                                                   vae.latents_std)
        n = self.audio_frames(latents.shape[2], fps)
        if packed.shape[1] < n:
            packed = torch.cat([packed, packed[:, -1:].expand(-1, n - packed.shape[1], -1)], dim=1)
        return {"audio_latents": packed[:, :n].to(latents.dtype)}

    @classmethod
    def _raw_audio_latents(cls, vae: diffusers.AutoencoderKLLTX2Audio, waveforms: torch.Tensor) -> torch.Tensor:
        """waveforms [B, channels, n] -> packed audio latents [B, T', c*M'] before normalisation."""
        mel = cls.log_mel(waveforms, vae.config).to(vae.device, vae.dtype)
        return Pipeline._pack_audio_latents(vae.encode(mel).latent_dist.mode())  # [B, c, T', M'] -> [B, T', c*M']

    def rendered_audio(self, output: Any) -> tuple[Any, int] | None:
        """The vocoder's waveform of the first video: ([channels, n] float32, its output rate)."""
        audio = getattr(output, "audio", None)
        vocoder = self.components.extra.get("vocoder")
        if audio is None or vocoder is None:
            return None
        return audio[0].float().cpu().numpy(), int(vocoder.config.output_sampling_rate)

    # --- training ---
    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                               cond: dict[str, torch.Tensor] | None = None) -> Noised:
        """Rectified flow, target the velocity noise - x_0 (ltx-trainer); for i2v the first latent
        frame is the clean image latent and left out of the loss. With cached ``audio_latents``
        [B, La, Ca] (audio-video runs) also the "audio" :class:`Stream`: noised with the same
        sigmas, timesteps 1000 sigma, velocity target, weight 1 (ltx-trainer). Its noise comes from
        a generator seeded by the video noise, so it is as reproducible as that noise (resumed
        runs, fixed-noise losses) without the trainer drawing it."""
        out = super().noisy_input_and_target(latents, noise, sigmas, cond)
        if cond and "audio_latents" in cond:
            audio = cond["audio_latents"]
            seed = int(noise.detach().double().abs().sum().item() * 1e6) % (2**63 - 1)
            audio_noise = torch.randn(audio.shape, generator=torch.Generator().manual_seed(seed)).to(audio)
            s = sigmas.view(-1, 1, 1).to(audio.dtype)
            out.streams["audio"] = Stream((1 - s) * audio + s * audio_noise, sigmas * 1000.0, audio_noise - audio)
        return out

    def audio_frames(self, latent_frames: int, fps: float) -> int:
        """Audio latent frames of a clip with ``latent_frames`` video latent frames at ``fps``: the
        pipeline's round(duration x audio latents per second), duration from the pixel frames."""
        pixel_frames = (latent_frames - 1) * self.frame_rule.temporal_factor + 1
        return _audio_latent_frames(pixel_frames, fps, self._audio_rate)

    def video_timesteps(self, shape: tuple[int, ...], timesteps: torch.Tensor, clean_first: bool) -> torch.Tensor:
        """timesteps [B] -> what the pipelines pass: [B] for t2v; for i2v [B, f*h*w] with 0 on the
        first latent frame's tokens (LTX2ImageToVideoPipeline: t * (1 - conditioning_mask))."""
        return self.clean_first_timesteps(shape, timesteps) if clean_first else timesteps

    def predict(self, transformer: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], fps: float, streams: dict[str, Stream] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """noisy_latents [B, C, f, h, w], timesteps [B] in [0, 1000], cond as from
        :meth:`encode_prompts` (+ ``first_latent`` for i2v), fps of the clip -> velocity
        [B, C, f, h, w] of the video stream, in the transformer's dtype.

        Calls the transformer as the pipelines' denoising loop does (packed tokens, rope coordinates
        at ``fps``, the connector embeddings for both streams, cross-timestep modulation). Video-only:
        the audio stream is pure noise at timestep 1000 (see the module docstring);
        ``cond["audio_noise"]`` [B, La, Ca], if given, fixes that noise (tests compare with the
        pipeline's own). Audio-video (``streams["audio"]``, from :meth:`noisy_input_and_target`):
        the audio stream is that noisy audio at its timesteps, and the result is
        ``(video velocity, {"audio": audio velocity [B, La, Ca]})``."""
        b, _, frames, height, width = noisy_latents.shape
        p, pt = self._patch, self._patch_t
        grid = (frames // pt, height // p, width // p)
        dtype = self.spec.dtype
        device = noisy_latents.device
        t = timesteps.to(device).float()
        sound = (streams or {}).get("audio")
        if sound is not None:
            audio, audio_t = sound.noisy.to(device), sound.timesteps.to(device).float()
        else:
            audio = cond.get("audio_noise")
            if audio is None:
                audio = torch.randn(b, self.audio_frames(frames, fps), self._audio_channels, device=device)
            audio_t = torch.full_like(t, _SILENT_AUDIO_T)
        n_audio = audio.shape[1]
        rope_owner = self.components.transformer
        video_coords = rope_owner.rope.prepare_video_coords(b, *grid, device, fps=fps)
        audio_coords = rope_owner.audio_rope.prepare_audio_coords(b, n_audio, device)
        out, audio_out = transformer(
            hidden_states=Pipeline._pack_latents(noisy_latents.to(dtype), p, pt),
            audio_hidden_states=audio.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            audio_encoder_hidden_states=cond["audio_prompt_embeds"].to(dtype),
            timestep=self.video_timesteps(noisy_latents.shape, t, clean_first="first_latent" in cond),
            audio_timestep=audio_t,
            sigma=t,
            audio_sigma=audio_t,
            encoder_attention_mask=cond["prompt_attention_mask"],
            audio_encoder_attention_mask=cond["prompt_attention_mask"],
            num_frames=grid[0], height=grid[1], width=grid[2], fps=fps, audio_num_frames=n_audio,
            video_coords=video_coords, audio_coords=audio_coords, isolate_modalities=False,
            use_cross_timestep=True, return_dict=False,
        )
        video = Pipeline._unpack_latents(out, *grid, p, pt)
        return (video, {"audio": audio_out}) if sound is not None else video

    def _mu(self, latent_shape: tuple[int, ...]) -> float:
        (t0, t1), (m0, m1) = TRAINER_SHIFT_TOKENS, TRAINER_SHIFT_MU
        # ltx-trainer caps the count (past it the stretch degenerates)
        tokens = min(self.video_tokens(latent_shape), t1)
        return m0 + (m1 - m0) / (t1 - t0) * (tokens - t0)

    def timestep_shift(self, latent_shape: tuple[int, ...]) -> float:
        """exp(mu), mu of ltx-trainer's shifted logit-normal sampler at this video token count
        (linear through (1024, 0.95) and (4096, 2.05), count capped at 4096)."""
        return math.exp(self._mu(latent_shape))

    def training_sigmas(self, u: torch.Tensor, latent_shape: tuple[int, ...], logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> torch.Tensor:
        """ltx-trainer's ShiftedLogitNormalTimestepSampler as a quantile function: ``u`` [B] in (0, 1)
        -> sigmas [B]. Its distribution is 90% s = (sigmoid(mu + std z) - lo) / (hi - lo), reflected
        below 1e-3 and clipped to [0, 1] (lo, hi: sigmoid at the normal's 0.5th / 99.9th percentiles),
        and 10% uniform on [1e-3, 1]; the inverse of that mixture's CDF, found by bisection, keeps
        sigmas monotone in ``u`` as the trainer needs. ``logit_mean`` adds to mu and ``logit_std``
        is the normal's std (official: 0 and 1)."""
        mu = self._mu(latent_shape) + logit_mean
        lo = torch.sigmoid(torch.tensor(mu + _STRETCH_Z[0] * logit_std, dtype=torch.float64))
        hi = torch.sigmoid(torch.tensor(mu + _STRETCH_Z[1] * logit_std, dtype=torch.float64))
        f64 = dict(dtype=torch.float64)
        normal = torch.distributions.Normal(torch.tensor(0.0, **f64), torch.tensor(1.0, **f64))

        eps = _REFLECT_EPS

        def raw_cdf(x: torch.Tensor) -> torch.Tensor:
            """P(raw <= x), raw = (sigmoid(mu + std z) - lo) / (hi - lo)."""
            y = lo + x * (hi - lo)
            inside = normal.cdf((torch.logit(y.clamp(1e-300, 1 - 1e-16)) - mu) / logit_std)
            return torch.where(y <= 0, torch.zeros_like(x), torch.where(y >= 1, torch.ones_like(x), inside))

        def cdf(s: torch.Tensor) -> torch.Tensor:
            # raw below eps is reflected to 2 eps - raw, then everything is clipped to [0, 1]
            stretched = torch.where(s < eps, torch.zeros_like(s), raw_cdf(s) - raw_cdf(2 * eps - s))
            stretched = torch.where(s >= 1, torch.ones_like(s), stretched)
            uniform = ((s - eps) / (1 - eps)).clamp(0, 1)
            return (1 - _UNIFORM_P) * stretched + _UNIFORM_P * uniform

        target = u.double().clamp(1e-7, 1 - 1e-7)
        a, z = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(48):
            mid = (a + z) / 2
            below = cdf(mid) < target
            a, z = torch.where(below, mid, a), torch.where(below, z, mid)
        return ((a + z) / 2).float().to(u.device)

    # --- inference ---
    def pipeline(self) -> diffusers.DiffusionPipeline:
        """The task's pipeline over the current components (the transformer with any LoRA in it).
        Raises RuntimeError if the encoders were released."""
        c = self.components
        self.require("pipeline()", "text_encoder", "text_encoder_2", "vae")
        return self._pipe(scheduler=c.scheduler, vae=c.vae, audio_vae=c.extra.get("audio_vae"),
                          text_encoder=c.text_encoder, tokenizer=c.tokenizer, connectors=c.text_encoder_2,
                          transformer=c.transformer, vocoder=c.extra.get("vocoder"))

    # --- LoRA interchange ---
    # --- checks ---
    @classmethod
    def _check_model_index(cls, spec: ModelSpec) -> None:
        """Before any weights load: the checkpoint's model_index.json must name LTX-2's transformer
        class. Raises ValueError naming the family for LTX-Video 0.9.x checkpoints."""
        index = diffusers.DiffusionPipeline.load_config(spec.pretrained, revision=spec.revision)
        found = (index.get("transformer") or [None, None])[1]
        if found == "LTX2VideoTransformer3DModel":
            return
        hint = ("model.family=ltxv095 (LTX-Video 0.9.5+) or ltx (0.9.0/0.9.1) for it"
                if found == "LTXVideoTransformer3DModel" else "the family of that model for it")
        raise ValueError(
            f"{cls.name}: {spec.pretrained} has a {found} transformer (model_index.json), not LTX-2's "
            f"LTX2VideoTransformer3DModel; use {hint}, or a checkpoint such as {cls.default_model_id} with {cls.name}"
        )

    def check_vae(self, vae: torch.nn.Module) -> None:
        """Raise ValueError naming the LTX-Video families unless the VAE is LTX-2's."""
        if not isinstance(vae, diffusers.AutoencoderKLLTX2Video):
            raise ValueError(
                f"{self.name}: {self.spec.display_id} has a {type(vae).__name__} VAE, not LTX-2's "
                f"AutoencoderKLLTX2Video; use model.family=ltx or ltxv095 for LTX-Video 0.9.x, or a checkpoint "
                f"such as {self.default_model_id} with {self.name}"
            )
