"""What is specific to the CogVideoX families (1.0 ``cogvideox``, 1.5 ``cogvideox15``): training
calls the transformer as the pipelines do, the objective is v-prediction on the DDPM schedule
(not flow matching), timesteps are uniform DDPM indices, and checkpoints of the other generation
are refused by name. Tiny random models, CPU, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.families import ModelSpec, get_family
from test_families import FRAMES, PROMPT, cond_image, first_transformer_call, load, random_videos

CASES = ["cogvideox", "cogvideox:i2v", "cogvideox15", "cogvideox15:i2v"]


def image_clip(name: str) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1]: the test conditioning image repeated, so its first frame is it."""
    image = cond_image(get_family(name.partition(":")[0]))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    return pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_predict_matches_the_pipeline_call(name):
    """The pipeline's first transformer call (frames-first latents, image latents on channels,
    rotary embeddings, ofs for 1.5 I2V) is what predict makes of the same inputs; for i2v the
    cached conditioning equals the image latents the pipeline concatenates."""
    fam = load(name)
    kwargs, out = first_transformer_call(fam)
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"], atol=1e-6, rtol=0)
    hidden = kwargs["hidden_states"].permute(0, 2, 1, 3, 4)  # [B, F, C, h, w] -> [B, C, F, h, w]
    cond = dict(text)
    if fam.task == "i2v":
        videos = image_clip(name)
        cond.update(fam.encode_conditioning(videos, fam.encode_videos(videos)))
        torch.testing.assert_close(cond["image_latents"], hidden[:, 16:], atol=1e-5, rtol=0)
        assert (kwargs["ofs"] is not None) == (fam.name == "cogvideox15")
    pred = fam.predict(fam.components.transformer, hidden[:, :16], kwargs["timestep"], cond, fam.default_fps)
    torch.testing.assert_close(pred, out.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)


