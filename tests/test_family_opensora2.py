"""The opensora2 family: the official repo layout loads (tensor by tensor, fp8 while loading),
training follows the official trainer's formulas (written out here from scripts/diffusion/train.py),
training calls the transformer as the pipeline does, and checkpoints that break the rules are
named. Tiny builds, CPU, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from finetune.families import ModelSpec, get_family
from finetune.families.opensora2 import OFFICIAL_CLIP, OFFICIAL_T5, OFFICIAL_TRANSFORMER, OFFICIAL_VAE, SIGMA_MIN
from finetune.families.opensora2_model import save_official
from finetune.families.opensora2_pipeline import describe_prompt

CLS = get_family("opensora2")
PROMPT = "a red ball bouncing"



def tiny(task: str = "t2v", **kw):
    return CLS.load(ModelSpec("tiny", tiny=True, task=task, **kw))


def clips(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 9, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def write_official_layout(fam, folder):
    """The tiny build in the layout of hpcai-tech/Open-Sora-v2: the two official safetensors files
    (official key names, no config) and the T5 / CLIP folders."""
    c = fam.components
    save_official(c.transformer, folder / OFFICIAL_TRANSFORMER)
    save_file({k: v.contiguous() for k, v in c.vae.state_dict().items()}, str(folder / OFFICIAL_VAE))
    for sub, model, tok in ((OFFICIAL_T5, c.text_encoder, c.tokenizer),
                            (OFFICIAL_CLIP, c.text_encoder_2, c.tokenizer_2)):
        model.save_pretrained(folder / sub)
        tok.save_pretrained(folder / sub)
    return folder


def test_the_official_repo_layout_loads_as_released(tmp_path):
    from finetune.weights.fp8 import is_quantized, quantize_fp8

    built = tiny()
    folder = write_official_layout(built, tmp_path)
    fam = CLS.load(ModelSpec(str(folder)))
    assert CLS.is_official_layout(ModelSpec(str(folder)))
    for part in built.components.modules():
        got, want = (getattr(f.components, part).state_dict() for f in (fam, built))
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k], want[k]) for k in want), f"{part} changed on the way through the official files"
    assert fam.components.scheduler.config.use_dynamic_shifting  # the official sampler's shift, not a static one
    for tok in ("tokenizer", "tokenizer_2"):
        prompt = describe_prompt(PROMPT)
        assert getattr(fam.components, tok)(prompt).input_ids == getattr(built.components, tok)(prompt).input_ids, tok
    text = fam.encode_prompts([PROMPT])
    assert text["prompt_embeds"].shape[1] == CLS.max_sequence_length
    torch.testing.assert_close(text["pooled_prompt_embeds"], built.encode_prompts([PROMPT])["pooled_prompt_embeds"])
    # fp8 while reading the official file: the same as quantising the built transformer
    got = CLS.load(ModelSpec(str(folder), quantization="fp8")).components.transformer.state_dict()
    want = tiny().components.transformer
    quantize_fp8(want)
    for k, v in want.state_dict().items():
        if is_quantized(v):
            assert torch.equal(got[k].qdata.float(), v.qdata.float()) and torch.equal(got[k].scale, v.scale), k
        else:
            assert torch.equal(got[k], v), k


def test_training_noise_levels_inputs_and_targets_are_the_official_trainers():
    fam = tiny()
    shape = (1, 16, 33, 24, 42)  # 129 frames at 336x192
    alpha = (1 + ((24 * 42) // 4 - 256) * 2 / 3840) * math.sqrt(33)
    assert fam.timestep_shift(shape) == pytest.approx(alpha)
    # t = sigmoid(N(0, 1)), then time_shift(alpha, t): through the normal's quantiles u
    u = torch.tensor([0.05, 0.3, 0.5, 0.9])
    t = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u))
    torch.testing.assert_close(fam.training_sigmas(u, shape), alpha * t / (1 + (alpha - 1) * t))
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 16, 3, 4, 4, generator=gen), torch.randn(2, 16, 3, 4, 4, generator=gen)
    t = torch.tensor([0.25, 0.9])
    out = fam.noisy_input_and_target(x0, x1, t)
    t_rev = (1 - t).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out.noisy, t_rev * x0 + (1 - (1 - SIGMA_MIN) * t_rev) * x1)
    torch.testing.assert_close(out.target, (1 - SIGMA_MIN) * x1 - x0)
    assert torch.equal(out.timesteps, t) and out.loss_mask is None  # the model embeds t itself; every frame counts


def test_captions_are_encoded_as_the_pipeline_encodes_prompts():
    fam = tiny()
    pipe = fam.pipeline()
    got = fam.encode_prompts([PROMPT])
    want = pipe.encode_prompt([describe_prompt(PROMPT)], fam.text_len)
    torch.testing.assert_close(got["prompt_embeds"], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got["pooled_prompt_embeds"], want[1], rtol=0, atol=0)
    assert fam.pipeline_call_kwargs(8.0)["fps"] == CLS.default_fps  # the prompt says what training said


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@torch.no_grad()
def test_predict_calls_the_transformer_as_the_pipeline_does(task):
    from PIL import Image

    fam = tiny(task)
    seen = []
    hook = fam.components.transformer.register_forward_hook(lambda m, a, k, out: seen.append((k, out[0])),
                                                            with_kwargs=True)
    kw = fam.pipeline_call_kwargs(24.0, image=Image.new("RGB", (32, 32), (200, 40, 10)) if task == "i2v" else None)
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
         image_guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    hook.remove()
    kwargs, out = seen[0]
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"], rtol=0, atol=0)
    cond = dict(text)
    if task == "i2v":
        condition = kwargs["condition"]
        assert torch.equal(condition[:, 0, 0], torch.ones_like(condition[:, 0, 0])) and not condition[:, :, 1:].any()
        cond["cond_latents"] = condition[:, 1:, :1]
    else:
        assert kwargs["condition"] is None
    pred = fam.predict(fam.components.transformer, kwargs["hidden_states"], kwargs["timestep"], cond, 24.0)
    torch.testing.assert_close(pred, out, rtol=0, atol=1e-6)


def test_the_i2v_first_frame_is_encoded_on_its_own_and_reproducibly():
    fam = tiny("i2v")
    videos = clips(batch=2)
    latents = fam.encode_videos(videos, torch.Generator().manual_seed(0))
    a, b = (fam.encode_conditioning(videos, latents)["cond_latents"] for _ in range(2))
    assert a.shape == (2, 16, 1, 4, 4) and torch.equal(a, b)
    vae = fam.components.vae
    with torch.no_grad():
        alone = vae.encode(videos[:, :, :1]).latent_dist.mode() * vae.config.scaling_factor
        in_clip = vae.encode(videos).latent_dist.mode()[:, :, :1] * vae.config.scaling_factor
    torch.testing.assert_close(a, alone, atol=0.05, rtol=0)  # a posterior sample of the frame alone
    assert (alone - in_clip).abs().max() > 0.05  # which the clip's own first latent frame is not
    assert not torch.equal(a[0], a[1])
    assert tiny().encode_conditioning(videos, latents) == {}  # t2v conditions on nothing


def test_checkpoints_that_break_the_rules_are_named():
    from finetune.families.base import Components
    from finetune.families.opensora2_model import OpenSora2Transformer3DModel

    built = tiny().components
    no_cond = OpenSora2Transformer3DModel(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128,
                                          num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14],
                                          cond_embed=False)
    parts = dict(vae=built.vae, text_encoder=None, tokenizer=None, scheduler=None)
    with pytest.raises(ValueError, match="no image-condition input.*cannot train model.task=i2v"):
        CLS(Components(no_cond, **parts), ModelSpec("x", task="i2v"))
    # the high-compression model's shape: patch 1 on 128 channels
    dcae = OpenSora2Transformer3DModel(in_channels=128, vec_in_dim=32, context_in_dim=32, hidden_size=128,
                                       num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14], patch_size=1)
    with pytest.raises(ValueError, match="16-channel VAE with a transformer for 128 channels"):
        CLS(Components(dcae, **parts), ModelSpec("x"))


def test_the_comfyui_file_updates_the_official_weights_as_the_adapter_updates_ours(tmp_path):
    """Exported through the generic key map (v_mlp fused from to_v and proj_mlp, the final
    modulation's halves swapped), the adapter's update of each official weight is the official
    weight of our updated model."""
    import peft
    from safetensors.torch import load_file

    from finetune.families.opensora2_model import diffusers_to_official
    from finetune.lora_formats import lora_from_peft, write_lora

    tr = tiny().components.transformer
    plain = {k: v.clone() for k, v in tr.state_dict().items()}
    torch.manual_seed(0)
    targets = [*CLS.default_lora_targets, "norm_out.linear", "x_embedder"]
    tr.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    lora = lora_from_peft(peft.get_peft_model_state_dict(tr), tr.peft_config["default"].to_dict())
    fused_and_swapped = {"single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                         "norm_out.linear"}
    assert fused_and_swapped <= set(lora.modules)
    for name, m in lora.modules.items():
        plain[f"{name}.weight"] = plain[f"{name}.weight"] + m.up @ m.down * (m.alpha / m.rank)
    want = diffusers_to_official(plain, tr.config.hidden_size)
    got = tiny().components.transformer.to_official_state_dict()
    file = load_file(str(write_lora(lora, tmp_path / "c.safetensors", "comfyui", CLS.comfyui_key_map())))
    heads = {k.removesuffix(".alpha") for k in file if k.endswith(".alpha")}
    assert {"diffusion_model.single_blocks.0.v_mlp", "diffusion_model.final_layer.adaLN_modulation.1"} <= heads
    for head in heads:
        a, b = file[f"{head}.lora_A.weight"], file[f"{head}.lora_B.weight"]
        key = head.removeprefix("diffusion_model.") + ".weight"
        got[key] = got[key] + b @ a * (file[f"{head}.alpha"].item() / a.shape[0])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
