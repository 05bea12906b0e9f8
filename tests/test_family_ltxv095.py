"""LTX-Video 0.9.5+ specifics: training calls the transformer as LTXConditionPipeline does (causal
video coordinates, per-token timesteps, the clean first frame for i2v), noise levels follow the
official LTX-Video-Trainer sampler, and 0.9.0/0.9.1 and 0.9.5+ checkpoints are told apart."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from finetune.families import ModelSpec, get_family
from test_families import FRAMES, PROMPT, cond_image, first_transformer_call, load, random_videos

Pipeline = diffusers.LTXConditionPipeline


def unpack(kwargs: dict, fam) -> torch.Tensor:
    """The pipeline's packed hidden states [1, f*h*w, C] -> latents [1, C, f, h, w]."""
    size = 2 * type(fam).spatial_factor
    f, h = (FRAMES - 1) // 8 + 1, size // 32
    return Pipeline._unpack_latents(kwargs["hidden_states"], f, h, h)


@pytest.mark.parametrize("fps", [24.0, 8.0])
@torch.no_grad()
def test_ltxv095_predict_matches_the_pipeline_call(fps):
    fam = load("ltxv095")
    kwargs, out = first_transformer_call(fam, frame_rate=fps)
    assert kwargs["timestep"].shape == (1, 1)
    text = fam.encode_prompts([PROMPT])
    assert torch.equal(text["prompt_attention_mask"], kwargs["encoder_attention_mask"])
    latents = unpack(kwargs, fam)
    coords = fam.video_coords(1, *latents.shape[2:], fps, latents.device)
    torch.testing.assert_close(coords, kwargs["video_coords"], atol=0, rtol=0)
    pred = fam.predict(fam.components.transformer, latents, kwargs["timestep"][:, 0], text, fps=fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_ltxv095_i2v_conditioning_matches_the_pipeline_call():
    """The cached first-frame latent is what pipe(image=...) puts on frame 0 (without its
    inference-time noise on the condition), those tokens get timestep 0, and predict on the
    same input gives the same output."""
    fam = load("ltxv095:i2v")
    kwargs, out = first_transformer_call(fam, image_cond_noise_scale=0.0)
    image = cond_image(get_family("ltxv095"))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    seen = unpack(kwargs, fam)
    torch.testing.assert_close(cond["first_latent"], seen[:, :, :1], atol=1e-5, rtol=0)

    tokens_per_frame = seen.shape[3] * seen.shape[4]
    t = kwargs["timestep"]
    assert t.shape == (1, seen.shape[2] * tokens_per_frame)
    assert (t[:, :tokens_per_frame] == 0).all() and (t[:, tokens_per_frame:] > 0).all()
    cond.update(fam.encode_prompts([PROMPT]))
    pred = fam.predict(fam.components.transformer, seen, t[:, -1], cond, fps=fam.default_fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-5, rtol=0)


def test_ltxv095_positions_are_causal_not_the_090_interpolation_scale():
    """Latent frame k sits at pixel frame max(0, 8k - 7), in seconds; 0.9.0's
    rope_interpolation_scale path (8k / fps) would give a different prediction."""
    fam = load("ltxv095")
    coords = fam.video_coords(1, 3, 2, 2, 24.0, torch.device("cpu"))
    times = coords[0, 0].view(3, 4)[:, 0]
    torch.testing.assert_close(times, torch.tensor([0.0, 1.0, 9.0]) / 24.0)
    torch.testing.assert_close(coords[0, 1].view(3, 2, 2)[0, :, 0], torch.tensor([0.0, 32.0]))

    latents = torch.randn(1, 8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    text = fam.encode_prompts([PROMPT])
    tr = fam.components.transformer
    with torch.no_grad():
        ours = fam.predict(tr, latents, torch.tensor([500.0]), text, fps=24.0)
        old = tr(hidden_states=Pipeline._pack_latents(latents), encoder_hidden_states=text["prompt_embeds"],
                 timestep=torch.tensor([[500.0]]), encoder_attention_mask=text["prompt_attention_mask"],
                 num_frames=3, height=2, width=2, rope_interpolation_scale=(8 / 24.0, 32, 32), return_dict=False)[0]
    assert (Pipeline._pack_latents(ours) - old).abs().max() > 1e-4


def test_ltxv095_training_sigmas_are_the_official_shifted_logit_normal():
    """LTX-Video-Trainer samples sigma = sigmoid(N(mu, 1)) with mu linear in the token count
    (1024 tokens -> 0.95, 4096 -> 2.05); the family's logit-normal + time shift is the same
    distribution, quantile for quantile."""
    fam = load("ltxv095")
    u = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    z = torch.distributions.Normal(0.0, 1.0).icdf(u.double())
    for shape in [(1, 128, 3, 16, 22), (1, 128, 16, 16, 24), (1, 128, 21, 22, 38)]:
        tokens = shape[2] * shape[3] * shape[4]
        mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (tokens - 1024)
        assert fam.timestep_shift(shape) == pytest.approx(math.exp(mu))
        torch.testing.assert_close(fam.training_sigmas(u, shape), torch.sigmoid(z + mu).float(), atol=1e-6, rtol=0)
    # Inference gets no resolution shift from the scheduler: LTXConditionPipeline hands it timesteps.
    assert fam.components.scheduler.config.use_dynamic_shifting is False


def test_ltxv095_i2v_target_is_the_velocity_and_the_first_frame_is_clean_and_unscored():
    fam = load("ltxv095:i2v")
    videos = random_videos(get_family("ltxv095"))
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = fam.encode_conditioning(videos, latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    n = fam.noisy_input_and_target(latents, noise, sigmas, cond)
    torch.testing.assert_close(n.target, noise - latents)  # LTX-Video-Trainer: targets = noise - latents
    assert torch.equal(n.noisy[:, :, :1], cond["first_latent"])
    s = sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(n.noisy[:, :, 1:], ((1 - s) * latents + s * noise)[:, :, 1:])
    assert n.loss_mask.flatten().tolist() == [0.0, 1.0]
    torch.testing.assert_close(n.timesteps, sigmas * 1000)
    t = fam.token_timesteps(latents.shape, n.timesteps, clean_first=True)
    assert t.shape == (2, 2 * 4) and (t[:, :4] == 0).all()
    torch.testing.assert_close(t[:, 4:], (sigmas * 1000).view(2, 1).expand(2, 4))


def test_ltx_names_ltxv095_for_a_095_checkpoint(tmp_path):
    load("ltxv095").pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"0\.9\.5 or later.*model\.family=ltxv095"):
        get_family("ltx").load(ModelSpec(pretrained=str(tmp_path)))


def test_ltxv095_names_ltx_for_a_090_checkpoint(tmp_path):
    load("ltx").pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LTX-Video 0\.9\.0/0\.9\.1 checkpoint.*model\.family=ltx for it"):
        get_family("ltxv095").load(ModelSpec(pretrained=str(tmp_path)))
