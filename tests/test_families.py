"""Model families on their tiny random builds: determinism, shapes, and the LoRA invariants of
diffusers' tests/lora/utils.py (an adapter changes the output, save then load reproduces it,
fused equals unfused, unloading restores the base), with adapters added exactly as the trainer
adds them. CPU, offline, seeded."""

from __future__ import annotations

import peft
import pytest
import torch

from finetune.families import ModelSpec, family_names, get_family

# Every registered family and task: a family added later is tested without new code here.
FAMILIES = family_names()
CASES = [f"{name}:{task}" for name in FAMILIES for task in get_family(name).tasks]
PROMPT = "a red ball bouncing"
FRAMES = 9  # 4k+1 and 8k+1


def clip_frames(cls) -> int:
    """The tiny clip length of ``cls``: FRAMES, or the longest valid count below it (7 for 6k+1)."""
    return cls.frame_rule.floor(FRAMES)



def load(case: str, seed: int = 0):
    """The tiny model of ``case`` ("family" or "family:task")."""
    name, _, task = case.partition(":")
    cls = get_family(name)
    task = task or cls.tasks[0]
    return cls.load(ModelSpec(pretrained=cls.model_id_for(task), tiny=True, tiny_seed=seed, task=task))


def family_of(case: str):
    return get_family(case.partition(":")[0])


def transformers_of(fam) -> list:
    """Every expert's transformer (one for most families)."""
    return [getattr(fam.components, e.attr) for e in fam.experts()]


def cond_image(cls):
    """A fixed conditioning image (PIL) at the tiny clip size, for i2v pipelines."""
    from PIL import Image

    size = clip_size(cls)
    gen = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy())


def cond_video(cls, frames: int) -> list:
    """``frames`` fixed frames (PIL) at the tiny clip size: the video a continuation continues."""
    from PIL import Image

    size = clip_size(cls)
    gen = torch.Generator().manual_seed(6)
    pixels = (torch.rand(frames, size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def cond_inputs(fam) -> dict:
    """What the pipeline call of ``fam``'s task needs besides the prompt (image, video, nothing)."""
    kind = fam.task_input(fam.task)
    if kind == "image":
        return {"image": cond_image(type(fam))}
    if kind == "video":
        return {"video": cond_video(type(fam), fam.cond_frames)}
    return {}


def clip_size(cls) -> int:
    """Smallest frame side giving a 2x2 token grid."""
    return 2 * cls.spatial_factor


def add_lora(transformer, cls, rank: int = 4, alpha: int = 4, seed: int = 0) -> None:
    """Adapter added as the trainer adds it; peft draws lora_A from the global RNG, so seed it."""
    torch.manual_seed(seed)
    transformer.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                            target_modules=list(cls.default_lora_targets)))


def add_loras(fam, rank: int = 4, alpha: int = 4) -> None:
    for i, tr in enumerate(transformers_of(fam)):
        add_lora(tr, type(fam), rank, alpha, seed=i)


@torch.no_grad()
def fake_training(transformer, seed: int = 1, std: float = 0.3) -> None:
    """Random non-zero lora_B, as a few optimiser steps would leave it."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_modules(transformer) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


def run(fam, pipe, steps: int = 2, **kw) -> torch.Tensor:
    """Frames [1, F, 3, H, W] in [0, 1] from a tiny seeded pipeline call."""
    size = clip_size(type(fam))
    pipe.set_progress_bar_config(disable=True)
    kw = {**fam.pipeline_call_kwargs(type(fam).default_fps, **cond_inputs(fam)), **kw}
    return pipe(prompt=PROMPT, num_frames=clip_frames(type(fam)), height=size, width=size, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames


def random_videos(cls, batch: int = 2) -> torch.Tensor:
    size = clip_size(cls)
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, clip_frames(cls), size, size, generator=gen) * 2 - 1


def encoded(fam, videos):
    """(latents, cond) as the cache stores them: latents, then the task's conditioning."""
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    return latents, fam.encode_conditioning(videos, latents)


def test_the_first_families_are_registered():
    assert {"wan", "ltx"} <= set(FAMILIES)


# --- 1. determinism ---
@pytest.mark.parametrize("name", CASES)
def test_tiny_build_is_deterministic_per_seed(name):
    a, b, c = load(name, 0), load(name, 0), load(name, 1)
    for part in a.components.modules():
        sa, sb, sc = (getattr(f.components, part).state_dict() for f in (a, b, c))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name}: same seed gave a different {part}"
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), f"{name}: seeds 0 and 1 gave the same {part}"


