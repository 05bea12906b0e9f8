"""What is specific to the LongCat-Video family: training calls the transformer as the pipeline's
denoising loop does (t2v, i2v, continuation), the target is ``x0 - noise`` (the model's own
prediction, not diffusers' flow velocity), the released shift, clean conditioning frames out of
the loss, both checkpoint layouts, and named errors for the wrong checkpoint or inputs.
CPU, offline, seeded, tiny models."""

from __future__ import annotations

import diffusers
import pytest
import torch

from finetune.families import ModelSpec, get_family
from finetune.families.longcat_model import frame_timesteps, save_official
from finetune.trainer import masked_mse
from test_families import FRAMES, PROMPT, cond_inputs, load, random_videos, run

CLS = get_family("longcat")


def first_call(fam) -> tuple[tuple, dict, torch.Tensor]:
    """Positional args, keyword args and output of the pipeline's first transformer call (no CFG).
    Copies the tensors: the pipeline updates its latents in place after the call."""
    seen = []
    copy = lambda x: x.clone() if torch.is_tensor(x) else x  # noqa: E731
    hook = fam.components.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((tuple(map(copy, args)), kwargs, out[0])), with_kwargs=True)
    try:
        run(fam, fam.pipeline(), guidance_scale=1.0)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("task, clean", [("t2v", 0), ("i2v", 1), ("continue", 2)])