@torch.no_grad()
def test_cogvideox15_pads_odd_latent_frames_in_front_and_drops_the_padding():
    """9 frames -> 3 latent frames: the transformer sees 4 (a copy of the first in front, as the
    official trainer pads and the pipeline adds a frame it later discards) and predict returns 3."""
    fam = load("cogvideox15:i2v")
    videos = random_videos(get_family("cogvideox15"), batch=1)
    latents = fam.encode_videos(videos)
    cond = {**fam.encode_prompts([PROMPT]), **fam.encode_conditioning(videos, latents)}
    assert latents.shape[2] == 3 and cond["image_latents"].shape[2] == 4
    assert cond["image_latents"][:, :, 1:].abs().max() == 0  # the image only at the first (padding) position
    t = torch.tensor([500])
    pred = fam.predict(fam.components.transformer, latents, t, cond, 16)
    padded = torch.cat([latents[:, :, :1], latents], dim=2)
    full = fam.predict(fam.components.transformer, padded, t, cond, 16)
    assert pred.shape == latents.shape
    torch.testing.assert_close(pred, full[:, :, 1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox15"])
def test_target_is_v_prediction_on_the_ddpm_schedule_not_flow_matching(name):
    fam = load(name)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 4, 4, generator=gen)
    noise = torch.randn(2, 16, 3, 4, 4, generator=gen)
    sigmas = torch.tensor([0.25, 0.8])
    noised = fam.noisy_input_and_target(latents, noise, sigmas)
    assert noised.timesteps.dtype == torch.long and noised.timesteps.tolist() == [250, 800]
    abar = fam.components.scheduler.alphas_cumprod[noised.timesteps].float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(noised.target, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
    assert noised.loss_mask is None
    s = sigmas.view(-1, 1, 1, 1, 1)
    flow_target, flow_noisy = noise - latents, (1 - s) * latents + s * noise
    assert (noised.target - flow_target).abs().mean() > 0.1
    assert (noised.noisy - flow_noisy).abs().mean() > 0.1


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox15"])
def test_plain_v_loss_equals_the_official_weighted_x0_loss(name):
    """The official trainer: x0_hat = scheduler.get_velocity(model_out, x_t, t), loss = mean of
    (x0_hat - x0)^2 / (1 - abar_t). With target v the trainer's plain MSE is the same number."""
    from finetune.trainer import masked_mse

    fam = load(name)
    gen = torch.Generator().manual_seed(1)
    latents, noise, pred = (torch.randn(2, 16, 3, 4, 4, generator=gen) for _ in range(3))
    noised = fam.noisy_input_and_target(latents, noise, torch.tensor([0.1, 0.7]))
    scheduler = fam.components.scheduler
    x0_hat = scheduler.get_velocity(pred, noised.noisy, noised.timesteps)
    weights = (1 / (1 - scheduler.alphas_cumprod[noised.timesteps].float())).view(-1, 1, 1, 1, 1)
    official = (weights * (x0_hat - latents) ** 2).mean()
    torch.testing.assert_close(masked_mse(pred, noised.target, noised.loss_mask), official, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox15"])
def test_timesteps_are_uniform_ddpm_indices_without_a_shift(name):
    fam = load(name)
    shape = (1, 16, 13, 60, 90)
    assert fam.timestep_shift(shape) == 1.0
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    sigmas = fam.training_sigmas(u, shape, logit_mean=1.0, logit_std=2.0)  # flow-matching knobs: ignored
    torch.testing.assert_close(sigmas, u)
    torch.testing.assert_close(fam.shift_sigmas(sigmas, shape), sigmas)
    t = fam.ddpm_timesteps(sigmas)
    assert t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()  # ten bins of 100 indices
    assert (counts / counts.mean() - 1).abs().max() < 0.1
    assert fam.ddpm_timesteps(torch.tensor([0.0, 0.5, 0.9999, 1.0])).tolist() == [0, 500, 999, 999]
    # The fixed-timestep loss of the learning check takes t = 100, 300, ..., 900.
    quantiles = torch.linspace(0.1, 0.9, 5)
    assert fam.ddpm_timesteps(fam.training_sigmas(quantiles, shape)).tolist() == [100, 300, 500, 700, 900]


def test_the_schedule_is_the_scheduler_s_own():
    """The 2B layout (tiny t2v) has SNR shift 3, the 5B ones 1: training noise follows the loaded
    scheduler's alphas_cumprod, so a checkpoint's shift is honoured without a family constant."""
    low_snr, plain = load("cogvideox"), load("cogvideox:i2v")
    assert low_snr.components.scheduler.config.snr_shift_scale == 3.0
    assert plain.components.scheduler.config.snr_shift_scale == 1.0
    latents, noise = torch.ones(1, 16, 3, 4, 4), torch.zeros(1, 16, 3, 4, 4)
    a = low_snr.noisy_input_and_target(latents, noise, torch.tensor([0.5])).noisy
    b = plain.noisy_input_and_target(latents, noise, torch.tensor([0.5])).noisy
    assert a.mean() < b.mean()  # sqrt(abar) is smaller with the SNR shift


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_a_checkpoint_of_the_other_generation_is_refused_by_name(task):
    v10, v15 = get_family("cogvideox"), get_family("cogvideox15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts15, parts10 = v15.build_tiny(task), v10.build_tiny(task)
    with pytest.raises(ValueError, match=r"cogvideox: .*temporal patch 2.*family cogvideox15"):
        v10(parts15, ModelSpec(pretrained="THUDM/CogVideoX1.5-5B", task=task))
    with pytest.raises(ValueError, match=r"cogvideox15: .*temporal patch None.*family cogvideox\b"):
        v15(parts10, ModelSpec(pretrained="THUDM/CogVideoX-5b", task=task))


def test_learned_position_embeddings_fix_the_clip_shape():
    """CogVideoX-5b-I2V (tiny: learned table for 9 frames at 32x32) names the one shape it takes."""
    fam = load("cogvideox:i2v")
    with pytest.raises(ValueError, match=r"only takes 9-frame 32x32 .*try data.frames=9 data.width=32 data.height=32"):
        fam.encode_videos(torch.zeros(1, 3, FRAMES, 48, 48))
    with pytest.raises(ValueError, match=r"got 13 frames"):
        fam.encode_videos(torch.zeros(1, 3, 13, 32, 32))
    assert load("cogvideox").encode_videos(torch.zeros(1, 3, 13, 48, 48)).shape == (1, 16, 4, 6, 6)
