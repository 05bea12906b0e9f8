"""LTX-2 specifics: training calls the transformer as LTX2Pipeline / LTX2ImageToVideoPipeline do
(connector embeddings for both streams, rope coordinates at the clip rate, per-token timesteps with
the clean first frame for i2v), the video-only audio stream carries nothing (noise at timestep
1000), noise levels follow ltx-trainer's shifted logit-normal sampler, and LTX-Video checkpoints
are turned away by name."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from finetune.families import ModelSpec, get_family
from test_families import FRAMES, PROMPT, cond_image, first_transformer_call, load, random_videos

Pipeline = diffusers.LTX2Pipeline


def unpack(kwargs: dict) -> torch.Tensor:
    """The pipeline's packed hidden states [1, f*h*w, C] -> latents [1, C, f, h, w]."""
    return Pipeline._unpack_latents(kwargs["hidden_states"], kwargs["num_frames"], kwargs["height"], kwargs["width"])


@pytest.mark.parametrize("fps", [24.0, 8.0])
@torch.no_grad()
def test_ltx2_predict_matches_the_pipeline_call(fps):
    fam = load("ltx2")
    kwargs, out = first_transformer_call(fam, frame_rate=fps, audio_guidance_scale=1.0)
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"], atol=0, rtol=0)
    torch.testing.assert_close(text["audio_prompt_embeds"], kwargs["audio_encoder_hidden_states"], atol=0, rtol=0)
    assert torch.equal(text["prompt_attention_mask"], kwargs["encoder_attention_mask"])
    # The pipeline's first step is sigma 1 for both streams: its audio is pure noise at timestep
    # 1000, what video-only training feeds; the test hands predict the same noise.
    assert kwargs["audio_num_frames"] == fam.audio_frames(kwargs["num_frames"], fps)
    assert torch.all(kwargs["timestep"] == 1000)
    latents = unpack(kwargs)
    cond = {**text, "audio_noise": kwargs["audio_hidden_states"]}
    pred = fam.predict(fam.components.transformer, latents, kwargs["timestep"], cond, fps=fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_ltx2_i2v_conditioning_matches_the_pipeline_call():
    """The cached first-frame latent is what LTX2ImageToVideoPipeline puts on frame 0 (without its
    inference-time H.264 re-compression of the image: the clip frame already went through a codec), those tokens
    get timestep 0, and predict on the same input gives the same output."""
    fam = load("ltx2:i2v")
    kwargs, out = first_transformer_call(fam, audio_guidance_scale=1.0, image_crf=0)
    image = cond_image(get_family("ltx2"))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    seen = unpack(kwargs)
    torch.testing.assert_close(cond["first_latent"], seen[:, :, :1], atol=1e-5, rtol=0)

    per_frame = seen.shape[3] * seen.shape[4]
    t = kwargs["timestep"]
    assert t.shape == (1, seen.shape[2] * per_frame)
    assert (t[:, :per_frame] == 0).all() and (t[:, per_frame:] > 0).all()
    cond.update(fam.encode_prompts([PROMPT]), audio_noise=kwargs["audio_hidden_states"])
    pred = fam.predict(fam.components.transformer, seen, t[:, -1], cond, fps=fam.default_fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-5, rtol=0)


def test_ltx2_video_only_audio_stream_is_noise_at_timestep_1000():
    """diffusers always runs the audio stream; a video-only run gives it nothing to read: fresh
    noise of the clip's audio length, marked fully noisy, whatever the video's noise level."""
    fam = load("ltx2")
    seen = []
    hook = fam.components.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True
    )
    latents = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fam.predict(fam.components.transformer, latents, torch.tensor([200.0, 700.0]),
                    fam.encode_prompts([PROMPT, "b"]), fps=24.0)
    hook.remove()
    kw = seen[0]
    assert torch.equal(kw["audio_timestep"], torch.tensor([1000.0, 1000.0]))
    assert torch.equal(kw["audio_sigma"], torch.tensor([1000.0, 1000.0]))
    assert torch.equal(kw["sigma"], torch.tensor([200.0, 700.0]))
    # 9 frames at 24 fps, 16 kHz / hop 160 / 4 = 25 audio latents per second -> round(9.375) = 9
    assert kw["audio_hidden_states"].shape == (2, 9, 4)
    assert kw["audio_hidden_states"].std() > 0.5


def official_sampler(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """ltx-trainer's ShiftedLogitNormalTimestepSampler.sample, restated: stretched shifted
    logit-normal, reflected near 0, clipped, mixed with 10% uniform."""
    gen = torch.Generator().manual_seed(seed)
    mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (min(tokens, 4096) - 1024)
    s = torch.sigmoid(torch.randn(n, generator=gen, dtype=torch.float64) + mu)
    lo, hi = torch.sigmoid(torch.tensor(mu - 2.5758, dtype=torch.float64)), torch.sigmoid(torch.tensor(mu + 3.0902))
    raw = (s - lo) / (hi - lo)
    stretched = torch.where(raw >= 1e-3, raw, 2e-3 - raw).clamp(0, 1)
    uniform = (1 - 1e-3) * torch.rand(n, generator=gen, dtype=torch.float64) + 1e-3
    return torch.where(torch.rand(n, generator=gen, dtype=torch.float64) > 0.1, stretched, uniform)


@pytest.mark.parametrize("shape", [(1, 128, 3, 16, 22), (1, 128, 7, 16, 24), (1, 128, 16, 32, 48)])
def test_ltx2_training_sigmas_are_the_official_sampler_quantiles(shape):
    fam = load("ltx2")
    tokens = shape[2] * shape[3] * shape[4]
    mu = 0.95 + (2.05 - 0.95) / 3072 * (min(tokens, 4096) - 1024)
    assert fam.timestep_shift(shape) == pytest.approx(math.exp(mu))
    u = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
    ours = fam.training_sigmas(u, shape)
    assert torch.all(ours[1:] > ours[:-1])
    official = torch.quantile(official_sampler(400_000, tokens).float(), u)
    torch.testing.assert_close(ours, official, atol=5e-3, rtol=0)
    # not the plain shifted logit-normal of the base protocol (no stretch, no uniform part)
    plain = fam.shift_sigmas(torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)), shape)
    assert (plain - ours).abs().max() > 0.02


def test_ltx2_i2v_target_is_the_velocity_and_the_first_frame_is_clean_and_unscored():
    fam = load("ltx2:i2v")
    videos = random_videos(get_family("ltx2"))
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    n = fam.noisy_input_and_target(latents, noise, sigmas, cond)
    torch.testing.assert_close(n.target, noise - latents)  # ltx-trainer: video_targets = noise - latents
    assert torch.equal(n.noisy[:, :, :1], cond["first_latent"])
    s = sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(n.noisy[:, :, 1:], ((1 - s) * latents + s * noise)[:, :, 1:])
    assert n.loss_mask.flatten().tolist() == [0.0, 1.0]
    t = fam.video_timesteps(latents.shape, n.timesteps, clean_first=True)
    assert t.shape == (2, 2 * 4) and (t[:, :4] == 0).all()
    torch.testing.assert_close(t[:, 4:], (sigmas * 1000).view(2, 1).expand(2, 4))


def test_ltx2_names_the_ltx_video_families_for_an_ltx_video_checkpoint(tmp_path):
    load("ltxv095").pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LTXVideoTransformer3DModel.*model\.family=ltxv095"):
        get_family("ltx2").load(ModelSpec(pretrained=str(tmp_path)))
