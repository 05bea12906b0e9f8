"""Open-Sora 2.0's transformer port (finetune/families/opensora2_model.py): the official checkpoint
layout both ways, the block equations against an independent float64 implementation written from
the official code (opensora/models/mmdit), and what the port must never do (masks, non-finite bf16).
Tiny configs, CPU, seconds."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F

from finetune.families.opensora2_model import (
    OPEN_SORA_V2_CONFIG,
    OpenSora2AttnProcessor,
    OpenSora2Transformer3DModel,
    diffusers_to_official,
    first_frame_condition,
    official_config,
    official_to_diffusers,
    save_official,
)

TINY = dict(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=4, depth=2,
            depth_single_blocks=2, axes_dim=[4, 14, 14])


def tiny_model(seed: int = 0, **changes) -> OpenSora2Transformer3DModel:
    """A tiny port with every weight random (QK-norm scales near 1, so attention is sharp and the
    rotary layout matters)."""
    torch.manual_seed(seed)
    model = OpenSora2Transformer3DModel(**{**TINY, **changes})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model.eval()


def inputs(b: int = 2, f: int = 3, h: int = 4, w: int = 6, text: int = 7, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=gen)
    cond = first_frame_condition(torch.randn(b, 16, 1, h, w, generator=gen), f)
    args = dict(hidden_states=x, timestep=torch.rand(b, generator=gen),
                encoder_hidden_states=torch.randn(b, text, 32, generator=gen),
                pooled_projections=torch.randn(b, 32, generator=gen), condition=cond)
    return {k: v.to(dtype) for k, v in args.items()}


# --- the official layout ---
def _official_names(depth: int, single: int) -> set[str]:
    """The parameters of the official MMDiTModel as released (fused_qkv=False, cond_embed=True,
    guidance_embed=False), written out from opensora/models/mmdit/{model,layers}.py."""
    lin = lambda m: {f"{m}.weight", f"{m}.bias"}  # noqa: E731
    names = set().union(*(lin(m) for m in ("img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                           "vector_in.out_layer", "cond_in", "txt_in", "final_layer.linear",
                                           "final_layer.adaLN_modulation.1")))
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            names |= lin(f"{b}_mod.lin") | lin(f"{b}_mlp.0") | lin(f"{b}_mlp.2")
            for p in ("q_proj", "k_proj", "v_proj", "proj"):
                names |= lin(f"{b}_attn.{p}")
            names |= {f"{b}_attn.norm.query_norm.scale", f"{b}_attn.norm.key_norm.scale"}
    for i in range(single):
        b = f"single_blocks.{i}"
        for p in ("q_proj", "k_proj", "v_mlp", "linear2", "modulation.lin"):
            names |= lin(f"{b}.{p}")
        names |= {f"{b}.norm.query_norm.scale", f"{b}.norm.key_norm.scale"}
    return names


def test_every_official_tensor_of_the_release_maps_to_one_parameter_and_back():
    """On the 11B release config (meta device, no memory): the official names are exactly the
    official model's, with its shapes, and each official tensor comes back as our tensors once."""
    with torch.device("meta"):
        model = OpenSora2Transformer3DModel(**OPEN_SORA_V2_CONFIG)
    ours = model.state_dict()
    official = diffusers_to_official(ours, 3072)
    assert set(official) == _official_names(19, 38)
    assert official["single_blocks.0.v_mlp.weight"].shape == (3072 + 4 * 3072, 3072)  # v and the MLP input
    assert official["cond_in.weight"].shape == (3072, 64 + 4)  # packed latents + packed mask
    assert official["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (128,)
    back = [k for key, t in official.items() for k, _ in official_to_diffusers(key, t, 3072)]
    assert sorted(back) == sorted(ours)  # one to one: no parameter twice, none left out
    count = sum(t.numel() for t in official.values())
    assert count == sum(p.numel() for p in model.parameters()) and 11e9 < count < 12.5e9


def test_weights_survive_the_official_file_and_its_config_is_read_from_the_shapes(tmp_path):
    model = tiny_model()
    path = save_official(model, tmp_path / "Open_Sora_v2.safetensors")
    config = official_config(path)
    assert {k: config[k] for k in TINY} == TINY and config["use_liger_rope"] and config["cond_embed"]
    loaded = OpenSora2Transformer3DModel.from_official(path)
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).sample, model(**inputs()).sample, rtol=0, atol=0)


