"""LoRA interchange: every family's ComfyUI key map is complete, the diffusers, ComfyUI and kohya
layouts round-trip exactly (alpha included) and agree with diffusers' own converters, imported
files render and train exactly as the run folder they came from, and foreign files fail clearly.
CPU, offline, seeded, tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_recipe, write_clips
from finetune import trainer
from finetune.errors import UserError
from finetune.families import ModelSpec, family_names, get_family
from finetune.lora_formats import (
    COMFYUI_WEIGHT_NAME,
    KeyMap,
    Lora,
    LoraFormatError,
    LoraModule,
    adaptable_modules,
    comfyui_weight_name,
    export_comfyui,
    fused,
    lora_from_peft,
    read_lora,
    write_lora,
)

CPU = torch.device("cpu")


def tiny_transformer(name: str):
    cls = get_family(name)
    return cls, cls.load(ModelSpec(pretrained=cls.default_model_id, tiny=True)).components.transformer


def adapted(name: str, rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, seed: int = 0):
    """Tiny transformer of ``name`` with a peft adapter on ``targets`` (default: every adaptable
    module) and random non-zero lora_B, as training would leave it."""
    cls, transformer = tiny_transformer(name)
    torch.manual_seed(seed)
    transformer.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                            target_modules=targets or adaptable_modules(transformer)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = peft.get_peft_model_state_dict(transformer)
    return cls, transformer, lora_from_peft(state, transformer.peft_config["default"].to_dict())


# --- 1. key maps ---
@pytest.mark.parametrize("name", family_names())
def test_every_family_maps_each_lora_module_to_one_original_key_and_back(name):
    """Every LoRA module maps to exactly one original key and back; fused original modules are
    listed with their parts (all present in the model)."""
    cls, transformer = tiny_transformer(name)
    modules = adaptable_modules(transformer)
    assert modules, f"{name}: the tiny transformer has no adaptable modules"
    assert cls.comfyui_key_map().problems(modules) == []


# --- 2. round trips ---
@pytest.mark.parametrize("name", family_names())
@pytest.mark.parametrize("layout", ["comfyui", "kohya", "diffusers"])
def test_export_then_import_gives_back_the_same_tensors_and_alpha(name, layout, tmp_path):
    cls, transformer, lora = adapted(name, rank=8, alpha=16.0)
    key_map = cls.comfyui_key_map()
    path = write_lora(lora, tmp_path / "x.safetensors", layout, key_map, cls.pipeline_class)
    back = read_lora(path, key_map)
    assert back.layout == layout
    assert set(back.modules) == set(lora.modules) == set(adaptable_modules(transformer))
    for n, m in lora.modules.items():
        assert torch.equal(back.modules[n].down, m.down) and torch.equal(back.modules[n].up, m.up)
        assert back.modules[n].alpha == 16.0
    assert (back.rank, back.alpha) == (8, 16.0)


@pytest.mark.parametrize("name", family_names())
def test_comfyui_file_uses_original_names_with_alpha_tensors(name, tmp_path):
    cls, _, lora = adapted(name, rank=8, alpha=16.0)
    path = write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())
    keys = load_file(str(path))
    assert all(k.startswith("diffusion_model.") for k in keys)
    alphas = [k for k in keys if k.endswith(".alpha")]
    # One per original module (a fused module holds its parts at rank 8 x parts, alpha 16 x parts).
    assert len(alphas) == len({cls.comfyui_key_map().to_original(n) for n in lora.modules})
    for k in alphas:
        rank = keys[k.removesuffix("alpha") + "lora_A.weight"].shape[0]
        assert keys[k].item() / rank == 16.0 / 8 and (rank == 8 or keys[k].item() != 16.0)
    assert not any(".attn1." in k or "lora_unet" in k for k in keys if name == "wan")


# Where diffusers' converter of original names is known to mishandle some modules: a regex of the
# modules it converts right, and whether it reads ``.alpha`` tensors. HunyuanVideo
# (_convert_hunyuan_video_lora_to_diffusers, written for diffusion-pipe files, which have no alpha:
# alpha = rank) chunks a fused module's scalar ``.alpha`` like a weight (a crash), splits
# single_blocks.linear1 at a fixed hidden size of 3072 (the tiny model has 128), and chunks the token
# refiner's self_attn_qkv lora_A as if it were a weight; the double blocks' fused img_attn_qkv and
# txt_attn_qkv, which it splits as we do, are checked.
_CONVERTER_LIMITS = {
    "hunyuanvideo": (r"(transformer_blocks\.|single_transformer_blocks\.\d+\.proj_out$|proj_out$)", False),
}


@pytest.mark.parametrize("name", family_names())
def test_diffusers_own_converter_reads_our_comfyui_file_to_the_same_update(name, tmp_path):
    """diffusers' lora_state_dict converts ComfyUI-named files itself; on the default targets it
    must give the same update B @ A * alpha / r as our import. (Its Wan converter bakes alpha
    into the weights; its LTX one only renames and passes ``.alpha`` through; its HunyuanVideo one
    splits fused q/k/v: see _CONVERTER_LIMITS.)"""
    cls = get_family(name)
    if not hasattr(cls.pipeline_class, "lora_state_dict"):
        pytest.skip(f"{name}: diffusers' {cls.pipeline_class.__name__} has no lora_state_dict "
                    f"(no LoRA loader, so no converter of original names to check against)")
    targets, alpha = list(cls.default_lora_targets), 16.0
    modules, reads_alpha = _CONVERTER_LIMITS.get(name, (None, True))
    if modules:
        _, model = tiny_transformer(name)
        targets = [n for n in adaptable_modules(model) if re.match(modules, n)
                   and any(n == t or n.endswith(f".{t}") for t in cls.default_lora_targets)]
    if not reads_alpha:
        alpha = 8.0  # alpha = rank, so the file means the same without its .alpha tensors
    cls, transformer, lora = adapted(name, rank=8, alpha=alpha, targets=targets)
    path = write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())
    state = {k: v for k, v in load_file(str(path)).items() if reads_alpha or not k.endswith(".alpha")}
    theirs = cls.pipeline_class.lora_state_dict(state)
    if not any(k.startswith("transformer.") for k in theirs):
        pytest.skip(f"{name}: diffusers' {cls.pipeline_class.__name__}.lora_state_dict does not convert original "
                    f"(ComfyUI) names, so there is no converter to check against")
    for n, m in lora.modules.items():
        a, b = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        alpha = theirs.get(f"transformer.{n}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / a.shape[0]
        torch.testing.assert_close(b @ a * scale, m.up @ m.down * (m.alpha / m.rank), atol=1e-6, rtol=1e-5)


def test_a_model_with_two_transformers_writes_one_comfyui_file_per_transformer(tmp_path):
    """Wan 2.2 A14B style: ``transformer`` and ``transformer_2``, each with its own adapter and
    key map, give two ComfyUI files that each import back to their own weights."""
    cls, _, first = adapted("wan", seed=0)
    _, second_model, second = adapted("wan", rank=4, alpha=4.0, seed=5)
    _, first_model, _ = adapted("wan", seed=0)
    paths = {}
    for name, model in (("transformer", first_model), ("transformer_2", second_model)):
        weight = "pytorch_lora_weights" + ("" if name == "transformer" else f"_{name}") + ".safetensors"
        paths[name] = export_comfyui(model, cls.comfyui_key_map(name), tmp_path / comfyui_weight_name(weight),
                                     {"family": "wan", "transformer": name})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comfyui_lora.safetensors",
                                                          "comfyui_lora_transformer_2.safetensors"]
    for name, lora in (("transformer", first), ("transformer_2", second)):
        back = read_lora(paths[name], cls.comfyui_key_map(name))
        assert back.info["transformer"] == name and (back.rank, back.alpha) == (lora.rank, lora.alpha)
        assert all(torch.equal(back.modules[n].up, m.up) for n, m in lora.modules.items())


# --- fused original modules (q, k, v [, mlp] in one Linear) ---
class _Split(torch.nn.Module):
    """Diffusers-style block: q, k, v and an mlp input the original fuses as ``linear1`` (1:1:1:4)."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.ModuleDict({p: torch.nn.Linear(8, 6) for p in ("to_q", "to_k", "to_v")})
        self.proj_mlp = torch.nn.Linear(8, 24)