@torch.no_grad()
def test_predict_matches_the_pipeline_call(task, clean):
    """Same text tensors, per-frame timesteps (clean frames at 0), num_cond_latents and output
    as the pipeline's first step, given the same latents."""
    fam = load(f"longcat:{task}")
    (hidden, timestep, embeds, mask), kwargs, out = first_call(fam)
    assert kwargs["num_cond_latents"] == clean
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], embeds, atol=0, rtol=0)
    assert torch.equal(text["prompt_attention_mask"], mask)
    t = timestep[:, -1]
    assert torch.equal(timestep, frame_timesteps(t, hidden.shape[2], clean))
    cond = {**text, **({"cond_latents": hidden[:, :, :clean]} if clean else {})}
    pred = fam.predict(fam.components.transformer, hidden, t, cond, fps=CLS.default_fps)
    torch.testing.assert_close(pred, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("task, clean", [("i2v", 1), ("continue", 2)])
def test_cached_conditioning_is_the_clips_own_leading_latents(task, clean):
    """The clean frames are the first 1 / cond_frames pixel frames encoded alone (as the
    pipeline encodes an image or the frames to continue); the Wan VAE is causal, so they equal
    the clip's first latent frames, and the noisy input holds them unchanged."""
    fam = load(f"longcat:{task}")
    videos = random_videos(CLS, batch=1)
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    assert cond["cond_latents"].shape[2] == clean == 1 + (fam.task_cond_frames(FRAMES) - 1) // 4
    torch.testing.assert_close(cond["cond_latents"], latents[:, :, :clean], atol=1e-5, rtol=0)
    noised = fam.noisy_input_and_target(latents, torch.randn_like(latents), torch.tensor([0.7]), cond)
    assert torch.equal(noised.noisy[:, :, :clean], cond["cond_latents"])
    assert noised.loss_mask.flatten().tolist() == [0.0] * clean + [1.0] * (latents.shape[2] - clean)


def test_target_is_x0_minus_noise_so_a_perfect_prediction_lands_on_the_clip():
    """The pipeline steps the scheduler with the negated output; one Euler step from sigma s to 0
    with a model that returns the training target reaches x0 exactly. With diffusers' flow target
    (noise - x0) the step would go the other way."""
    fam = load("longcat")
    latents = fam.encode_videos(random_videos(CLS, batch=1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    noised = fam.noisy_input_and_target(latents, noise, sigma)
    torch.testing.assert_close(noised.target, latents - noise)
    assert noised.timesteps.tolist() == pytest.approx([600.0])

    def last_step(model_output):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(sigmas=[0.6])
        return scheduler.step(model_output, scheduler.timesteps[0], noised.noisy, return_dict=False)[0]

    # The pipeline hands the scheduler the negated model output.
    torch.testing.assert_close(last_step(-noised.target), latents, atol=1e-5, rtol=0)
    assert (last_step(-(noise - latents)) - latents).abs().max() > 0.5


def test_shift_is_the_released_schedulers_and_matches_its_sampling_timesteps():
    fam = load("longcat")
    shape = (1, 16, 24, 60, 104)  # 93 frames at 480x832
    assert fam.timestep_shift(shape) == fam.components.scheduler.config.shift == 12.0
    sigmas = torch.linspace(1.0, 0.001, 7)
    scheduler = fam.components.scheduler
    scheduler.set_timesteps(sigmas=sigmas.numpy())
    torch.testing.assert_close(scheduler.timesteps / 1000, fam.shift_sigmas(sigmas, shape), atol=1e-5, rtol=0)
    # Training noise levels: logit-normal through that shift, so most of them are high.
    train = fam.training_sigmas(torch.linspace(0.01, 0.99, 99), shape)
    assert train.median() == pytest.approx(12 * 0.5 / (1 + 11 * 0.5), abs=1e-3)


@torch.no_grad()
def test_continuation_frames_are_out_of_the_loss_and_steer_the_prediction():
    fam = load("longcat:continue")
    videos = random_videos(CLS, batch=1)
    latents = fam.encode_videos(videos)
    cond = {**fam.encode_prompts([PROMPT]), **fam.encode_conditioning(videos, latents)}
    k = cond["cond_latents"].shape[2]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noised = fam.noisy_input_and_target(latents, noise, torch.tensor([0.8]), cond)
    pred = fam.predict(fam.components.transformer, noised.noisy, noised.timesteps, cond, CLS.default_fps)
    loss = masked_mse(pred, noised.target, noised.loss_mask)
    off = pred.clone()
    off[:, :, :k] += 10.0  # anything on the clean frames is free
    assert masked_mse(off, noised.target, noised.loss_mask) == loss
    off[:, :, k:] += 0.1
    assert masked_mse(off, noised.target, noised.loss_mask) != loss
    # The second conditioning frame (only continuation has one) reaches the generated frames.
    other = {**cond, "cond_latents": cond["cond_latents"].clone()}
    other["cond_latents"][:, :, 1] = -other["cond_latents"][:, :, 1]
    n2 = fam.noisy_input_and_target(latents, noise, torch.tensor([0.8]), other)
    pred2 = fam.predict(fam.components.transformer, n2.noisy, n2.timesteps, other, CLS.default_fps)
    assert (pred2[:, :, k:] - pred[:, :, k:]).abs().max() > 1e-4


def test_conditioning_frames_must_leave_frames_to_generate():
    fam = CLS.load(ModelSpec(pretrained="x", tiny=True, task="continue", cond_frames=9))
    videos = random_videos(CLS, batch=1)
    with pytest.raises(ValueError, match="9 conditioning frames must be 4k\\+1 and fewer than the clip's 9"):
        fam.encode_conditioning(videos, fam.encode_videos(videos))


def test_the_official_layout_loads(tmp_path):
    """The released repo's folders: dit/ in the official key names, vae/, text_encoder/,
    tokenizer/, scheduler/."""
    tiny = load("longcat")
    c = tiny.components
    save_official(c.transformer, tmp_path / "dit")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(c, name).save_pretrained(tmp_path / name)
    spec = ModelSpec(pretrained=str(tmp_path))
    assert CLS.transformer_subfolder(spec) == "dit"
    fam = CLS.load(spec)
    for part in c.modules():
        got, want = (getattr(f.components, part).state_dict() for f in (fam, tiny))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    assert fam.encode_prompts([PROMPT])["prompt_embeds"].shape[1] == CLS.max_sequence_length


def test_official_layout_converts_once_for_quantised_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    tiny = load("longcat")
    save_official(tiny.components.transformer, tmp_path / "repo" / "dit")
    spec = ModelSpec(pretrained=str(tmp_path / "repo"))
    folder = CLS.convert_official(spec)
    assert (folder / "config.json").is_file() and folder.is_relative_to(tmp_path / "cache")
    assert CLS.convert_official(spec) == folder  # reused
    again = type(tiny.components.transformer).from_pretrained(str(folder))
    want = tiny.components.transformer.state_dict()
    assert all(torch.equal(again.state_dict()[k], want[k]) for k in want)


def test_a_wan_checkpoint_is_named_as_such(tmp_path):
    load("wan").pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="WanTransformer3DModel .*family wan.*meituan-longcat/LongCat-Video"):
        CLS.load(ModelSpec(pretrained=str(tmp_path)))


def test_a_vae_with_other_compression_is_rejected():
    tiny = load("longcat")
    c = tiny.components
    c.vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, False, True], scale_factor_temporal=2)
    with pytest.raises(ValueError, match="16x in space and 2x in time.*assumes 16x, 4x"):
        CLS(c, tiny.spec)


