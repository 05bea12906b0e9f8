"""LongCatVideoPipeline on tiny random components (Wan VAE, umT5, LongCat transformer):
T2V, I2V and continuation render frames of the right shape, and conditioning latents stay
clean through sampling. CPU, offline, seeded."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from finetune.families._tiny import tiny_t5_encoder_config, tiny_t5_tokenizer
from finetune.families.longcat_model import LongCatVideoTransformer3DModel
from finetune.families.longcat_pipeline import LongCatVideoPipeline, cfg_zero_star

SIZE, FRAMES, TEXT_LEN = 32, 9, 16


@pytest.fixture(scope="module")
def pipe() -> LongCatVideoPipeline:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer(model_max_length=TEXT_LEN)
    text_encoder = transformers.UMT5EncoderModel(tiny_t5_encoder_config(transformers.UMT5Config, tokenizer))
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    transformer = LongCatVideoTransformer3DModel(in_channels=16, out_channels=16, hidden_size=32, depth=1,
                                                 num_heads=2, caption_channels=32, adaln_tembed_dim=16,
                                                 frequency_embedding_size=32, text_tokens_zero_pad=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)
    p = LongCatVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=scheduler)
    p.set_progress_bar_config(disable=True)
    return p


def render(pipe, steps: int = 2, **kw):
    kw = {**dict(prompt="a red ball", num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                 max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(0)), **kw}
    return pipe(**kw).frames


def image(seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("task", ["t2v", "i2v", "continuation"])
def test_renders_frames_of_the_right_shape(pipe, task):
    cond = {"t2v": {}, "i2v": {"image": image()}, "continuation": {"video": [image(i) for i in range(5)]}}[task]
    frames = render(pipe, output_type="pt", **cond)
    assert frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert torch.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.parametrize("task, clean", [("i2v", 1), ("continuation", 2)])
def test_conditioning_latents_stay_clean(pipe, task, clean):
    cond = {"image": image()} if task == "i2v" else {"video": [image(i) for i in range(5)], "num_cond_frames": 5}
    short = render(pipe, steps=2, output_type="latent", **cond)
    long = render(pipe, steps=3, output_type="latent", **cond)
    assert short.shape == (1, 16, 3, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(short[:, :, :clean], long[:, :, :clean], atol=0, rtol=0)
    assert (short[:, :, clean:] - long[:, :, clean:]).abs().max() > 1e-4


def test_guidance_changes_the_result_and_reports_bad_input(pipe):
    a = render(pipe, output_type="latent", guidance_scale=1.0)
    b = render(pipe, output_type="latent", guidance_scale=4.0, negative_prompt="blurry")
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="multiples of 16"):
        render(pipe, height=24)
    with pytest.raises(ValueError, match="num_frames=8"):
        render(pipe, num_frames=8)
    with pytest.raises(ValueError, match="not both"):
        render(pipe, image=image(), video=[image()])


def test_cfg_zero_star_is_plain_cfg_when_branches_align():
    uncond = torch.randn(2, 3, 4)
    cond = 2 * uncond  # st* = 2: the rescaled unconditional branch equals the conditional one
    torch.testing.assert_close(cfg_zero_star(cond, uncond, 5.0), cond)