@pytest.mark.parametrize("name", CASES)
def test_tiny_transformer_has_no_all_zero_parameters(name):
    for tr in transformers_of(load(name)):
        zero = [n for n, p in tr.named_parameters() if not p.any()]
        assert zero == []


# --- 2. shapes ---
@pytest.mark.parametrize("name", CASES)
def test_encode_and_predict_shapes_follow_the_family_rules(name):
    cls = family_of(name)
    fam = load(name)
    videos = random_videos(cls)
    latents, cond = encoded(fam, videos)
    b, ch, f, h, w = latents.shape
    config = transformers_of(fam)[0].config  # Kandinsky 5 calls it out_visual_dim
    assert (b, ch) == (2, config.get("out_channels", config.get("out_visual_dim")))
    assert all(v.shape[0] == 2 for v in cond.values())
    assert f == (clip_frames(cls) - 1) // cls.frame_rule.temporal_factor + 1
    vae_factor = videos.shape[-1] // w
    assert videos.shape[-2] == h * vae_factor and cls.spatial_factor % vae_factor == 0
    vae = fam.components.vae
    # timestep-conditioned decoders (LTX-Video 0.9.1+) need the decode timestep
    extra = {"temb": torch.zeros(b)} if getattr(vae.config, "timestep_conditioning", False) else {}
    with torch.no_grad():  # the latent grid is the VAE's: decoding gives the clip's shape back
        assert vae.decode(latents, **extra).sample.shape == videos.shape

    text = fam.encode_prompts([PROMPT, "b"])
    assert "prompt_embeds" in text and text["prompt_embeds"].ndim == 3
    assert all(v.shape[0] == 2 for v in text.values())

    sigmas = torch.tensor([0.2, 0.9])
    shifted = fam.shift_sigmas(sigmas, latents.shape)
    noised = fam.noisy_input_and_target(latents, torch.randn_like(latents), shifted, {**text, **cond})
    with torch.no_grad():
        pred = fam.predict(transformers_of(fam)[0], noised.noisy, noised.timesteps, {**text, **cond}, cls.default_fps)
    assert pred.shape == latents.shape == noised.target.shape == noised.noisy.shape


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_clip_shape_is_rejected_with_a_fix(name):
    cls = get_family(name)
    fam = load(name)
    size = clip_size(cls)
    with pytest.raises(ValueError, match=r"try \d+"):
        fam.encode_videos(torch.zeros(1, 3, clip_frames(cls) + 1, size, size))
    with pytest.raises(ValueError, match=f"multiple of {cls.spatial_factor}"):
        fam.encode_videos(torch.zeros(1, 3, clip_frames(cls), size + 8, size))


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_attention_at_batch_1_gets_no_dense_mask_and_no_fully_masked_row(name):
    """One clip with a padded prompt: any mask SDPA gets inside the transformers is a key mask
    (one row broadcast over the queries, never [.., S, S]) and leaves every query a key to see
    (a fully masked row is what cuDNN's SDPA backward turns NaN on H100/H200,
    pytorch/pytorch#196678). The memory planner traces without masks; this keeps them small."""
    from test_attention import sdpa_masks

    cls = family_of(name)
    fam = load(name)
    latents, cond = encoded(fam, random_videos(cls, batch=1))
    cond = {**fam.encode_prompts([PROMPT]), **cond}
    noised = fam.noisy_input_and_target(latents, torch.randn_like(latents), torch.tensor([0.5]), cond)
    with sdpa_masks() as masks:
        for tr in transformers_of(fam):
            fam.predict(tr, noised.noisy, noised.timesteps, cond, cls.default_fps)
    assert len(masks) > 0
    for mask in (m for m in masks if m is not None):
        assert mask.shape[-2] == 1, f"{name}: a per-query mask {tuple(mask.shape)} reaches SDPA"
        # bool: True = attend; additive: diffusers writes -10000 (or -inf) on masked keys
        allowed = mask if mask.dtype == torch.bool else mask > -1e4
        assert allowed.any(dim=-1).all(), f"{name}: a fully masked row in {tuple(mask.shape)}"


