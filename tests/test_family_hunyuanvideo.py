"""What is specific to HunyuanVideo: the pipelines' own transformer calls (Llama + CLIP text,
embedded guidance), the I2V conditioning (first-frame latent replaced, Llava reading the first
frame and the caption together, built at cache time with the caption), the flow-matching target
and the flow shift of the checkpoint, and attention over the valid tokens only, equal to
diffusers' masked attention. CPU, offline, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from conftest import write_clips
from test_attention import sdpa_masks
from test_families import FRAMES, PROMPT, cond_image, first_transformer_call, load, random_videos

from finetune.families import ModelSpec, get_family

CLS = get_family("hunyuanvideo")


def image_clip(image) -> torch.Tensor:
    """[1, 3, FRAMES, H, W] in [-1, 1]: ``image`` (PIL) held for every frame."""
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    return pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)


@torch.no_grad()
def test_hunyuanvideo_predict_matches_the_pipeline_call():
    fam = load("hunyuanvideo")
    kwargs, out = first_transformer_call(fam)
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"])
    torch.testing.assert_close(text["pooled_prompt_embeds"], kwargs["pooled_projections"])
    torch.testing.assert_close(text["prompt_attention_mask"].float(), kwargs["encoder_attention_mask"].float())
    # guidance_scale=1.0 in the pipeline call: the embedded guidance training uses
    assert kwargs["guidance"].tolist() == [1000.0] == [1000.0 * fam.train_guidance]
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"], kwargs["timestep"], text, fps=24)
    torch.testing.assert_close(pred, out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_hunyuanvideo_i2v_conditioning_matches_the_pipeline_call():
    """The cached i2v conditioning (the first frame's latent in place of the first latent frame,
    the Llava embedding of the first frame with the caption) is what the pipeline feeds the
    transformer for the same image and prompt."""
    fam = load("hunyuanvideo:i2v")
    kwargs, out = first_transformer_call(fam)
    videos = image_clip(cond_image(CLS))
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents, captions=[PROMPT])
    torch.testing.assert_close(cond["first_latent"], kwargs["hidden_states"][:, :, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["prompt_embeds"], kwargs["encoder_hidden_states"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["prompt_attention_mask"].float(), kwargs["encoder_attention_mask"].float())
    torch.testing.assert_close(cond["pooled_prompt_embeds"], kwargs["pooled_projections"])
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"], kwargs["timestep"], cond, fps=24)
    torch.testing.assert_close(pred, out, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hunyuanvideo_i2v_prompt_embeddings_read_image_and_caption_together():
    fam = load("hunyuanvideo:i2v")
    videos = random_videos(CLS, batch=1)
    other = videos.clone()
    other[:, :, 0] = -other[:, :, 0]
    latents = fam.encode_videos(videos)
    a = fam.encode_conditioning(videos, latents, captions=[PROMPT])
    b = fam.encode_conditioning(other, latents, captions=[PROMPT])
    c = fam.encode_conditioning(videos, latents, captions=["a blue cube"])
    # the caption's tokens attend to the image tokens before them
    assert (a["prompt_embeds"] - b["prompt_embeds"]).abs().max() > 1e-4
    assert (a["prompt_embeds"] - c["prompt_embeds"]).abs().max() > 1e-4
    # without captions only the image latent comes (the caption's image-less embedding stays)
    assert set(fam.encode_conditioning(videos, latents)) == {"first_latent"}


def test_hunyuanvideo_i2v_cache_keys_conditioning_on_the_caption(tmp_path):
    """The conditioning file depends on the caption: a changed caption re-encodes it, and the
    dataset item carries the image-and-caption embeddings, not the caption's image-less ones."""
    from finetune.cache import CacheKey, CachedDataset, build_cache
    from finetune.data import load_manifest

    fam = load("hunyuanvideo:i2v")
    manifest = write_clips(tmp_path / "c", n=1, frames=12, height=32, width=32)
    key = CacheKey("hunyuanvideo", "tiny", None, 9, 32, 32, 8.0, "i2v")
    entries, first = build_cache(fam, load_manifest(manifest), key, tmp_path / "cache", show_progress=False)
    assert (first.latents_computed, first.text_computed) == (1, 1)
    item = CachedDataset(entries)[0]
    caption = load_manifest(manifest)[0].caption
    text_only = fam.encode_prompts([caption])["prompt_embeds"][0]
    assert (item["prompt_embeds"] - text_only).abs().max() > 1e-4
    assert "first_latent" in item and item["first_latent"].shape == (16, 1, 4, 4)

    manifest.write_text(manifest.read_text().replace("number 0", "number zero"))
    _, again = build_cache(fam, load_manifest(manifest), key, tmp_path / "cache", show_progress=False)
    assert (again.latents_computed, again.text_computed) == (1, 1)


