"""What is specific to Kandinsky 5.0 Video Lite: training calls the transformer as the diffusers
pipelines do (channels last, zero conditioning channels, a mask channel, unpadded Qwen tokens and
the pooled CLIP embedding), i2v puts the clean image latent in the first frame and leaves it out of
the loss (kandinskylab/kandinsky-5 generation_utils.generate_sample), the noise levels are shifted
with the model's scheduler_scale, and the wrong-checkpoint errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.families import ModelSpec, get_family
from test_families import FRAMES, PROMPT, cond_image, load, random_videos, run

NAME = "kandinsky5"


def first_transformer_call(fam) -> tuple[dict, torch.Tensor]:
    """Keyword arguments (copied: the pipeline updates its latents in place after the call) and
    output of the pipeline's first transformer call, without CFG."""
    seen = []
    hook = fam.components.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(
            ({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, out[0].clone())),
        with_kwargs=True,
    )
    try:
        run(fam, fam.pipeline(), guidance_scale=1.0)
    finally:
        hook.remove()
    return seen[0]


def channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)


@torch.no_grad()
def test_predict_matches_the_pipeline_call():
    fam = load(NAME)
    kwargs, out = first_transformer_call(fam)
    c = fam.components.vae.config.latent_channels
    # t2v: zero conditioning latents and mask channels after the noisy latents (channels last)
    assert kwargs["hidden_states"].shape[-1] == 2 * c + 1 and not kwargs["hidden_states"][..., c:].any()
    text = fam.encode_prompts([PROMPT])
    n = int(text["prompt_lengths"][0])
    torch.testing.assert_close(text["prompt_embeds"][:, :n], kwargs["encoder_hidden_states"], atol=0, rtol=0)
    assert not text["prompt_embeds"][:, n:].any()  # the cache pads with zeros the model never sees
    torch.testing.assert_close(text["pooled_projections"], kwargs["pooled_projections"], atol=0, rtol=0)
    noisy = channels_first(kwargs["hidden_states"][..., :c])
    pred = fam.predict(fam.components.transformer, noisy, kwargs["timestep"], text, fps=24)
    torch.testing.assert_close(pred, channels_first(out), atol=1e-6, rtol=0)


@torch.no_grad()
def test_i2v_conditioning_matches_the_pipeline_call():
    """The cached first-frame latent is what the I2V pipeline puts in the first latent frame for the
    same image; the mask channel is 1 there only, the conditioning channels stay zero."""
    fam = load(f"{NAME}:i2v")
    kwargs, out = first_transformer_call(fam)
    pixels = torch.from_numpy(np.array(cond_image(get_family(NAME)))).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = fam.encode_conditioning(videos, latents)
    c = latents.shape[1]
    hidden = kwargs["hidden_states"]
    torch.testing.assert_close(cond["first_latent"], channels_first(hidden[:, :1, ..., :c]), atol=1e-5, rtol=0)
    assert not hidden[..., c:2 * c].any()
    assert hidden[:, 0, ..., -1].eq(1).all() and not hidden[:, 1:, ..., -1].any()
    cond.update(fam.encode_prompts([PROMPT]))
    pred = fam.predict(fam.components.transformer, channels_first(hidden[..., :c]), kwargs["timestep"], cond, fps=24)
    torch.testing.assert_close(pred, channels_first(out), atol=1e-5, rtol=0)


