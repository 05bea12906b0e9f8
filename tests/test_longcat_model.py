"""LongCat-Video's transformer port: the forward against an independent implementation of the
architecture's equations (written here with plain torch ops on the official-layout weights),
the official checkpoint layout round trip, gradient checkpointing, LoRA, and clean
conditioning frames. CPU, offline, seeded, tiny configs built in code."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

from finetune.families.longcat_model import (
    LONGCAT_LORA_TARGETS,
    LongCatVideoTransformer3DModel,
    diffusers_to_official_state_dict,
    frame_timesteps,
    official_module_for,
    official_module_targets,
    official_lora_to_peft,
    official_to_diffusers_state_dict,
    peft_lora_to_official,
    save_official,
)

# Head dim 16: RoPE shares (8, 4, 4); SwiGLU inner 256 (the 256 rounding).
TINY = dict(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=24,
            mlp_ratio=4, adaln_tembed_dim=16, frequency_embedding_size=32, patch_size=(1, 2, 2))
# The released dit/config.json fields that are not architecture (accepted, ignored here).
RELEASE_EXTRAS = dict(enable_flashattn3=False, enable_flashattn2=True, enable_xformers=False, enable_bsa=False,
                      bsa_params=None, cp_split_hw=None, text_tokens_zero_pad=True)
B, F, H, W, L = 2, 3, 4, 6, 5


def tiny_model(seed: int = 0, **overrides) -> LongCatVideoTransformer3DModel:
    """Random tiny model; norm weights drawn around 1 so a wrong norm weight would show."""
    torch.manual_seed(seed)
    model = LongCatVideoTransformer3DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def inputs(seed: int = 1, frames: int = F) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(B, TINY["in_channels"], frames, H, W, generator=g),
        timestep=torch.tensor([700.0, 35.0]),
        encoder_hidden_states=torch.randn(B, L, TINY["caption_channels"], generator=g),
        # second prompt is shorter: the padding rule matters
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
    )


# --------------------------------------------------------------------------------------------
# (a) independent reference of the equations, on the official (fused) weights, float64
# --------------------------------------------------------------------------------------------
def ref_layer_norm(x, weight=None, bias=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def ref_rms(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def ref_rope_phase(frames, hh, ww, head_dim):
    """Complex unit phases [N, head_dim/2]: pairs 0..dt/2 rotate with the frame index, then
    dh/2 pairs with the row, then dw/2 with the column; frequency 1e4^(-2k/d) per axis."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw
    phases = []
    for f in range(frames):
        for i in range(hh):
            for j in range(ww):
                ang = []
                for pos, d in ((f, d_t), (i, d_hw), (j, d_hw)):
                    ang += [pos * 10000.0 ** (-2 * k / d) for k in range(d // 2)]
                phases.append(ang)
    return torch.polar(torch.ones(len(phases), head_dim // 2, dtype=torch.float64),
                       torch.tensor(phases, dtype=torch.float64))


def ref_rotate(x, phase):
    """x [B, N, heads, hd] real -> rotated, pairs (2k, 2k+1) as complex numbers."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * phase[None, :, None, :]).flatten(-2)


def ref_attention(q, k, v, allowed):
    """q [B, Nq, h, d], k/v [B, Nk, h, d], allowed bool [B, Nq, Nk] -> [B, Nq, h*d]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.flatten(2)


def reference_forward(sd, cfg, x, t, y, mask, num_cond=0):
    """The LongCat-Video DiT from its equations. sd: official-layout weights (float64).
    x [B, C, F, H, W], t [B, F] (0..1000), y [B, L, C_text], mask [B, L] -> [B, C_out, F, H, W]."""
    lin = lambda z, name: z @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if f"{name}.bias" in sd else 0)
    silu = lambda z: z * torch.sigmoid(z)
    b, c, frames, hgt, wid = x.shape
    hh, ww = hgt // 2, wid // 2
    n, s = frames * hh * ww, hh * ww
    d, heads = cfg["hidden_size"], cfg["num_heads"]
    hd = d // heads

    # patchify as a matmul over (c, kh, kw) patches
    patches = x.reshape(b, c, frames, hh, 2, ww, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, n, c * 4)
    h = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"]

    # timestep: [cos | sin] of t * 1e4^(-k/half), then MLP; one embedding per frame
    half = cfg["frequency_embedding_size"] // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = t.reshape(-1, 1) * freqs
    temb = lin(silu(lin(torch.cat([ang.cos(), ang.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    temb = temb.reshape(b, frames, -1)
    frame_of_token = torch.arange(n) // s

    txt = lin(torch.nn.functional.gelu(lin(y, "y_embedder.y_proj.0"), approximate="tanh"), "y_embedder.y_proj.2")
    if cfg["text_tokens_zero_pad"]:
        txt = txt * mask[:, :, None]
        key_ok = torch.ones(b, y.shape[1], dtype=torch.bool)
    else:
        key_ok = mask.bool()

    is_cond = frame_of_token < num_cond
    self_allowed = ~(is_cond[:, None] & ~is_cond[None, :])  # clean queries never see noisy keys
    self_allowed = self_allowed.expand(b, n, n)
    cross_allowed = key_ok[:, None, :].expand(b, n, -1)
    phase = ref_rope_phase(frames, hh, ww, hd)

    for i in range(cfg["depth"]):
        p = f"blocks.{i}"
        mod = lin(silu(temb), f"{p}.adaLN_modulation.1")[:, frame_of_token]  # [B, N, 6D]
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(d, dim=-1)

        a = ref_layer_norm(h) * (1 + sc1) + sh1
        q, k, v = lin(a, f"{p}.attn.qkv").reshape(b, n, 3, heads, hd).unbind(2)
        q = ref_rotate(ref_rms(q, sd[f"{p}.attn.q_norm.weight"]), phase)
        k = ref_rotate(ref_rms(k, sd[f"{p}.attn.k_norm.weight"]), phase)
        h = h + g1 * lin(ref_attention(q, k, v, self_allowed), f"{p}.attn.proj")

        a = ref_layer_norm(h, sd[f"{p}.pre_crs_attn_norm.weight"], sd[f"{p}.pre_crs_attn_norm.bias"])
        q = ref_rms(lin(a, f"{p}.cross_attn.q_linear").reshape(b, n, heads, hd), sd[f"{p}.cross_attn.q_norm.weight"])
        k, v = lin(txt, f"{p}.cross_attn.kv_linear").reshape(b, -1, 2, heads, hd).unbind(2)
        k = ref_rms(k, sd[f"{p}.cross_attn.k_norm.weight"])
        cross = lin(ref_attention(q, k, v, cross_allowed), f"{p}.cross_attn.proj")
        h = h + cross * (~is_cond)[None, :, None]  # clean tokens take no text

        a = ref_layer_norm(h) * (1 + sc2) + sh2
        ffn = lin(silu(lin(a, f"{p}.ffn.w1")) * lin(a, f"{p}.ffn.w3"), f"{p}.ffn.w2")
        h = h + g2 * ffn

    shift, scale = lin(silu(temb), "final_layer.adaLN_modulation.1")[:, frame_of_token].split(d, dim=-1)
    out = lin(ref_layer_norm(h) * (1 + scale) + shift, "final_layer.linear")  # [B, N, 4*C_out]
    out = out.reshape(b, frames, hh, ww, 2, 2, -1).permute(0, 6, 1, 2, 4, 3, 5)
    return out.reshape(b, -1, frames, hgt, wid)


@pytest.mark.parametrize("zero_pad", [False, True])
@pytest.mark.parametrize("num_cond", [0, 1, 2])
def test_forward_matches_reference_equations(zero_pad, num_cond):
    model = tiny_model(text_tokens_zero_pad=zero_pad)
    inp = inputs()
    t = frame_timesteps(inp["timestep"], F, num_cond)
    with torch.no_grad():
        ours = model(**{**inp, "timestep": t}, num_cond_latents=num_cond).sample
    sd = {k: v.double() for k, v in model.to_official_state_dict().items()}
    cfg = dict(model.config)
    ref = reference_forward(sd, cfg, inp["hidden_states"].double(), t.double(),
                            inp["encoder_hidden_states"].double(), inp["encoder_attention_mask"].double(), num_cond)
    assert ours.shape == (B, TINY["out_channels"], F, H, W) and ours.dtype == torch.float32
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_timestep_per_sample_equals_same_timestep_per_frame():
    model = tiny_model()
    inp = inputs()
    with torch.no_grad():
        a = model(**inp).sample
        b = model(**{**inp, "timestep": inp["timestep"][:, None].expand(-1, F)}).sample
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_frame_timesteps_marks_clean_frames_with_zero():
    t = frame_timesteps(torch.tensor([900.0, 10.0]), num_frames=4, num_cond_latents=2)
    assert t.tolist() == [[0, 0, 900, 900], [0, 0, 10, 10]]
    with pytest.raises(ValueError, match="num_cond_latents=4"):
        frame_timesteps(torch.tensor([1.0]), num_frames=4, num_cond_latents=4)


def test_bad_sizes_are_reported():
    model = tiny_model()
    inp = inputs()
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(**{**inp, "hidden_states": inp["hidden_states"][..., :5]})
    with pytest.raises(ValueError, match="num_cond_latents=3"):
        model(**inp, num_cond_latents=3)
    with pytest.raises(ValueError, match="head dim 12"):
        LongCatVideoTransformer3DModel(**{**TINY, "hidden_size": 24, "num_heads": 2})


# --------------------------------------------------------------------------------------------
# (b) the official checkpoint layout
# --------------------------------------------------------------------------------------------
def test_every_official_key_maps_to_parameters_exactly_once():
    model = tiny_model()
    ours = model.state_dict()
    official = diffusers_to_official_state_dict(ours)
    produced = []
    for key in official:
        module, _, param = key.rpartition(".")
        targets = official_module_targets(module)
        assert targets, key
        produced += [f"{t}.{param}" for t in targets]
    assert sorted(produced) == sorted(ours), "official keys must cover each parameter exactly once"
    for key in ours:  # and back: each parameter names one official tensor (and its part)
        module, _, param = key.rpartition(".")
        official_module, part, parts = official_module_for(module)
        assert f"{official_module}.{param}" in official and 0 <= part < parts
    assert official["blocks.1.attn.qkv.weight"].shape == (3 * 32, 32)
    assert official["blocks.0.cross_attn.kv_linear.bias"].shape == (2 * 32,)
    back = official_to_diffusers_state_dict(official)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def arch_config(model) -> dict:
    """The config as JSON would hold it, without the diffusers bookkeeping entries."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("sharded", [False, True])
def test_official_layout_round_trip(tmp_path, sharded):
    model = tiny_model(**RELEASE_EXTRAS)
    save_official(model, tmp_path / "dit", max_shard_bytes=40_000 if sharded else None)
    files = sorted(p.name for p in (tmp_path / "dit").iterdir())
    if sharded:
        assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
    from safetensors import safe_open

    saved = []
    for file in sorted((tmp_path / "dit").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            saved += list(f.keys())
    # the files hold exactly the official names: fused qkv / kv_linear, one entry each
    assert sorted(saved) == sorted(model.to_official_state_dict())
    assert "blocks.0.attn.qkv.weight" in saved and "blocks.0.attn1.to_q.weight" not in saved
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert config["_class_name"] == "LongCatVideoTransformer3DModel" and config["enable_flashattn2"] is True

    loaded = LongCatVideoTransformer3DModel.from_official(tmp_path)  # <root>/dit, as the hub repo
    # from_pretrained recognises the layout by its key names and takes the same path
    also = LongCatVideoTransformer3DModel.from_pretrained(tmp_path, subfolder="dit")
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), also.state_dict().values()))
    with pytest.raises(ValueError, match="official layout, which loads without quantization_config"):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path, subfolder="dit", quantization_config=object())
    assert arch_config(loaded) == arch_config(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inp = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).sample, model(**inp).sample, atol=0, rtol=0)


def test_official_loading_casts_dtype_and_reports_bad_checkpoints(tmp_path):
    from safetensors.torch import save_file

    save_official(tiny_model(), tmp_path / "dit")
    fp32_layers = ("time_embedder.", ".modulation.", "out_modulation.", "proj_out.")
    for load in (LongCatVideoTransformer3DModel.from_official, LongCatVideoTransformer3DModel.from_pretrained):
        kwargs = {"subfolder": "dit"} if load == LongCatVideoTransformer3DModel.from_pretrained else {}
        loaded = load(tmp_path, torch_dtype=torch.bfloat16, **kwargs)
        dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
        assert {d for n, d in dtypes.items() if any(m in n for m in fp32_layers)} == {torch.float32}
        assert {d for n, d in dtypes.items() if not any(m in n for m in fp32_layers)} == {torch.bfloat16}
    with torch.no_grad():  # the bf16 model runs (fp32 layers and bf16 layers mixed)
        assert torch.isfinite(loaded(**inputs()).sample).all()
    diffusers_dir = tmp_path / "diffusers"
    loaded.save_pretrained(diffusers_dir)
    again = LongCatVideoTransformer3DModel.from_pretrained(diffusers_dir, torch_dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in again.named_parameters()} == dtypes

    weights = tmp_path / "dit" / "diffusion_pytorch_model.safetensors"
    official = tiny_model().to_official_state_dict()
    save_file({**official, "blocks.0.attn.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(KeyError, match="blocks.0.attn.extra.weight"):
        LongCatVideoTransformer3DModel.from_official(tmp_path)

    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    (tmp_path / "dit" / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "num_heads": 4}))
    save_file(official, str(weights))
    with pytest.raises(ValueError, match="do not fit config.json"):
        LongCatVideoTransformer3DModel.from_official(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LongCatVideoTransformer3DModel.from_official(tmp_path, subfolder="transformer")


def test_official_checkpoint_converts_to_the_diffusers_layout(tmp_path):
    """from_official then save_pretrained: the diffusers layout that from_pretrained (and its
    bitsandbytes quantisation) reads."""
    model = tiny_model(**RELEASE_EXTRAS)
    save_official(model, tmp_path / "official" / "dit")
    LongCatVideoTransformer3DModel.from_official(tmp_path / "official").save_pretrained(tmp_path / "diffusers")
    loaded = LongCatVideoTransformer3DModel.from_pretrained(tmp_path / "diffusers")
    inp = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).sample, model(**inp).sample, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# (c, d) LoRA and gradient checkpointing
# --------------------------------------------------------------------------------------------
def add_lora(model, seed: int = 0, trained: bool = True):
    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(LONGCAT_LORA_TARGETS)))
    if trained:  # random lora_B, as a few optimiser steps would leave it
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_lora_attaches_to_attention_and_ffn_only_and_changes_output():
    model = tiny_model()
    inp = inputs()
    with torch.no_grad():
        base = model(**inp).sample
    add_lora(model, trained=False)
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}
    expected = {f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("attn1", "attn2")
                for p in ("to_q", "to_k", "to_v", "to_out.0")}
    expected |= {f"blocks.{i}.ffn.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert wrapped == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).sample, base, atol=0, rtol=0)  # lora_B = 0 at init
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        changed = model(**inp).sample
    assert (changed - base).abs().max() > 1e-3
    # every targeted module maps to an official module, so the adapter can be exported by name
    assert all(official_module_for(m) is not None for m in wrapped)


def lora_grads(model, inp, checkpointing: bool) -> dict[str, torch.Tensor]:
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    model.zero_grad()
    t = frame_timesteps(inp["timestep"], F, 1)
    out = model(**{**inp, "timestep": t}, num_cond_latents=1).sample
    (out[:, :, 1:] ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    model = add_lora(tiny_model())
    inp = inputs()
    plain = lora_grads(model, inp, checkpointing=False)
    ckpt = lora_grads(model, inp, checkpointing=True)
    assert model.gradient_checkpointing
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 11 * 2
    assert all(g.abs().max() > 0 for n, g in plain.items() if "lora_A" in n)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def merge_official_lora(official: dict, lora: dict, multiplier: float = 1.0) -> dict:
    """W + multiplier * alpha_scale * up @ down per LoRA'd official Linear, with the n parallel
    up blocks of a fused Linear acting as one block-diagonal matrix (as the official network)."""
    merged = dict(official)
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        ups = [v for k, v in sorted(lora.items()) if k.startswith(f"{name}.lora_up.")]
        module = name.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        delta = torch.block_diag(*ups) @ down * lora[f"{name}.alpha_scale"] * multiplier
        merged[f"{module}.weight"] = merged[f"{module}.weight"] + delta
    return merged


def test_lora_exports_to_the_official_format_and_back():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    inp = inputs()
    base = tiny_model()
    adapted = add_lora(tiny_model())  # r = 4, alpha = 4
    with torch.no_grad():
        want = adapted(**inp).sample
    lora = peft_lora_to_official(get_peft_model_state_dict(adapted), scale=1.0)
    names = {k.split(".lora_")[0].split(".alpha")[0] for k in lora}
    assert "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv" in names
    assert lora["lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___attn___lorahyphen___qkv"
                ".lora_down.weight"].shape == (3 * 4, 32)
    assert len(names) == 2 * 8  # per block: qkv, proj, q_linear, kv_linear, proj, w1, w2, w3

    # the official format applied the official way, on official weights, reproduces the adapter
    merged = merge_official_lora(base.to_official_state_dict(), lora)
    base.load_state_dict(official_to_diffusers_state_dict(merged))
    with torch.no_grad():
        torch.testing.assert_close(base(**inp).sample, want, atol=1e-5, rtol=1e-5)

    # and it loads back into a peft adapter (alpha_scale folded into lora_B, lora_alpha = r)
    again = tiny_model()
    again.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(LONGCAT_LORA_TARGETS)))
    result = set_peft_model_state_dict(again, official_lora_to_peft(lora))
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(again(**inp).sample, want, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# (e) clean conditioning frames
# --------------------------------------------------------------------------------------------
def predict(model, inp, num_cond):
    t = frame_timesteps(inp["timestep"], inp["hidden_states"].shape[2], num_cond)
    with torch.no_grad():
        return model(**{**inp, "timestep": t}, num_cond_latents=num_cond).sample


@pytest.mark.parametrize("num_cond", [1, 2])
def test_conditioning_frames_steer_the_noisy_frames(num_cond):
    model = tiny_model()
    inp = inputs(frames=4)
    other = inp["hidden_states"].clone()
    other[:, :, :num_cond] = torch.randn_like(other[:, :, :num_cond])
    a = predict(model, inp, num_cond)
    b = predict(model, {**inp, "hidden_states": other}, num_cond)
    assert (a[:, :, num_cond:] - b[:, :, num_cond:]).abs().max() > 1e-3


@pytest.mark.parametrize("num_cond", [1, 2])
def test_conditioning_frames_do_not_see_noisy_frames_or_text(num_cond):
    """What makes the official KV cache of clean frames exact: their outputs depend only on
    themselves (and t = 0), never on the noisy frames or the prompt."""
    model = tiny_model()
    inp = inputs(frames=4)
    noisy = inp["hidden_states"].clone()
    noisy[:, :, num_cond:] = torch.randn_like(noisy[:, :, num_cond:])
    text = torch.randn_like(inp["encoder_hidden_states"])
    a = predict(model, inp, num_cond)
    b = predict(model, {**inp, "hidden_states": noisy, "encoder_hidden_states": text}, num_cond)
    torch.testing.assert_close(a[:, :, :num_cond], b[:, :, :num_cond], atol=1e-6, rtol=1e-6)
    assert (a[:, :, num_cond:] - b[:, :, num_cond:]).abs().max() > 1e-3