def test_the_official_file_loads_in_fp8_as_it_is_read(tmp_path):
    """fp8 while loading equals quantising the loaded model; the block Linears are fp8, the rest not."""
    from finetune.weights.fp8 import fp8_layer_names, is_quantized, quantize_fp8

    model = tiny_model()
    path = save_official(model, tmp_path / "Open_Sora_v2.safetensors")
    got = OpenSora2Transformer3DModel.from_official(path, torch.bfloat16, fp8=True)
    want = tiny_model().to(torch.bfloat16)
    quantize_fp8(want)
    names = fp8_layer_names(got)
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    for key, value in want.state_dict().items():
        mine = got.state_dict()[key]
        if is_quantized(value):
            assert torch.equal(mine.qdata.float(), value.qdata.float()) and torch.equal(mine.scale, value.scale), key
        else:
            assert not is_quantized(mine) and torch.equal(mine, value), key


def test_checkpoints_that_do_not_fit_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_official(tiny_model(), tmp_path / "a.safetensors")
    state = load_file(str(path))
    state["txt_in.weight"] = torch.zeros(128, 48)
    save_file(state, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensors of .*b.safetensors do not fit.*txt_in.weight \[128, 48\]"):
        OpenSora2Transformer3DModel.from_official(tmp_path / "b.safetensors", config={**OPEN_SORA_V2_CONFIG, **TINY})
    state = load_file(str(path))
    state["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(384, 128)
    save_file(state, str(tmp_path / "c.safetensors"))  # a fused-qkv (Flux-style) file
    with pytest.raises(ValueError, match="fused_qkv=True is not the released layout"):
        OpenSora2Transformer3DModel.from_official(tmp_path / "c.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="not an Open-Sora 2.0 transformer"):
        official_config(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="guidance_embed=True is a guidance-distilled Flux"):
        OpenSora2Transformer3DModel(**TINY, guidance_embed=True)


# --- the block equations, independently, in float64 ---
def _linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)


def _rms(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * scale


def _mlp_embed(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return _linear(sd, f"{name}.out_layer", F.silu(_linear(sd, f"{name}.in_layer", x)))


def _timestep(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = 1000 * t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor, liger: bool) -> torch.Tensor:
    """x [B, H, S, D], angles [S, D/2]: pairs (d, d + D/2) (Liger) or (2d, 2d + 1) (Flux)."""
    c, s = torch.cos(angles), torch.sin(angles)
    if liger:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)


def _attention(q, k, v) -> torch.Tensor:
    """[B, H, S, D] each -> [B, S, H*D], plain softmax attention over every token."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(1, 2).flatten(2)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def reference_forward(sd: dict, cfg: dict, x, t, txt, vec, cond) -> torch.Tensor:
    """The official MMDiT forward in float64 from official-named weights ``sd``: pack, embed,
    double blocks, single blocks, last layer, unpack (opensora/models/mmdit, utils/sampling.py)."""
    b, c, f, h, w = x.shape
    heads, p, liger = cfg["num_heads"], cfg["patch_size"], cfg["use_liger_rope"]

    def pack(z):
        z = z.reshape(b, z.shape[1], f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return z.reshape(b, f * (h // p) * (w // p), -1)

    img = _linear(sd, "img_in", pack(x)) + _linear(sd, "cond_in", pack(cond))
    vec = _mlp_embed(sd, "time_in", _timestep(t)) + _mlp_embed(sd, "vector_in", vec)
    txt = _linear(sd, "txt_in", txt)
    # positions: text (0, 0, 0), image (frame, row, column); per axis theta^(-2j/dim)
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h // p), torch.arange(w // p), indexing="ij"), -1)
    pos = torch.cat([torch.zeros(txt.shape[1], 3), grid.reshape(-1, 3)]).double()
    angles = torch.cat([pos[:, i:i + 1] * cfg["theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                        for i, d in enumerate(cfg["axes_dim"])], dim=-1)
    L = txt.shape[1]

    def mods(name, n):
        return _linear(sd, name, F.silu(vec))[:, None].chunk(n, dim=-1)

    for i in range(cfg["depth"]):
        q, k, v, outs = [], [], [], {}
        mod = {}
        for s, stream in (("txt", txt), ("img", img)):
            mod[s] = mods(f"double_blocks.{i}.{s}_mod.lin", 6)
            shift, scale, _, _, _, _ = mod[s]
            y = (1 + scale) * _layer_norm(stream) + shift
            a = f"double_blocks.{i}.{s}_attn"
            q.append(_rms(_heads(_linear(sd, f"{a}.q_proj", y), heads), sd[f"{a}.norm.query_norm.scale"]))
            k.append(_rms(_heads(_linear(sd, f"{a}.k_proj", y), heads), sd[f"{a}.norm.key_norm.scale"]))
            v.append(_heads(_linear(sd, f"{a}.v_proj", y), heads))
        q, k, v = torch.cat(q, 2), torch.cat(k, 2), torch.cat(v, 2)
        attn = _attention(_rotate(q, angles, liger), _rotate(k, angles, liger), v)
        outs = {"txt": attn[:, :L], "img": attn[:, L:]}
        new = {}
        for s, stream in (("txt", txt), ("img", img)):
            _, _, gate1, shift2, scale2, gate2 = mod[s]
            stream = stream + gate1 * _linear(sd, f"double_blocks.{i}.{s}_attn.proj", outs[s])
            y = (1 + scale2) * _layer_norm(stream) + shift2
            mlp = _linear(sd, f"double_blocks.{i}.{s}_mlp.2",
                          F.gelu(_linear(sd, f"double_blocks.{i}.{s}_mlp.0", y), approximate="tanh"))
            new[s] = stream + gate2 * mlp
        txt, img = new["txt"], new["img"]

    z = torch.cat([txt, img], dim=1)
    hidden = cfg["hidden_size"]
    for i in range(cfg["depth_single_blocks"]):
        s = f"single_blocks.{i}"
        shift, scale, gate = mods(f"{s}.modulation.lin", 3)
        y = (1 + scale) * _layer_norm(z) + shift
        v_mlp = _linear(sd, f"{s}.v_mlp", y)
        q = _rms(_heads(_linear(sd, f"{s}.q_proj", y), heads), sd[f"{s}.norm.query_norm.scale"])
        k = _rms(_heads(_linear(sd, f"{s}.k_proj", y), heads), sd[f"{s}.norm.key_norm.scale"])
        v = _heads(v_mlp[..., :hidden], heads)
        attn = _attention(_rotate(q, angles, liger), _rotate(k, angles, liger), v)
        mlp = F.gelu(v_mlp[..., hidden:], approximate="tanh")
        z = z + gate * _linear(sd, f"{s}.linear2", torch.cat([attn, mlp], -1))
    img = z[:, L:]
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=-1)
    out = _linear(sd, "final_layer.linear", (1 + scale[:, None]) * _layer_norm(img) + shift[:, None])
    out = out.reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return out.reshape(b, c, f, h, w)


@pytest.mark.parametrize("liger", [True, False], ids=["rotate-half rope (release)", "adjacent-pair rope (Flux)"])
def test_forward_matches_a_float64_reference_of_the_official_equations(liger):
    model = tiny_model(use_liger_rope=liger).double()
    args = inputs(dtype=torch.float64)
    sd = {k: v.double() for k, v in model.to_official_state_dict().items()}
    cfg = {**OPEN_SORA_V2_CONFIG, **TINY, "use_liger_rope": liger}
    want = reference_forward(sd, cfg, args["hidden_states"], args["timestep"], args["encoder_hidden_states"],
                             args["pooled_projections"], args["condition"])
    with torch.no_grad():
        got = model(**args).sample
    err = (got - want).abs().max().item()
    print(f"rope {'rotate-half' if liger else 'adjacent'}: max |port - float64 reference| = {err:.2e}")
    assert err < 1e-5
    # the rotary layout is not a detail: the other one gives another function
    other = reference_forward(sd, {**cfg, "use_liger_rope": not liger}, args["hidden_states"], args["timestep"],
                              args["encoder_hidden_states"], args["pooled_projections"], args["condition"])
    assert (other - want).abs().max() > 1e-3


def test_text_to_video_is_an_all_zero_condition():
    model = tiny_model()
    args = inputs()
    with torch.no_grad():
        none = model(**{**args, "condition": None}).sample
        zeros = model(**{**args, "condition": torch.zeros_like(args["condition"])}).sample
        image = model(**args).sample
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)
    assert (image - none).abs().max() > 1e-3


def test_every_text_token_is_attended_and_no_mask_is_taken():
    """As the official model, padding tokens take part (nothing masks them): changing one changes
    the output; a mask passed to the attention is refused rather than silently applied."""
    model = tiny_model()
    args = inputs()
    padded = args["encoder_hidden_states"].clone()
    padded[:, -1] += 1.0
    with torch.no_grad():
        assert (model(**{**args, "encoder_hidden_states": padded}).sample - model(**args).sample).abs().max() > 1e-4
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.processor, OpenSora2AttnProcessor)
    with pytest.raises(ValueError, match="no attention mask"):
        attn.processor(attn, torch.randn(1, 4, 128), torch.randn(1, 3, 128), attention_mask=torch.ones(1, 1, 7, 7))


def test_bf16_forward_and_backward_under_autocast_are_finite():
    model = tiny_model().to(torch.bfloat16).train()
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_mlp", "proj_out"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.enable_gradient_checkpointing()
    args = inputs(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**args).sample
        loss = out.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