def test_i2v_target_keeps_the_clean_first_frame_out_of_the_loss():
    """generate_sample writes the image latent into the first frame at every step and never updates
    it: the noisy input has it clean, the loss ignores it (plain flow matching over every frame, as
    for t2v, would fail here); the other frames regress noise - x0 at time 1000 t."""
    fam = load(f"{NAME}:i2v")
    videos = random_videos(get_family(NAME), batch=1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = fam.encode_conditioning(videos, latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noised = fam.noisy_input_and_target(latents, noise, torch.tensor([0.6]), cond)
    assert noised.loss_mask is not None and noised.loss_mask[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(noised.noisy[:, :, :1], cond["first_latent"])
    torch.testing.assert_close(noised.noisy[:, :, 1:], (0.4 * latents + 0.6 * noise)[:, :, 1:])
    torch.testing.assert_close(noised.target, noise - latents)
    torch.testing.assert_close(noised.timesteps, torch.tensor([600.0]))
    t2v = load(NAME).noisy_input_and_target(latents, noise, torch.tensor([0.6]), {})
    assert t2v.loss_mask is None
    torch.testing.assert_close(t2v.noisy, 0.4 * latents + 0.6 * noise)


def test_noise_levels_are_logit_normal_shifted_with_scheduler_scale():
    """The official sampler's t' = s t / (1 + (s - 1) t) with s = scheduler_scale (the diffusers
    scheduler's shift; 5 in the tiny build, 10 in the Lite checkpoints), at every size."""
    fam = load(NAME)
    s = fam.components.scheduler.config.shift
    assert s == 5.0
    for shape in [(1, 16, 31, 64, 96), (1, 16, 16, 32, 48)]:
        assert fam.timestep_shift(shape) == s
    u = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    t = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u.double()))
    got = fam.training_sigmas(u, (1, 16, 31, 64, 96))
    torch.testing.assert_close(got, (s * t / (1 + (s - 1) * t)).float(), atol=1e-6, rtol=0)
    assert torch.all(got[1:] > got[:-1])


@torch.no_grad()
def test_prompts_of_different_lengths_predict_as_they_would_alone():
    """The transformer has no text mask: a batch of prompts of different lengths must give what
    each prompt gives alone (the way the pipeline runs it), not attend to padding."""
    fam = load(NAME)
    latents = fam.encode_videos(random_videos(get_family(NAME), batch=2), generator=torch.Generator().manual_seed(0))
    text = fam.encode_prompts([PROMPT, "a much longer prompt about a blue cube"])
    assert text["prompt_lengths"][0] != text["prompt_lengths"][1]
    t = torch.tensor([700.0, 300.0])
    both = fam.predict(fam.components.transformer, latents, t, text, 24)
    for i in range(2):
        alone = fam.predict(fam.components.transformer, latents[i:i + 1], t[i:i + 1],
                            {k: v[i:i + 1] for k, v in text.items()}, 24)
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-6, rtol=0)


def test_latents_are_scaled_posterior_samples():
    """As the I2V pipeline encodes its image: a posterior sample times scaling_factor (no shift)."""
    fam = load(NAME)
    vae = fam.components.vae
    videos = random_videos(get_family(NAME), batch=1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.encode(videos).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, expected * vae.config.scaling_factor)


def test_short_i2v_clips_render_without_nan():
    """diffusers' first-frame normalisation needs more than 4 latent frames; ours skips it below."""
    fam = load(f"{NAME}:i2v")
    frames = run(fam, fam.pipeline(), steps=1)
    assert torch.isfinite(frames).all()


def test_wrong_checkpoints_name_the_family_and_a_fix():
    import diffusers

    cls = get_family(NAME)
    spec = ModelSpec(pretrained="some/checkpoint", tiny=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = cls.build_tiny()
    config = dict(parts.transformer.config)
    # patch 1x1: 8x in space where the family's frame-size rule assumes 16x
    parts.transformer = diffusers.Kandinsky5Transformer3DModel(**{**config, "patch_size": (1, 1, 1)})
    with pytest.raises(ValueError, match=r"kandinsky5: .* compresses 8x in space .* assumes 16x.*"
                                         r"Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"):
        cls(parts, spec)
    # i2v needs the visual conditioning channels
    parts.transformer = diffusers.Kandinsky5Transformer3DModel(**{**config, "visual_cond": False})
    with pytest.raises(ValueError, match=r"visual_cond=false.*task i2v.*Kandinsky-5.0-I2V-Lite-5s-Diffusers"):
        cls(parts, ModelSpec(pretrained="some/checkpoint", tiny=True, task="i2v"))
    # a transformer for another latent space
    parts.transformer = diffusers.Kandinsky5Transformer3DModel(**{**config, "in_visual_dim": 4, "out_visual_dim": 4})
    with pytest.raises(ValueError, match=r"maps 4 -> 4 latent channels but its VAE has 8"):
        cls(parts, spec)
