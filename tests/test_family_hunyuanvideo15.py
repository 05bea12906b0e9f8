"""What is specific to HunyuanVideo-1.5: training calls the transformer as the diffusers pipelines
do (concat channels, three context streams), the official timestep sampling and shift
(Tencent-Hunyuan/HunyuanVideo-1.5 train.py), a target over every latent frame, the pipelines
taking the common call arguments, the wrong-checkpoint error, and attention over the valid
tokens only (no dense mask, no fully masked row) equal to diffusers' masked attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from finetune.families import ModelSpec, get_family
from test_attention import cudnn_fully_masked_row_bug, largest_bool_tensor, sdpa_masks
from test_families import FRAMES, PROMPT, add_lora, cond_image, first_transformer_call, load, random_videos, run

NAME = "hunyuanvideo15"


@torch.no_grad()
def test_predict_matches_the_pipeline_call():
    fam = load(NAME)
    kwargs, out = first_transformer_call(fam)
    latent = fam.components.vae.config.latent_channels
    # t2v: zero conditioning latents and mask, zero image tokens (masked out by the transformer)
    assert not kwargs["hidden_states"][:, latent:].any() and not kwargs["image_embeds"].any()
    text = fam.encode_prompts([PROMPT])
    pairs = [("prompt_embeds", "encoder_hidden_states"), ("prompt_embeds_mask", "encoder_attention_mask"),
             ("prompt_embeds_2", "encoder_hidden_states_2"), ("prompt_embeds_mask_2", "encoder_attention_mask_2")]
    for ours, theirs in pairs:
        torch.testing.assert_close(text[ours], kwargs[theirs], atol=0, rtol=0, msg=ours)
    noisy = kwargs["hidden_states"][:, :latent]
    pred = fam.predict(fam.components.transformer, noisy, kwargs["timestep"], text, fps=24)
    torch.testing.assert_close(pred, out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_i2v_conditioning_matches_the_pipeline_call():
    """The cached conditioning (first-frame latent + mask channels, SigLIP tokens) is what the I2V
    pipeline feeds the transformer for the same image."""
    fam = load(f"{NAME}:i2v")
    kwargs, out = first_transformer_call(fam)
    image = cond_image(get_family(NAME))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = fam.encode_conditioning(videos, latents)
    c = latents.shape[1]
    torch.testing.assert_close(cond["condition"], kwargs["hidden_states"][:, c:], atol=1e-5, rtol=0)
    assert cond["condition"][:, -1, 0].eq(1).all() and not cond["condition"][:, :, 1:].any()
    torch.testing.assert_close(cond["image_embeds"], kwargs["image_embeds"], atol=1e-5, rtol=0)
    cond.update(fam.encode_prompts([PROMPT]))
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"][:, :c], kwargs["timestep"], cond, fps=24)
    torch.testing.assert_close(pred, out, atol=1e-5, rtol=0)


def test_timesteps_are_the_official_lognorm_with_training_shift_3():
    """train.py: t = sigmoid(N(0, 1)) * (1 - 2e-5) + 1e-5, then shift 3 (train_timestep_shift), at
    every size: not the sampling flow shift of the scheduler (5 at 480p)."""
    fam = load(NAME)
    for shape in [(1, 32, 31, 30, 53), (1, 32, 9, 45, 80)]:  # 121 frames at 848x480, 33 at 1280x720
        assert fam.timestep_shift(shape) == 3.0
    assert fam.components.scheduler.config.shift == 5.0
    u = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    z = torch.distributions.Normal(0.0, 1.0).icdf(u.double())
    t = 1.0 / (1.0 + torch.exp(-z)) * (1 - 2e-5) + 1e-5  # TimestepSampler.sample, lognorm (before * T)
    official = 3.0 * t / (1 + 2.0 * t)  # timestep_transform(shift=3)
    got = fam.training_sigmas(u, (1, 32, 31, 30, 53))
    torch.testing.assert_close(got, official.float(), atol=1e-6, rtol=0)
    assert torch.all(got[1:] > got[:-1])


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_target_is_velocity_over_every_frame(task):
    """train.py regresses noise - x0 on all latents, the first frame of i2v included: the image
    enters through the concat channels, so the noisy input's first frame is noised too (a
    clean-first-frame scheme like Wan 2.2 TI2V would fail here)."""
    fam = load(f"{NAME}:{task}")
    videos = random_videos(get_family(NAME), batch=1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = fam.encode_conditioning(videos, latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noised = fam.noisy_input_and_target(latents, noise, torch.tensor([0.6]), cond)
    assert noised.loss_mask is None
    torch.testing.assert_close(noised.target, noise - latents)
    torch.testing.assert_close(noised.noisy, 0.4 * latents + 0.6 * noise)
    torch.testing.assert_close(noised.timesteps, torch.tensor([600.0]))


def test_latents_are_scaled_posterior_samples():
    """encode_vae in train.py: a posterior sample times scaling_factor (no shift)."""
    fam = load(NAME)
    vae = fam.components.vae
    videos = random_videos(get_family(NAME), batch=1)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dist = vae.encode(videos).latent_dist
    expected = dist.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    assert 0.5 < latents.std() < 2.0  # the tiny VAE's scaling factor is calibrated


def test_glyph_text_goes_to_byt5_only_when_quoted():
    fam = load(NAME)
    text = fam.encode_prompts([PROMPT, 'a shop sign that reads "OPEN"'])
    assert text["prompt_embeds_mask_2"][0].sum() == 0 and not text["prompt_embeds_2"][0].any()
    assert text["prompt_embeds_mask_2"][1].sum() > 0


def test_pipelines_take_the_common_call_arguments(tmp_path):
    """guidance_scale for one call only (the guider keeps its own), i2v at the requested size, and
    a saved folder that names diffusers' own pipeline class."""
    fam = load(f"{NAME}:i2v")
    pipe = fam.pipeline()
    scale = pipe.guider.guidance_scale
    size = 2 * get_family(NAME).spatial_factor
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPT, image=cond_image(get_family(NAME)), num_frames=FRAMES, height=size,
                  width=2 * size, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=fam.text_len,
                  output_type="pt").frames
    assert frames.shape[-2:] == (size, 2 * size)
    assert pipe.guider.guidance_scale == scale
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideo15ImageToVideoPipeline"


