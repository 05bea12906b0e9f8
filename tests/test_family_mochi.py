"""What is specific to Mochi 1: its inverted time (timestep 1000 * (1 - sigma)), its target
x_0 - noise (the negative of the rectified-flow velocity), uniform unshifted training sigmas as
genmo's fine-tuner draws them, and the pipeline's own transformer call. CPU, offline, seeded."""

from __future__ import annotations

import pytest
import torch

from test_families import PROMPT, clip_size, first_transformer_call, load, random_videos

from finetune.families import ModelSpec, get_family


@pytest.fixture(scope="module")
def fam():
    return load("mochi")


@torch.no_grad()
def test_mochi_predict_matches_the_pipeline_call(fam):
    kwargs, out = first_transformer_call(fam)
    text = fam.encode_prompts([PROMPT])
    assert torch.equal(text["prompt_attention_mask"], kwargs["encoder_attention_mask"])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"])
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"], kwargs["timestep"], text, fps=30)
    torch.testing.assert_close(pred, out, atol=1e-6, rtol=0)


def test_mochi_timestep_is_one_minus_sigma_as_the_pipeline_passes_it(fam):
    """The pipeline's first step is pure noise (sigma = 1) and passes timestep 0; our timesteps
    follow the same inverted convention."""
    sched = fam.components.scheduler
    sched.set_timesteps(sigmas=[1.0, 0.25], device="cpu")
    assert sched.timesteps.tolist() == pytest.approx([0.0, 750.0])  # 1000 * (1 - sigma)
    latents = torch.zeros(2, 12, 2, 2, 2)
    noised = fam.noisy_input_and_target(latents, torch.ones_like(latents), torch.tensor([1.0, 0.25]))
    assert noised.timesteps.tolist() == pytest.approx([0.0, 750.0])


def test_mochi_target_is_data_minus_noise_not_the_flow_velocity(fam):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 12, 2, 2, 2, generator=gen), torch.randn(2, 12, 2, 2, 2, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    noised = fam.noisy_input_and_target(x0, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(noised.target, x0 - noise)
    assert not torch.allclose(noised.target, noise - x0)
    assert noised.loss_mask is None


def test_mochi_euler_step_with_the_target_reaches_the_data(fam):
    """One scheduler step from x_t with the exact target as the prediction lands on x_0: the
    sign and time convention of the target agree with MochiPipeline's sampler."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 12, 2, 2, 2, generator=gen), torch.randn(1, 12, 2, 2, 2, generator=gen)
    sched = fam.components.scheduler
    sched.set_timesteps(sigmas=[0.6], device="cpu")  # one step from sigma 0.6 to the data
    noised = fam.noisy_input_and_target(x0, noise, torch.tensor([0.6]))
    t = sched.timesteps[0]
    assert float(t) == pytest.approx(float(noised.timesteps[0]))
    out = sched.step(noised.target, t, noised.noisy, return_dict=False)[0]
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_mochi_training_sigmas_are_uniform_and_unshifted(fam):
    u = torch.linspace(0.05, 0.95, 7)
    for shape in [(1, 12, 2, 2, 2), (1, 12, 7, 60, 106)]:
        assert fam.timestep_shift(shape) == 1.0
        torch.testing.assert_close(fam.training_sigmas(u, shape, logit_mean=0.5, logit_std=2.0), u)
    assert fam.components.scheduler.config.shift == 1.0 and fam.components.scheduler.config.invert_sigmas


def test_mochi_latents_are_normalised_as_the_pipeline_denormalises(fam):
    videos = random_videos(get_family("mochi"), batch=1)
    gen = torch.Generator().manual_seed(3)
    latents = fam.encode_videos(videos, generator=gen)
    vae = fam.components.vae
    raw = vae.encode(videos).latent_dist.sample(torch.Generator().manual_seed(3))
    mean = torch.tensor(vae.config.latents_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 12, 1, 1, 1)
    # MochiPipeline decodes latents * std / scaling_factor + mean
    torch.testing.assert_close(latents * std / vae.config.scaling_factor + mean, raw, atol=1e-5, rtol=1e-5)
    assert latents.shape == (1, 12, 2, clip_size(get_family("mochi")) // 8, clip_size(get_family("mochi")) // 8)


def test_mochi_rejects_a_checkpoint_with_other_compression(tmp_path):
    import diffusers

    fam = load("mochi")
    c = fam.components
    c.vae = diffusers.AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5, temporal_expansions=(1, 2, 2),
    )
    with pytest.raises(ValueError, match=r"4x in time.*6x \(6k\+1 frames\).*genmo/mochi-1-preview"):
        get_family("mochi")(c, ModelSpec(pretrained="some/other-model"))