def test_hunyuanvideo_target_is_the_flow_velocity_and_i2v_keeps_the_first_frame_clean():
    fam = load("hunyuanvideo")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 2, 2, generator=gen), torch.randn(2, 16, 3, 2, 2, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    n = fam.noisy_input_and_target(x0, noise, sigmas)
    torch.testing.assert_close(n.target, noise - x0)
    torch.testing.assert_close(n.timesteps, sigmas * 1000)
    assert n.loss_mask is None

    i2v = load("hunyuanvideo:i2v")
    first = torch.randn(2, 16, 1, 2, 2, generator=gen)
    n = i2v.noisy_input_and_target(x0, noise, sigmas, {"first_latent": first})
    assert torch.equal(n.noisy[:, :, :1], first)
    assert n.loss_mask[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]


def test_hunyuanvideo_shift_is_the_checkpoints_flow_shift():
    for case in ("hunyuanvideo", "hunyuanvideo:i2v"):
        fam = load(case)
        assert fam.timestep_shift((1, 16, 33, 60, 106)) == fam.components.scheduler.config.shift == 7.0
    u = torch.tensor([0.5])
    assert fam.training_sigmas(u, (1, 16, 3, 4, 4)).item() == pytest.approx(7 * 0.5 / (1 + 6 * 0.5))


def test_hunyuanvideo_wrong_checkpoint_for_the_task_is_named(tmp_path):
    t2v = load("hunyuanvideo")
    with pytest.raises(ValueError, match=r"image_condition_type=None.*set model\.task=t2v.*HunyuanVideo-I2V"):
        CLS(t2v.components, ModelSpec(pretrained="some/t2v", task="i2v"))

    import diffusers

    c = load("hunyuanvideo").components
    c.transformer = diffusers.HunyuanVideoTransformer3DModel(  # patch 1: a 8x-in-space checkpoint
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6))
    with pytest.raises(ValueError, match=r"compresses 8x in space.*assumes 16x and 4x.*hunyuanvideo-community/HunyuanVideo"):
        CLS(c, ModelSpec(pretrained="some/other"))


# --- attention over the valid tokens only (finetune/families/_attention.py) ---
PROMPTS = [PROMPT, "a long prompt: a red door in the rain at night, neon signs reflected in the puddles"]


def masked_attention(transformer) -> None:
    """diffusers' own processors: the [B, 1, 1, S] key mask in the blocks, [B, 1, L, L] in the refiner."""
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.attn.set_processor(HunyuanVideoAttnProcessor2_0())
    for block in transformer.context_embedder.token_refiner.refiner_blocks:
        block.attn.set_processor(AttnProcessor2_0())


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@torch.no_grad()
def test_hunyuanvideo_attention_equals_diffusers_masked_attention(task):
    """Prompts of two lengths in one batch and the padded one alone: the same prediction as
    diffusers' masked attention, tightly in fp32 and within two bf16 steps in bf16; at batch 1
    SDPA gets no mask."""
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        fam = CLS.load(ModelSpec(pretrained=CLS.model_id_for(task), tiny=True, task=task, dtype=dtype))
        videos = random_videos(CLS, batch=2).to(dtype)
        latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
        cond = fam.encode_prompts(PROMPTS)
        cond.update(fam.encode_conditioning(videos, latents, captions=PROMPTS))
        lengths = cond["prompt_attention_mask"].sum(1)
        assert lengths[0] < lengths[1] <= cond["prompt_attention_mask"].shape[1]
        t = torch.tensor([300.0, 700.0])
        tr = fam.components.transformer
        ours = fam.predict(tr, latents, t, cond, fps=24)
        with sdpa_masks() as masks:
            alone = fam.predict(tr, latents[:1], t[:1], {k: v[:1] for k, v in cond.items()}, fps=24)
        assert masks and all(m is None for m in masks)
        masked_attention(tr)
        ref = fam.predict(tr, latents, t, cond, fps=24)
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=f"{dtype} batch of 2")
        torch.testing.assert_close(alone, ref[:1], atol=atol, rtol=0, msg=f"{dtype} batch of 1")