# --- 3. gradients reach every LoRA layer ---
def lora_grads(fam, cls, tr=None) -> dict[str, tuple[float, float]]:
    """Per adapted module of ``tr`` (default: the first expert): (|grad lora_A|, |grad lora_B|)
    after one denoising-loss backward, through the family's noisy input, target and mask."""
    from finetune.trainer import masked_mse

    tr = tr if tr is not None else transformers_of(fam)[0]
    tr.zero_grad(set_to_none=True)
    latents, cond = encoded(fam, random_videos(cls))
    cond = {**fam.encode_prompts([PROMPT, "b"]), **cond}
    gen = torch.Generator().manual_seed(0)
    sigmas = fam.shift_sigmas(torch.tensor([0.3, 0.8]), latents.shape)
    noised = fam.noisy_input_and_target(latents, torch.randn(latents.shape, generator=gen), sigmas, cond)
    pred = fam.predict(tr, noised.noisy, noised.timesteps, cond, cls.default_fps)
    masked_mse(pred, noised.target, noised.loss_mask).backward()
    return {n: (m.lora_A["default"].weight.grad.abs().sum().item(), m.lora_B["default"].weight.grad.abs().sum().item())
            for n, m in lora_modules(tr).items()}


@pytest.mark.parametrize("name", CASES)
def test_only_lora_is_trainable_and_every_lora_layer_gets_gradients(name):
    cls = family_of(name)
    fam = load(name)
    for tr in transformers_of(fam):
        add_lora(tr, cls)
        trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        modules = lora_modules(tr)
        for target in cls.default_lora_targets:
            assert any(n.endswith("." + target) for n in modules), f"{name}: no module matches LoRA target {target!r}"

        # Step one of training: lora_B is zero, so only B can get a gradient, and it must, everywhere.
        grads = lora_grads(fam, cls, tr)
        assert [n for n, (_, gb) in grads.items() if gb == 0] == []
        # Later steps: with B non-zero, A and B get gradients in every adapted module.
        fake_training(tr)
        grads = lora_grads(fam, cls, tr)
        assert [n for n, (ga, gb) in grads.items() if ga == 0 or gb == 0] == []


@pytest.mark.parametrize("name", CASES)
def test_gradient_checkpointing_keeps_lora_gradients(name):
    cls = family_of(name)
    grads = []
    for checkpointing in (False, True):
        fam = load(name)
        tr = transformers_of(fam)[0]
        add_lora(tr, cls)
        fake_training(tr)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()  # the trainer's mode; checkpointing only acts with grad enabled
        grads.append(lora_grads(fam, cls))
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8, msg=n)


# --- 4-6. LoRA invariants on the pipeline output ---
def save_adapter_files(fam, folder) -> dict[str, str]:
    """Each expert's adapter written as the trainer writes it; attr -> file path."""
    from safetensors.torch import save_file

    from finetune.export import adapter_file_name, lora_file_contents

    paths = {}
    for e in fam.experts():
        tensors, metadata = lora_file_contents(getattr(fam.components, e.attr))
        paths[e.attr] = str(folder / adapter_file_name(e.attr))
        save_file(tensors, paths[e.attr], metadata=metadata)
    return paths


@pytest.mark.parametrize("name", CASES)
def test_lora_changes_output_and_save_load_fuse_unload_behave(name, tmp_path):
    base_fam = load(name)
    base = run(base_fam, base_fam.pipeline())

    # alpha != rank, so a lost lora_alpha would change the scale (2 -> 1) and the output.
    fam = load(name)
    add_loras(fam, rank=4, alpha=8)
    for tr in transformers_of(fam):
        fake_training(tr)
    trained = run(fam, fam.pipeline())
    assert trained.shape == base.shape
    assert (trained - base).abs().max() > 1e-3, f"{name}: a trained adapter did not change the output"
    paths = save_adapter_files(fam, tmp_path)

    # Our loader (transformer level, every family and expert).
    fresh = load(name)
    for e in fresh.experts():
        fresh.load_adapter(paths[e.attr], e, "x")
        config = getattr(fresh.components, e.attr).peft_config["x"]
        assert (config.r, config.lora_alpha) == (4, 8)
    pipe = fresh.pipeline()
    torch.testing.assert_close(run(fresh, pipe), trained, atol=1e-6, rtol=0)

    for tr in transformers_of(fresh):
        tr.fuse_lora()
    torch.testing.assert_close(run(fresh, pipe), trained, atol=1e-5, rtol=0)
    for tr in transformers_of(fresh):
        tr.unfuse_lora()
        tr.unload_lora()
        assert not lora_modules(tr)
    torch.testing.assert_close(run(fresh, pipe), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_the_diffusers_pipeline_loads_our_adapter_file(name, tmp_path):
    """The file is diffusers' LoRA format: the family's own pipeline ``load_lora_weights`` takes
    it (into ``transformer_2`` too, for two-expert models) and renders what our loader renders."""
    fam = load(name)
    add_loras(fam, rank=4, alpha=8)
    for tr in transformers_of(fam):
        fake_training(tr)
    trained = run(fam, fam.pipeline())
    paths = save_adapter_files(fam, tmp_path)
    fresh = load(name)
    pipe = fresh.pipeline()
    if not hasattr(pipe, "load_lora_weights"):
        pytest.skip(f"{type(pipe).__name__} has no LoRA loader; infer.py loads at transformer level")
    for e in fresh.experts():
        extra = {"load_into_transformer_2": True} if e.attr == "transformer_2" else {}
        pipe.load_lora_weights(paths[e.attr], adapter_name="y", **extra)
    torch.testing.assert_close(run(fresh, pipe), trained, atol=1e-6, rtol=0)


# --- training and inference call the transformer the same way ---
def first_transformer_call(fam, **call) -> tuple[dict, torch.Tensor]:
    """Keyword arguments and output of the pipeline's first transformer call (no CFG)."""
    seen = []
    hook = fam.components.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True
    )
    try:
        run(fam, fam.pipeline(), guidance_scale=1.0, **call)
    finally:
        hook.remove()
    return seen[0]