def _split_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([_Split(), _Split()])})


_PARTS = ("blocks.{i}.attn.to_q", "blocks.{i}.attn.to_k", "blocks.{i}.attn.to_v", "blocks.{i}.proj_mlp")
_FUSED_MAP = KeyMap((fused(_PARTS, "single_blocks.{i}.linear1", sizes=(1, 1, 1, 4)),))


def _random_lora(names: list[str], rank: int, alpha: float) -> Lora:
    gen = torch.Generator().manual_seed(1)
    widths = {"proj_mlp": 24}
    return Lora({n: LoraModule(torch.randn(rank, 8, generator=gen), torch.randn(widths.get(n.split(".")[-1], 6), rank,
                                                                                   generator=gen), alpha)
                 for n in names})


def _apply(lora: Lora) -> dict[str, torch.Tensor]:
    """The weight update peft applies to each module of the split model for ``lora``."""
    model = peft.inject_adapter_in_model(peft.LoraConfig(**lora.peft_config()), _split_model())
    result = peft.set_peft_model_state_dict(model, lora.peft_state_dict())
    assert not result.unexpected_keys
    return {n: m.get_delta_weight("default") for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}


def test_fused_map_lists_a_fused_module_with_its_parts():
    names = adaptable_modules(_split_model())
    assert _FUSED_MAP.problems(names) == []
    assert _FUSED_MAP.match("single_blocks.1.linear1").names == tuple(p.format(i=1) for p in _PARTS)
    assert _FUSED_MAP.problems(names[:2]) == ["single_blocks.0.linear1 fuses blocks.0.attn.to_q, blocks.0.attn.to_k, "
                                              "blocks.0.attn.to_v, blocks.0.proj_mlp, but the model lacks "
                                              "blocks.0.attn.to_v, blocks.0.proj_mlp"]


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
@pytest.mark.parametrize("which", ["all parts", "q and v only"])
def test_fused_export_is_one_block_diagonal_lora_that_imports_back_exactly(layout, which, tmp_path):
    names = [n for n in adaptable_modules(_split_model()) if which == "all parts" or n.endswith(("to_q", "to_v"))]
    lora = _random_lora(names, rank=4, alpha=6.0)
    path = write_lora(lora, tmp_path / "f.safetensors", layout, _FUSED_MAP)
    keys = load_file(str(path))
    head = "diffusion_model.single_blocks.0.linear1" if layout == "comfyui" else "lora_unet_single_blocks_0_linear1"
    down, up = (keys[f"{head}.lora_{a}.weight"] for a in (("A", "B") if layout == "comfyui" else ("down", "up")))
    parts = 4 if which == "all parts" else 2
    assert down.shape == (4 * parts, 8) and up.shape == (6 * 3 + 24, 4 * parts)
    assert keys[f"{head}.alpha"].item() == 6.0 * parts  # same scale alpha / r as each part
    # the fused update is the parts' updates stacked, zeros for parts not adapted
    expected = torch.zeros(42, 8)
    rows = {"to_q": slice(0, 6), "to_k": slice(6, 12), "to_v": slice(12, 18), "proj_mlp": slice(18, 42)}
    for n, m in lora.modules.items():
        if n.startswith("blocks.0."):
            expected[rows[n.split(".")[-1]]] = m.up @ m.down
    torch.testing.assert_close(up @ down, expected)
    back = read_lora(path, _FUSED_MAP)
    assert set(back.modules) == set(lora.modules)
    for n, m in lora.modules.items():
        b = back.modules[n]
        assert torch.equal(b.down, m.down) and torch.equal(b.up, m.up) and b.alpha == m.alpha == 6.0
    # Without our record of the parts (another tool re-saved it), a block-diagonal file of all
    # parts still splits back exactly.
    if which == "all parts":
        save_file(keys, str(tmp_path / "bare.safetensors"))
        bare = read_lora(tmp_path / "bare.safetensors", _FUSED_MAP)
        assert all(torch.equal(bare.modules[n].up, m.up) and bare.modules[n].rank == 4 for n, m in lora.modules.items())


