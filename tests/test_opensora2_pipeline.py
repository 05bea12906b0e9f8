"""The Open-Sora 2.0 pipeline (finetune/families/opensora2_pipeline.py) against the official
sampler's rules (opensora/utils/sampling.py, utils/inference.py, configs/diffusion/inference/256px.py),
each written out here independently: the schedule, the prompt text, the guidance branches and
their combination, the image latent put back. Tiny model, CPU, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from finetune.families import ModelSpec, get_family
from finetune.families.opensora2_pipeline import describe_prompt, resolution_shift



def tiny(task: str = "t2v"):
    fam = get_family("opensora2").load(ModelSpec("tiny", tiny=True, task=task))
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return fam, pipe


def image() -> Image.Image:
    pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(4)) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def call(pipe, steps: int = 3, **kw):
    args = dict(prompt="a red ball", num_frames=9, height=32, width=32, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=64)
    return pipe(**{**args, **kw}).frames


def official_sigmas(steps: int, f: int, h: int, w: int) -> torch.Tensor:
    """get_schedule: linspace(1, 0, steps + 1) under alpha t / (1 + (alpha - 1) t), alpha linear in
    the tokens of a frame (1 at 256, 3 at 4096) times sqrt(latent frames)."""
    tokens = h * w // 4
    alpha = (1 + (tokens - 256) * (3 - 1) / (4096 - 256)) * math.sqrt(f)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return alpha * t / (1 + (alpha - 1) * t)


def test_schedule_is_the_official_shifted_linspace():
    # the release's 256px, 129 frames: 33 latent frames of 24 x 42 (252 tokens each)
    assert resolution_shift(33, 24, 42) == pytest.approx((1 + (252 - 256) * 2 / 3840) * math.sqrt(33))
    assert resolution_shift(33, 72, 128) == pytest.approx((1 + (2304 - 256) * 2 / 3840) * math.sqrt(33))  # 768px
    _, pipe = tiny()
    call(pipe, steps=7)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), official_sigmas(7, 3, 4, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("given, expected", [
    ("a red ball", "a red ball. 24 FPS. 4 motion score."),
    ("  a red ball.  ", "a red ball. 24 FPS. 4 motion score."),
    ("a red ball. 16 FPS.", "a red ball. 16 FPS. 4 motion score."),  # a frame rate already said stays
])
def test_prompts_get_the_frame_rate_and_motion_score_as_the_official_inference_adds_them(given, expected):
    assert describe_prompt(given) == expected
    assert describe_prompt("a red ball", fps=None, motion_score=None) == "a red ball"


def batch_sizes(pipe, **kw) -> list[int]:
    sizes = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, k, out: sizes.append(k["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    try:
        call(pipe, **kw)
    finally:
        hook.remove()
    return sizes


def test_guidance_branches_follow_the_official_oscillation():
    """cond, uncond and (i2v) uncond without the image before step 10 and on even steps after it;
    odd steps from 10 have both scales 1: the prompt branch alone gives the same velocity."""
    _, t2v = tiny()
    assert batch_sizes(t2v, steps=14) == [2] * 10 + [2, 1, 2, 1]
    assert batch_sizes(t2v, steps=14, guidance_oscillation=False) == [2] * 14
    assert batch_sizes(t2v, steps=4, guidance_scale=1.0) == [1] * 4
    _, i2v = tiny("i2v")
    assert batch_sizes(i2v, steps=14, image=image()) == [3] * 10 + [3, 1, 3, 1]
    assert batch_sizes(i2v, steps=3, image=image(), guidance_scale=1.0, image_guidance_scale=1.0) == [1] * 3


def test_guided_velocity_is_the_official_combination_of_its_branches():
    """v = u2 + g_img (u - u2) + g_text (c - u), c / u / u2 each a transformer call of its own,
    with the per-frame image scale linspace(1, g, f) of scale_temporal_osci."""
    fam, pipe = tiny("i2v")
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 4, generator=gen)
    sigma = torch.tensor([0.7])
    pos = (torch.randn(1, 64, 32, generator=gen), torch.randn(1, 32, generator=gen))
    neg = (torch.randn(1, 64, 32, generator=gen), torch.randn(1, 32, generator=gen))
    cond = torch.zeros(1, 17, 3, 4, 4)
    cond[:, 0, 0] = 1
    cond[:, 1:, 0] = torch.randn(1, 16, 4, 4, generator=gen)
    g_text, g_img = pipe._guidance(2, 10, 3, 7.5, 3.0, True, True)
    assert torch.is_tensor(g_img)
    upper = 3.0 + (1.0 - 3.0) * 2 / 10  # linspace(3, 1, 11)[2]
    torch.testing.assert_close(g_img.flatten(), torch.tensor([1.0, (1 + upper) / 2, upper]))

    def one(text, condition):
        with torch.no_grad():
            return pipe.transformer(latents, sigma, text[0], text[1], condition=condition).sample.float()

    c, u, u2 = one(pos, cond), one(neg, cond), one(neg, torch.zeros_like(cond))
    with torch.no_grad():
        got = pipe._velocity(latents, sigma, pos, neg, cond, g_text, g_img, torch.float32, None)
    torch.testing.assert_close(got, u2 + g_img * (u - u2) + g_text * (c - u), atol=1e-5, rtol=0)
    with torch.no_grad():  # text-to-video: no image, so u2 = u
        got = pipe._velocity(latents, sigma, pos, neg, None, 7.5, 1.0, torch.float32, None)
    torch.testing.assert_close(got, one(neg, None) + 7.5 * (one(pos, None) - one(neg, None)), atol=1e-5, rtol=0)


def test_i2v_denoises_every_frame_then_puts_the_image_latent_back():
    _, pipe = tiny("i2v")
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    out = call(pipe, image=image(), latents=noise.clone())
    # the generator served only the image's posterior sample (the noise was given)
    first = pipe.encode_image(image(), 32, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, :1], first, rtol=0, atol=0)
    t2v = call(pipe, latents=noise.clone())
    assert (out[:, :, 1:] - t2v[:, :, 1:]).abs().max() > 1e-3  # the image steered the other frames


def test_bad_sizes_are_refused_with_the_rule():
    _, pipe = tiny()
    with pytest.raises(ValueError, match="multiples of 16"):
        call(pipe, height=40)
    with pytest.raises(ValueError, match="4k\\+1"):
        call(pipe, num_frames=8)