@torch.no_grad()
def test_wan_predict_matches_the_pipeline_call():
    fam = load("wan")
    kwargs, out = first_transformer_call(fam)
    text = fam.encode_prompts([PROMPT])
    assert text["prompt_embeds"].shape == kwargs["encoder_hidden_states"].shape
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"], kwargs["timestep"], text, fps=16)
    torch.testing.assert_close(pred, out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_wan_i2v_conditioning_matches_the_pipeline_call():
    """The cached i2v conditioning (mask + first-frame latents, CLIP embedding) is what the
    pipeline feeds the transformer for the same first frame."""
    fam = load("wan:i2v")
    cls = family_of("wan")
    kwargs, out = first_transformer_call(fam)
    image = cond_image(cls)
    pixels = torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    torch.testing.assert_close(cond["condition"], kwargs["hidden_states"][:, 16:], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["image_embeds"], kwargs["encoder_hidden_states_image"], atol=1e-5, rtol=0)
    cond.update(fam.encode_prompts([PROMPT]))
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"][:, :16], kwargs["timestep"], cond, fps=16)
    torch.testing.assert_close(pred, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [c for c in CASES if not c.endswith(":t2v")])
def test_i2v_prediction_depends_on_the_conditioning_image(name):
    cls = family_of(name)
    fam = load(name)
    videos = random_videos(cls, batch=1)
    latents, cond = encoded(fam, videos)
    other = videos.clone()
    other[:, :, 0] = -other[:, :, 0]
    _, cond2 = encoded(fam, other)
    text = fam.encode_prompts([PROMPT])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    preds = []
    with torch.no_grad():
        for c in (cond, cond2):
            c = {**text, **c}
            n = fam.noisy_input_and_target(latents, noise, torch.tensor([0.6]), c)
            preds.append(fam.predict(transformers_of(fam)[0], n.noisy, n.timesteps, c, cls.default_fps))
    assert (preds[0] - preds[1]).abs().max() > 1e-4, f"{name}: the conditioning image does not reach the model"


@pytest.mark.parametrize("fps", [24.0, 8.0])
@torch.no_grad()
def test_ltx_predict_matches_the_pipeline_call(fps):
    import diffusers

    fam = load("ltx")
    kwargs, out = first_transformer_call(fam, frame_rate=fps)
    assert kwargs["rope_interpolation_scale"][0] == pytest.approx(8 / fps)
    text = fam.encode_prompts([PROMPT])
    assert torch.equal(text["prompt_attention_mask"], kwargs["encoder_attention_mask"])
    grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
    latents = diffusers.LTXPipeline._unpack_latents(kwargs["hidden_states"], *grid)
    pred = fam.predict(fam.components.transformer, latents, kwargs["timestep"], text, fps=fps)
    torch.testing.assert_close(diffusers.LTXPipeline._pack_latents(pred), out, atol=1e-6, rtol=0)


def test_ltx_shift_is_the_pipelines_resolution_dependent_mu():
    import math

    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    fam = load("ltx")
    cfg = fam.components.scheduler.config
    for shape in [(1, 128, 3, 16, 22), (1, 128, 21, 16, 24)]:  # 17 and 161 frames at 512x704 / 512x768
        seq = shape[2] * shape[3] * shape[4]
        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        assert fam.timestep_shift(shape) == pytest.approx(math.exp(mu))
    assert fam.timestep_shift((1, 128, 21, 16, 24)) > fam.timestep_shift((1, 128, 3, 16, 22))


def test_wan_shift_is_the_sampling_flow_shift():
    fam = load("wan")
    assert fam.timestep_shift((1, 16, 21, 60, 104)) == fam.components.scheduler.config.flow_shift == 3.0


@pytest.mark.parametrize("name", CASES)
def test_released_encoders_fail_clearly(name):
    fam = load(name)
    fam.release_encoders()
    with pytest.raises(RuntimeError, match="release_encoders"):
        fam.encode_prompts([PROMPT])
    with pytest.raises(RuntimeError, match="release_encoders"):
        fam.pipeline()


@pytest.mark.parametrize("name", CASES)
def test_load_pretrained_reads_a_diffusers_folder(name, tmp_path):
    """The real loading path (subfolders, classes, dtypes), offline: on a saved tiny pipeline."""
    cls = family_of(name)
    tiny = load(name)
    tiny.pipeline().save_pretrained(tmp_path)
    fam = cls.load(ModelSpec(pretrained=str(tmp_path), task=tiny.task))
    assert type(fam.components.scheduler) is type(tiny.components.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(fam.components.scheduler.config) == public(tiny.components.scheduler.config)
    assert fam.components.modules().keys() == tiny.components.modules().keys()
    assert [e.name for e in fam.experts()] == [e.name for e in tiny.experts()]
    for part in tiny.components.modules():
        got, want = (getattr(f.components, part).state_dict() for f in (fam, tiny))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name}: {part} changed on the way through disk"
    text = fam.encode_prompts([PROMPT])
    assert text["prompt_embeds"].shape[1] == cls.max_sequence_length  # the real length, not the tiny one
    assert fam.pipeline_call_kwargs(cls.default_fps)["max_sequence_length"] == cls.max_sequence_length


def test_wan_keeps_its_vae_in_float32(tmp_path):
    load("wan").pipeline().save_pretrained(tmp_path)
    fam = get_family("wan").load(ModelSpec(pretrained=str(tmp_path), dtype=torch.bfloat16))
    c = fam.components
    assert c.vae.dtype == torch.float32  # the Wan docs' advice for decoding quality
    assert c.text_encoder.dtype == torch.bfloat16 and c.transformer.proj_out.weight.dtype == torch.bfloat16
    latents = fam.encode_videos(random_videos(get_family("wan"), batch=1))
    assert latents.dtype == torch.float32
    with torch.no_grad():
        pred = fam.predict(c.transformer, latents, torch.tensor([500.0]), fam.encode_prompts([PROMPT]), 16)
    assert pred.shape == latents.shape and pred.dtype == torch.bfloat16


@pytest.mark.parametrize("name", FAMILIES)
def test_quantization_needs_a_known_mode(name):
    cls = get_family(name)
    spec = ModelSpec(pretrained=cls.default_model_id, quantization="fp4")
    with pytest.raises(ValueError, match="quantization='fp4'"):
        cls.load_pretrained(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("name", FAMILIES)
def test_quantization_without_cuda_names_the_fix(name):
    cls = get_family(name)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*quantization=none"):
        cls.load_pretrained(ModelSpec(pretrained=cls.default_model_id, quantization="nf4"))


@pytest.mark.parametrize("name", [c for c in CASES if not c.endswith(":t2v")])
def test_clean_conditioning_frames_are_left_out_of_the_loss(name):
    """Where a family gives the first latent frame(s) clean (Wan 2.2 TI2V-5B, ...), the loss
    ignores them: a prediction wrong only there costs nothing, wrong anywhere else costs."""
    from finetune.trainer import masked_mse

    fam = load(name)
    latents, cond = encoded(fam, random_videos(family_of(name), batch=1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    noised = fam.noisy_input_and_target(latents, noise, torch.tensor([0.7]), cond)
    if noised.loss_mask is None:
        pytest.skip(f"{name} noises every frame (its image conditions through extra channels)")
    mask = noised.loss_mask.expand_as(latents)
    assert (mask == 0).any() and (mask == 1).any()
    # the left-out positions are the clean ones: the input there does not depend on the noise
    again = fam.noisy_input_and_target(latents, noise * 2, torch.tensor([0.7]), cond)
    assert torch.equal(noised.noisy[mask == 0], again.noisy[mask == 0])
    wrong_there = torch.where(mask == 0, noised.target + 5.0, noised.target)
    assert masked_mse(wrong_there, noised.target, noised.loss_mask) == 0
    wrong_elsewhere = torch.where(mask == 1, noised.target + 5.0, noised.target)
    assert masked_mse(wrong_elsewhere, noised.target, noised.loss_mask) > 1