def test_full_rank_fused_lora_from_another_tool_applies_the_same_update_to_each_part(tmp_path):
    """A LoRA trained on the fused linear1 (rank 4, alpha 2, dense up): every part gets the same
    down and its rows of up, so peft applies B @ A * alpha / r, cut by rows, to q, k, v and mlp."""
    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 8, generator=gen), torch.randn(42, 4, generator=gen)
    save_file({"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(2.0)}, str(tmp_path / "musubi.safetensors"))
    lora = read_lora(tmp_path / "musubi.safetensors", _FUSED_MAP)
    assert sorted(lora.modules) == sorted(p.format(i=1) for p in _PARTS)
    assert (lora.rank, lora.alpha) == (4, 2.0)
    full = up @ down * (2.0 / 4)
    deltas = _apply(lora)
    for name, rows in (("to_q", slice(0, 6)), ("to_k", slice(6, 12)), ("to_v", slice(12, 18)),
                       ("proj_mlp", slice(18, 42))):
        key = f"blocks.1.attn.{name}" if name != "proj_mlp" else "blocks.1.proj_mlp"
        torch.testing.assert_close(deltas[key], full[rows])
    # and it goes back out as one fused module with the same update
    out = load_file(str(write_lora(lora, tmp_path / "c.safetensors", "comfyui", _FUSED_MAP)))
    a, b = (out[f"diffusion_model.single_blocks.1.linear1.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(b @ a * out["diffusion_model.single_blocks.1.linear1.alpha"].item() / a.shape[0], full)


def test_fused_rows_that_do_not_split_give_a_named_error(tmp_path):
    save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 8),
               "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.zeros(40, 2)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(LoraFormatError, match=r"single_blocks.0.linear1: 40 output rows do not split into "
                                              r"blocks.0.attn.to_q, .*proj_mlp in proportions \(1, 1, 1, 4\)"):
        read_lora(tmp_path / "odd.safetensors", _FUSED_MAP)


def _swap_halves(w: torch.Tensor) -> list[torch.Tensor]:
    first, second = w.chunk(2, dim=0)
    return [torch.cat([second, first])]


def _sat_adaln(w: torch.Tensor) -> list[torch.Tensor]:
    c = w.chunk(12, dim=0)
    return [torch.cat(c[0:3] + c[6:9]), torch.cat(c[3:6] + c[9:12])]


# (family, diffusers modules, original module, diffusers' conversion of that original weight to
# the diffusers modules' weights, as its scripts/convert_*_to_diffusers.py write it)
_REORDERED = [
    ("hunyuanvideo15", ["norm_out.linear"], "final_layer.adaLN_modulation.1", _swap_halves),  # swap_scale_shift
    ("hunyuanvideo", ["norm_out.linear"], "final_layer.adaLN_modulation.1", _swap_halves),
    # no diffusers script for Open-Sora 2.0; its MMDiT's final layer is Flux's (convert_flux: swap_scale_shift)
    ("opensora2", ["norm_out.linear"], "final_layer.adaLN_modulation.1", _swap_halves),
    ("mochi", ["transformer_blocks.0.ff.net.0.proj"], "blocks.0.mlp_x.w1", _swap_halves),  # swap_proj_gate
    ("mochi", ["norm_out.linear"], "final_layer.mod", _swap_halves),
    ("cogvideox", ["transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm2.linear"],
     "mixins.adaln_layer.adaLN_modulations.1.1", _sat_adaln),  # reassign_adaln_norm_inplace
]


@pytest.mark.parametrize(("name", "modules", "original", "convert"), _REORDERED,
                         ids=[f"{r[0]}-{r[2]}" for r in _REORDERED])
def test_reordered_original_rows_are_what_diffusers_conversion_scripts_undo(name, modules, original, convert, tmp_path):
    """The update our ComfyUI file applies to the original module, converted as diffusers converts
    that module's weight, is each diffusers module's own update."""
    cls, _, lora = adapted(name, rank=4, alpha=8.0, targets=modules)
    keys = load_file(str(write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())))
    head = f"diffusion_model.{original}"
    a, b = keys[f"{head}.lora_A.weight"], keys[f"{head}.lora_B.weight"]
    update = b @ a * keys[f"{head}.alpha"].item() / a.shape[0]
    for n, theirs in zip(modules, convert(update)):
        m = lora.modules[n]
        torch.testing.assert_close(theirs, m.up @ m.down * (m.alpha / m.rank))


def test_an_embedding_lora_is_written_as_its_weight_update(tmp_path):
    """peft keeps an embedding's factors transposed; the ComfyUI file holds up @ down in the
    weight's own shape [num, dim], the update peft applies."""
    cls, transformer, lora = adapted("hunyuanvideo15", rank=2, alpha=4.0, targets=["cond_type_embed"])
    keys = load_file(str(write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())))
    a, b = (keys[f"diffusion_model.cond_type_embedding.lora_{x}.weight"] for x in "AB")
    layer = dict(transformer.named_modules())["cond_type_embed"]
    assert (b @ a).shape == layer.weight.shape
    torch.testing.assert_close(b @ a * 4.0 / 2, layer.get_delta_weight("default"))