def test_recipe_checks_the_conditioning_frames():
    from finetune.config import recipe_from_dict
    from finetune.errors import RecipeError

    def problems(model, frames=9):
        data = {"model": {"family": "longcat", "tiny": True, **model}, "data": {"frames": frames, "height": 32,
                                                                                 "width": 32}}
        try:
            recipe_from_dict(data)
        except RecipeError as e:
            return "\n".join(e.problems)
        return ""

    assert problems({"task": "continue", "cond_frames": 5}) == ""
    assert "model.cond_frames=6 must be 4k+1 for longcat (try 5)" in problems({"task": "continue", "cond_frames": 6})
    assert "must be fewer than data.frames=9" in problems({"task": "continue", "cond_frames": 9})
    assert "longcat's default of 13 conditioning frames (13) must be fewer" in problems({"task": "continue"})
    assert "only the continue task" in problems({"task": "i2v", "cond_frames": 5})


def test_render_inputs_are_checked_against_the_task(tmp_path):
    from finetune.errors import UserError
    from finetune.inference import RenderArgs, complete_args

    info = type("Info", (), {"recipe": {"data": {"frames": 9, "height": 32, "width": 32}}})()
    fam = load("longcat:continue")
    with pytest.raises(UserError, match="--video PATH is required.*model.task=continue"):
        complete_args(RenderArgs(prompt="p"), fam, info)
    with pytest.raises(UserError, match="--image: .*model.task=continue and takes no conditioning image; drop --image "
                                        "and pass --video PATH"):
        complete_args(RenderArgs(prompt="p", image="x.png", video="v.mp4"), fam, info)
    with pytest.raises(UserError, match="--video .*: file not found"):
        complete_args(RenderArgs(prompt="p", video=tmp_path / "missing.mp4"), fam, info)
    short = cond_inputs(fam)["video"][:3]
    with pytest.raises(UserError, match="--video has 3 frames.*last 5"):
        fam.pipeline_call_kwargs(8.0, video=short)
    i2v = load("longcat:i2v")
    with pytest.raises(UserError, match="--video: .*model.task=i2v.*drop --video and pass --image PATH"):
        complete_args(RenderArgs(prompt="p", image="x.png", video="v.mp4"), i2v, info)


