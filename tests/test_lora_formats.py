"""LoRA interchange: every family's ComfyUI key map is complete, the diffusers, ComfyUI and kohya
layouts round-trip exactly (alpha included) and agree with diffusers' own converters, imported
files render and train exactly as the run folder they came from, and foreign files fail clearly.
CPU, offline, seeded, tiny models."""

from __future__ import annotations

import json

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
    LoraFormatError,
    adaptable_modules,
    comfyui_weight_name,
    export_comfyui,
    lora_from_peft,
    read_lora,
    write_lora,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    assert len(alphas) == len(lora.modules) and all(keys[k].item() == 16.0 for k in alphas)
    assert not any(".attn1." in k or "lora_unet" in k for k in keys if name == "wan")


@pytest.mark.parametrize("name", family_names())
def test_diffusers_own_converter_reads_our_comfyui_file_to_the_same_update(name, tmp_path):
    """diffusers' lora_state_dict converts ComfyUI-named files itself; on the default targets it
    must give the same update B @ A * alpha / r as our import. (Its Wan converter bakes alpha
    into the weights; its LTX one only renames and passes ``.alpha`` through.)"""
    cls, transformer, lora = adapted(name, rank=8, alpha=16.0, targets=list(get_family(name).default_lora_targets))
    path = write_lora(lora, tmp_path / "c.safetensors", "comfyui", cls.comfyui_key_map())
    theirs = cls.pipeline_class.lora_state_dict(load_file(str(path)))
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
    cls, _, lora = adapted(name, targets=["to_q"])
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
def test_run_folder_gets_a_comfyui_file_that_renders_the_same_video(name, trained, tmp_path):
    import infer

    run = trained(name)
    comfy = run / COMFYUI_WEIGHT_NAME
    with safe_open(str(comfy), "pt") as f:
        recorded = json.loads(f.metadata()["video_lora"])
    assert recorded["family"] == name and recorded["tiny"] is True
    common = ["--prompt", "mystyle, a square", "--steps", "2", "--guidance", "1.0", "--seed", "3"]
    assert infer.main(["--lora", f"{run}:0.7", *common, "--out", str(tmp_path / "run.mp4")]) == 0
    assert infer.main(["--lora", f"{comfy}:0.7", *common, "--out", str(tmp_path / "comfy.mp4")]) == 0
    assert infer.main(["--base", str(run), *common, "--out", str(tmp_path / "base.mp4")]) == 0
    run, imported, base = (_frames(tmp_path / f"{n}.mp4") for n in ("run", "comfy", "base"))
    assert np.array_equal(run, imported)
    assert np.abs(run.astype(int) - base.astype(int)).max() > 0, "the adapter did not change the video"


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