def test_wrong_checkpoint_is_named():
    cls = get_family(NAME)
    spec = ModelSpec(pretrained="some/other-model", tiny=True)
    components = cls.build_tiny()
    components.vae.spatial_compression_ratio = 8  # a checkpoint whose VAE x patch compresses 8x
    with pytest.raises(ValueError, match=r"hunyuanvideo15: .* 8x in space.*HunyuanVideo-1.5-Diffusers-480p_t2v"):
        cls(components, spec)
    components = cls.build_tiny()
    components.transformer.register_to_config(in_channels=16)
    with pytest.raises(ValueError, match=r"maps 16 -> 8 channels, but HunyuanVideo-1.5 takes 17"):
        cls(components, spec)


# --- attention over the valid tokens only (finetune/families/_attention.py) ---
# A short prompt (padded Qwen tokens, no byT5 tokens) and one that fills the Qwen tokens and quotes
# text for byT5: two valid lengths in one batch.
PROMPTS = [PROMPT, 'a long prompt: a shop sign that reads "OPEN" over a red door in the rain, at night']


def masked_attention(transformer) -> None:
    """diffusers' own processors: the dense [B, 1, S, S] mask in the blocks, the [B, 1, L, L] one
    in the token refiner."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(HunyuanVideo15AttnProcessor2_0())
    for block in transformer.context_embedder.token_refiner.refiner_blocks:
        block.attn.set_processor(AttnProcessor2_0())


def tiny(task: str = "t2v", dtype: torch.dtype = torch.float32):
    cls = get_family(NAME)
    return cls.load(ModelSpec(pretrained=cls.model_id_for(task), tiny=True, task=task, dtype=dtype))


def inputs(fam, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(noisy latents [B, C, f, h, w], timesteps [B], cond) for len(prompts) clips."""
    videos = random_videos(get_family(NAME), batch=len(prompts)).to(fam.spec.dtype)
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = {**fam.encode_conditioning(videos, latents), **fam.encode_prompts(prompts)}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)).to(latents)
    return 0.5 * (latents + noise), torch.linspace(300.0, 700.0, len(prompts)), cond


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@torch.no_grad()
def test_attention_equals_diffusers_masked_attention(task):
    """The prediction with our processors equals diffusers' masked computation: a batch of two
    prompts of different lengths (each sample attends over its own valid tokens) and the padded
    one alone, tightly in fp32 and within two bf16 steps in bf16."""
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        fam = tiny(task, dtype)
        latents, t, cond = inputs(fam, PROMPTS)
        assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"].shape[1]  # padded
        tr = fam.components.transformer
        ours = fam.predict(tr, latents, t, cond, fps=24)
        alone = fam.predict(tr, latents[:1], t[:1], {k: v[:1] for k, v in cond.items()}, fps=24)
        masked_attention(tr)
        ref = fam.predict(tr, latents, t, cond, fps=24)
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=f"{dtype} batch of 2")
        torch.testing.assert_close(alone, ref[:1], atol=atol, rtol=0, msg=f"{dtype} batch of 1")