def test_longcat_comfyui_file_applies_the_official_lora_formats_update(tmp_path):
    """LongCat's own exporter (peft_lora_to_official: one stacked lora_down and an up per part of a
    fused module) and our ComfyUI file give the fused official modules the same update."""
    from finetune.families.longcat_model import OFFICIAL_LORA_SEP, official_lora_name, peft_lora_to_official

    cls, _, lora = adapted("longcat", rank=4, alpha=8.0, targets=list(get_family("longcat").default_lora_targets))
    official = peft_lora_to_official(lora.peft_state_dict(), scale=8.0 / 4)
    ours = load_file(str(write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())))
    for module in ("blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.0.ffn.w2"):
        name = official_lora_name(module)
        assert name.replace(OFFICIAL_LORA_SEP, ".").endswith(module)
        down = official[f"{name}.lora_down.weight"]
        ups = [v for k, v in sorted(official.items()) if k.startswith(f"{name}.lora_up")]
        parts = down.chunk(len(ups), dim=0)
        theirs = torch.cat([u @ d for u, d in zip(ups, parts)]) * official[f"{name}.alpha_scale"].item()
        a, b = (ours[f"diffusion_model.{module}.lora_{x}.weight"] for x in "AB")
        torch.testing.assert_close(b @ a * ours[f"diffusion_model.{module}.alpha"].item() / a.shape[0], theirs)