def test_a_continuation_run_samples_from_clip_starts_and_exports_the_official_names(clips, tmp_path):
    """Validation samples of a continue run continue the first cond_frames of a training clip;
    the run folder also holds the adapter in the official module names (the ComfyUI file, fused
    qkv), which maps back to it exactly; infer.py's machinery continues a video file with it
    unfused, merged and merged-then-reloaded."""
    from safetensors.torch import load_file

    from conftest import tiny_recipe
    from finetune import trainer
    from finetune.lora_formats import read_lora
    from finetune.video import probe_frames

    recipe = tiny_recipe("longcat:continue", clips, tmp_path / "run", "optim.steps=2", "checkpoint.every=0",
                         "lora.alpha=16", "validation.prompts=[mystyle a square]", "validation.steps=2")
    trainer.train(recipe)
    run_dir = tmp_path / "run"
    assert probe_frames(run_dir / "samples" / "step-00000002-0.mp4")[:3] == (9, 32, 32)
    ours = load_file(str(run_dir / "pytorch_lora_weights.safetensors"))
    official = load_file(str(run_dir / "comfyui_lora.safetensors"))
    assert any(k.startswith("diffusion_model.blocks.0.attn.qkv.") for k in official)
    assert all(k.startswith("diffusion_model.blocks.") for k in official)
    back = read_lora(run_dir / "comfyui_lora.safetensors", CLS.comfyui_key_map())
    assert {f"transformer.{k}" for k in back.peft_state_dict()} == set(ours)
    assert {m.alpha for m in back.modules.values()} == {16.0}  # alpha 16 / rank 8, as trained
    for key, value in back.peft_state_dict().items():
        torch.testing.assert_close(value, ours[f"transformer.{key}"])

    # infer.py's path: continue a video with the adapter unfused, merged, and merged-then-saved.
    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render

    refs = [LoraRef(run_dir, 1.0)]
    cpu = torch.device("cpu")
    outputs = []
    for merge in (False, True):
        family, info = load_base(refs, None, cpu, torch.float32)
        args = complete_args(RenderArgs(prompt="mystyle, a square", steps=2, guidance=1.0, seed=3,
                                        video=clips.parent / "clip000.mp4"), family, info)
        pipe = family.pipeline()
        apply_loras(family, refs, merge=merge)
        outputs.append(render(family, pipe, args))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    pipe.save_pretrained(str(tmp_path / "merged"))
    merged = CLS.load(ModelSpec(pretrained=str(tmp_path / "merged"), task="continue", cond_frames=5))
    torch.testing.assert_close(render(merged, merged.pipeline(), args), outputs[1], atol=1e-6, rtol=0)


def test_bf16_load_keeps_the_vae_and_the_fp32_layers_in_float32(tmp_path):
    load("longcat").pipeline().save_pretrained(tmp_path)
    fam = CLS.load(ModelSpec(pretrained=str(tmp_path), dtype=torch.bfloat16))
    c = fam.components
    assert c.vae.dtype == torch.float32 and c.text_encoder.dtype == torch.bfloat16
    assert c.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert c.transformer.proj_out.weight.dtype == torch.float32  # computed in fp32, as the official model
    latents = fam.encode_videos(random_videos(CLS, batch=1))
    with torch.no_grad():
        pred = fam.predict(c.transformer, latents, torch.tensor([500.0]), fam.encode_prompts([PROMPT]), 15)
    assert pred.shape == latents.shape and pred.dtype == torch.float32


def test_the_pipeline_loads_an_official_format_lora(tmp_path):
    """The official LoRA format (what the original code and the released LoRAs use) loads
    through the pipeline's load_lora_weights and renders what the diffusers file renders."""
    from safetensors.torch import load_file, save_file

    from finetune.families.longcat_model import peft_lora_to_official
    from test_families import add_loras, fake_training, save_adapter_files

    fam = load("longcat")
    add_loras(fam, rank=4, alpha=8)
    fake_training(fam.components.transformer)
    trained = run(fam, fam.pipeline())
    ours = load_file(save_adapter_files(fam, tmp_path)["transformer"])
    save_file(peft_lora_to_official(ours, scale=8 / 4), str(tmp_path / "official.safetensors"))
    fresh = load("longcat")
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(tmp_path / "official.safetensors"), adapter_name="official")
    torch.testing.assert_close(run(fresh, pipe), trained, atol=1e-5, rtol=0)