def test_no_mask_reaches_sdpa_and_no_dense_mask_is_built():
    """Batch 1 with a padded prompt through predict, and the pipeline (classifier-free guidance,
    an empty negative prompt): SDPA never gets a mask in the transformer, and no bool tensor of
    S x S elements (S: video plus text tokens) is made. diffusers' processors do both."""
    fam = load(NAME)
    tr = fam.components.transformer
    latents, t, cond = inputs(fam, PROMPTS[:1])
    tokens = latents[0, 0].numel() + fam.text_len + fam.byt5_len + fam.vision_tokens
    with torch.no_grad():
        def predict():
            return fam.predict(tr, latents, t, cond, fps=24)

        with sdpa_masks() as masks:
            largest = largest_bool_tensor(predict)
        assert masks and all(m is None for m in masks)
        assert largest < tokens * tokens

        calls = []
        hooks = [tr.register_forward_pre_hook(lambda *_: calls.append([len(masks)])),
                 tr.register_forward_hook(lambda *_: calls[-1].append(len(masks)))]
        try:
            with sdpa_masks() as masks:
                run(fam, fam.pipeline(), steps=1)
        finally:
            for h in hooks:
                h.remove()
        assert len(calls) == 2  # conditional and unconditional
        assert all(m is None for a, b in calls for m in masks[a:b])

        masked_attention(tr)
        with sdpa_masks() as masks:
            largest = largest_bool_tensor(predict)
        assert any(m is not None for m in masks) and largest >= tokens * tokens


@pytest.mark.parametrize("batch", [1, 2])
def test_padded_prompts_give_finite_bf16_gradients(batch):
    """bf16 on a CPU, LoRA on the default targets, padded prompts: a finite loss and finite LoRA
    gradients, also with SDPA's backward behaving as cuDNN's does on H100/H200 (NaN grad_q rows
    for fully masked queries, pytorch/pytorch#196678), which turns diffusers' masked computation
    NaN: the failure of the first GPU run."""
    fam = tiny("t2v", torch.bfloat16)
    tr = fam.components.transformer
    add_lora(tr, get_family(NAME))
    latents, t, cond = inputs(fam, PROMPTS[:batch])

    def lora_grads(bug: bool) -> list[torch.Tensor]:
        tr.zero_grad()
        with cudnn_fully_masked_row_bug() if bug else torch.enable_grad():
            loss = fam.predict(tr, latents, t, cond, fps=24).float().square().mean()
            loss.backward()
        assert loss.isfinite()
        return [p.grad for n, p in tr.named_parameters() if "lora_" in n]

    for bug in (False, True):
        grads = lora_grads(bug)
        assert grads and all(g is not None and g.isfinite().all() for g in grads), f"bug emulated: {bug}"
    masked_attention(tr)
    assert not all(g.isfinite().all() for g in lora_grads(True))