def test_hunyuanvideo_full_rank_fused_file_reads_as_diffusers_reads_it(tmp_path):
    """A diffusion-pipe HunyuanVideo LoRA (original names, dense lora_B on the fused img_attn_qkv
    and txt_attn_qkv, no alpha): our import gives each split module the update diffusers' own
    converter (_convert_hunyuan_video_lora_to_diffusers) gives it."""
    cls = get_family("hunyuanvideo")
    gen = torch.Generator().manual_seed(4)
    state = {}
    for module, out in (("double_blocks.0.img_attn_qkv", 384), ("double_blocks.1.txt_attn_qkv", 384),
                        ("double_blocks.0.img_attn_proj", 128)):
        state[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(4, 128, generator=gen)
        state[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out, 4, generator=gen)
    save_file(state, str(tmp_path / "pipe.safetensors"))
    ours = read_lora(tmp_path / "pipe.safetensors", cls.comfyui_key_map())
    theirs = cls.pipeline_class.lora_state_dict(dict(state))
    assert {f"transformer.{n}.lora_A.weight" for n in ours.modules} == {k for k in theirs if "lora_A" in k}
    for n, m in ours.modules.items():
        a, b = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        torch.testing.assert_close(m.up @ m.down * (m.alpha / m.rank), b @ a)


def test_musubi_style_kohya_file_with_alpha_imports(tmp_path):
    """A file as musubi-tuner writes it (lora_unet_ + original names, lora_down/lora_up, .alpha)."""
    cls, _, lora = adapted("wan", rank=4, alpha=2.0, targets=["to_q", "to_v"])
    tensors = {}
    for n, m in lora.modules.items():
        flat = cls.comfyui_key_map().to_original(n).replace(".", "_")
        tensors[f"lora_unet_{flat}.lora_down.weight"] = m.down
        tensors[f"lora_unet_{flat}.lora_up.weight"] = m.up
        tensors[f"lora_unet_{flat}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "musubi.safetensors"))
    back = read_lora(tmp_path / "musubi.safetensors", cls.comfyui_key_map())
    assert back.layout == "kohya" and (back.rank, back.alpha) == (4, 2.0)
    assert all(torch.equal(back.modules[n].up, m.up) for n, m in lora.modules.items())


def test_peft_and_diffusers_files_with_alpha_tensors_import(tmp_path):
    """PEFT's own naming (base_model.model.*.lora_A.default.weight), and diffusers naming with
    ``.alpha`` tensors instead of metadata, as some tools write."""
    cls, _, lora = adapted("wan", rank=4, alpha=6.0, targets=["to_k"])
    peft_named = {f"base_model.model.{k.replace('.weight', '.default.weight')}": v
                  for k, v in lora.peft_state_dict().items()}
    save_file(peft_named, str(tmp_path / "peft.safetensors"))
    assert read_lora(tmp_path / "peft.safetensors", cls.comfyui_key_map()).alpha == 4.0  # no alpha: alpha = rank
    with_alpha = {f"transformer.{k}": v for k, v in lora.peft_state_dict().items()}
    with_alpha.update({f"transformer.{n}.alpha": torch.tensor(6.0) for n in lora.modules})
    save_file(with_alpha, str(tmp_path / "d.safetensors"))
    back = read_lora(tmp_path / "d.safetensors", cls.comfyui_key_map())
    assert back.layout == "diffusers" and (back.rank, back.alpha) == (4, 6.0)


@pytest.mark.parametrize("name", family_names())
def test_foreign_keys_give_a_named_error_with_counts(name, tmp_path):
    cls, _, lora = adapted(name, targets=[get_family(name).default_lora_targets[0]])
    tensors = lora.state_dict("comfyui", cls.comfyui_key_map())
    tensors["diffusion_model.not_a_layer.lora_A.weight"] = torch.zeros(8, 4)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "odd.safetensors"))
    n = len(tensors)
    with pytest.raises(LoraFormatError, match=rf"of {n} keys, 0 in diffusers naming, {n - 1} in comfyui naming, "
                                              rf"0 in kohya naming; unrecognised: diffusion_model\.not_a_layer"):
        read_lora(tmp_path / "odd.safetensors", cls.comfyui_key_map())
    assert issubclass(LoraFormatError, UserError)


# --- 3. a trained run: its ComfyUI file renders, converts and trains exactly as the run folder ---
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family name -> a run folder of a 2-step tiny run (rank 8, alpha 16), trained once per module."""
    runs = {}

    def get(name: str):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"lora-formats-{name}")
            manifest = write_clips(tmp / "clips", n=2, frames=9, height=32, width=32)
            recipe = tiny_recipe(name, manifest, tmp / "run", "optim.steps=2", "optim.lr=1e-2", "checkpoint.every=0",
                                 "lora.rank=8", "lora.alpha=16", "data.height=32", "data.width=32")
            runs[name] = trainer.train(recipe).run_dir
        return runs[name]

    return get


@pytest.fixture(scope="module")
def wan_run(trained):
    return trained("wan")


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("name", family_names())
def test_run_folder_gets_a_comfyui_file_that_renders_the_same_video(name, trained, tmp_path, monkeypatch):
    """Through infer.py: the frames rendered from the ComfyUI file equal the run folder's. The
    rendered frames are compared, not the decoded mp4s: x264 does not always encode the same
    frames to the same file twice in one process."""
    import infer
    from finetune import inference

    rendered = {}
    real_write = inference.write_video
    monkeypatch.setattr(inference, "write_video", lambda frames, path, fps, **_: (
        rendered.__setitem__(Path(path).stem, frames.clone()), real_write(frames, path, fps))[1])
    run = trained(name)
    comfy = run / COMFYUI_WEIGHT_NAME
    with safe_open(str(comfy), "pt") as f:
        recorded = json.loads(f.metadata()["video_lora"])
    assert recorded["family"] == name and recorded["tiny"] is True
    common = ["--prompt", "mystyle, a square", "--steps", "2", "--guidance", "1.0", "--seed", "3"]
    assert infer.main(["--lora", f"{run}:0.7", *common, "--out", str(tmp_path / "run.mp4")]) == 0
    assert infer.main(["--lora", f"{comfy}:0.7", *common, "--out", str(tmp_path / "comfy.mp4")]) == 0
    assert infer.main(["--base", str(run), *common, "--out", str(tmp_path / "base.mp4")]) == 0
    assert all((tmp_path / f"{n}.mp4").is_file() for n in ("run", "comfy", "base"))
    torch.testing.assert_close(rendered["comfy"], rendered["run"], atol=1e-6, rtol=0)
    assert (rendered["run"] - rendered["base"]).abs().max() > 1e-4, "the adapter did not change the video"


def test_foreign_file_renders_with_family_flag_and_merges(wan_run, tmp_path):
    """A kohya file that records nothing: --family names the family; merged equals unfused."""
    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, lora_info, render

    cls = get_family("wan")
    lora = read_lora(wan_run / COMFYUI_WEIGHT_NAME, cls.comfyui_key_map())
    lora.info = {}
    foreign = write_lora(lora, tmp_path / "kohya.safetensors", "kohya", cls.comfyui_key_map())
    with pytest.raises(UserError, match="pass --family"):
        load_base([LoraRef(foreign)], None, CPU, torch.float32)
    # The tiny base model is what the run recorded; a bare file would get the family default.
    family, info = load_base([LoraRef(wan_run)], None, CPU, torch.float32)
    assert lora_info(LoraRef(foreign), "wan").base_model == cls.default_model_id
    assert lora_info(LoraRef(foreign), "wan", "me/wan-14b").base_model == "me/wan-14b"
    with pytest.raises(UserError, match="--frames --height --width: needed"):
        complete_args(RenderArgs(prompt="x"), family, lora_info(LoraRef(foreign), "wan"))
    args = complete_args(RenderArgs(prompt="mystyle", steps=2, guidance=1.0), family, info)
    pipe = family.pipeline()
    apply_loras(family, [LoraRef(wan_run)], merge=False)
    expected = render(family, pipe, args)
    family2, _ = load_base([LoraRef(wan_run)], None, CPU, torch.float32)
    pipe2 = family2.pipeline()
    apply_loras(family2, [LoraRef(foreign)], merge=True)
    torch.testing.assert_close(render(family2, pipe2, args), expected, atol=1e-5, rtol=0)


def test_export_command_converts_between_layouts(wan_run, tmp_path):
    from finetune.export import main

    cls = get_family("wan")
    assert main([str(wan_run), "--to", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main([str(tmp_path / "k.safetensors"), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")]) == 0
    original = read_lora(wan_run, cls.comfyui_key_map())
    back = read_lora(tmp_path / "d.safetensors", cls.comfyui_key_map())
    assert back.layout == "diffusers" and back.info["family"] == "wan"
    for n, m in original.modules.items():
        assert torch.equal(back.modules[n].down, m.down) and back.modules[n].alpha == m.alpha == 16.0
    # diffusers itself loads the converted file with the run's alpha
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 8 and meta["transformer.lora_alpha"] == 16


def test_init_from_continues_from_the_imported_weights(wan_run, tmp_path):
    from finetune.config import load_recipe
    from conftest import ROOT

    cls = get_family("wan")
    comfy = wan_run / COMFYUI_WEIGHT_NAME
    # The tiny recipe sets rank 8 and alpha 8; a value set in the recipe must agree with the file.
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "wan.yaml", [f"lora.init_from={comfy}", "lora.alpha=16"])
    spec = ModelSpec(pretrained=cls.default_model_id, tiny=True)
    fam = cls.load(spec)
    trainer.add_lora(fam.components.transformer, recipe)
    cfg = fam.components.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (8, 16)
    adapted_names = {n for n, m in fam.components.transformer.named_modules() if hasattr(m, "lora_A")}
    assert adapted_names == set(read_lora(comfy, cls.comfyui_key_map()).modules)

    ref = cls.load(spec)
    ref.pipeline().load_lora_weights(str(wan_run), weight_name="pytorch_lora_weights.safetensors")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=gen)
    text = {"prompt_embeds": torch.randn(1, 64, 32, generator=gen)}
    t = torch.tensor([500.0])
    with torch.no_grad():
        ours = fam.predict(fam.components.transformer, latents, t, text, 8.0)
        theirs = ref.predict(ref.components.transformer, latents, t, text, 8.0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)

    bad = load_recipe(ROOT / "recipes" / "tiny" / "wan.yaml", [f"lora.init_from={comfy}", "lora.rank=4"])
    with pytest.raises(LoraFormatError, match=r"lora.init_from=.*the file has rank 8 but lora.rank=4.*alpha 16 but "
                                              r"lora.alpha=8"):
        trainer.add_lora(cls.load(spec).components.transformer, bad)


def test_training_from_an_imported_lora_starts_where_it_ends(wan_run, tmp_path):
    """train() with lora.init_from: the run keeps the file's rank and alpha, and one step at a
    vanishing learning rate leaves the imported weights as they were."""
    cls = get_family("wan")
    manifest = write_clips(tmp_path / "clips", n=1, frames=9, height=32, width=32)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run", "optim.steps=1", "optim.lr=1e-12", "checkpoint.every=0",
                         f"lora.init_from={wan_run / COMFYUI_WEIGHT_NAME}", "lora.alpha=16")
    out = trainer.train(recipe).run_dir
    key_map = cls.comfyui_key_map()
    before, after = read_lora(wan_run, key_map), read_lora(out / COMFYUI_WEIGHT_NAME, key_map)
    assert set(after.modules) == set(before.modules) and (after.rank, after.alpha) == (8, 16.0)
    for n, m in before.modules.items():
        torch.testing.assert_close(after.modules[n].up, m.up, atol=1e-6, rtol=0)


def test_init_from_that_does_not_exist_fails_before_loading(tmp_path):
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match=r"lora.init_from='nope.safetensors': no such LoRA file"):
        tiny_recipe("wan", tmp_path / "m.jsonl", tmp_path / "run", "lora.init_from=nope.safetensors")
