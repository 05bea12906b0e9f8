"""fp8 frozen weights (model.quantization: fp8) and quantised/CPU text encoders for caching
(memory.text_encoder), on tiny models on the CPU."""

from __future__ import annotations

import weakref

import diffusers
import pytest
import torch

from conftest import tiny_recipe, write_clips
from finetune import trainer
from finetune.cache import collate
from finetune.config import load_recipe
from finetune.errors import RecipeError
from finetune.families import get_family
from finetune.families._loading import load_transformer
from finetune.families.base import ModelSpec
from finetune.weights import fp8
from finetune.weights.fp8 import Fp8Unsupported, fp8_layer_names, is_quantized

# Relative L2 error of the tiny Wan's prediction with fp8 block weights against fp32. e4m3 keeps 3
# mantissa bits (up to 1/16 relative rounding per weight); per-row scales keep outliers of one row
# from coarsening the others, and the rounding errors of independent weights average out in each
# dot product and are diluted by the unquantised residual path: measured 0.44%. 2% leaves room
# without hiding a broken scale (a missing or wrong scale gives errors of order 100%).
FP8_TOLERANCE = 0.02
# memory.text_encoder=int8/fp8: relative L2 error of the prompt embeddings, measured on the tiny
# encoders: umT5 2.6% (fp8) and 0.6% (int8); HunyuanVideo's Llama 0.8% and its CLIP's pooled
# vector 4.3% (fp8: the pooled token passes every layer with no norm to rescale it afterwards).
TEXT_TOLERANCE = 0.05


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tiny_wan(quantization: str = "none", text_encoder: str = "gpu"):
    return get_family("wan").load(ModelSpec("tiny", tiny=True, quantization=quantization, text_encoder=text_encoder))


def predict(fam, transformer=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=gen)
    text = {"prompt_embeds": torch.randn(1, fam.text_len, 32, generator=gen)}
    with torch.no_grad():
        return fam.predict(transformer or fam.components.transformer, latents, torch.tensor([500.0]), text, 16)


def test_block_linears_are_fp8_with_per_row_scales_and_the_rest_is_not():
    t = tiny_wan("fp8").components.transformer
    names = fp8_layer_names(t)
    assert names and all(n.startswith("blocks.") for n in names)
    for name, module in t.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            assert is_quantized(w) == (name in names), name
            if name in names:
                assert w.qdata.dtype == torch.float8_e4m3fn and tuple(w.scale.shape) == (w.shape[0], 1), name
    # Embedders, the output projection and norms stay in the compute dtype.
    assert not is_quantized(t.proj_out.weight) and not is_quantized(t.condition_embedder.time_embedder.linear_1.weight)


def test_fp8_forward_is_within_tolerance_of_fp32():
    full, quant = tiny_wan(), tiny_wan("fp8")
    err = rel_err(predict(quant), predict(full))
    print(f"fp8 vs fp32 relative error {err:.4f}")
    assert 0 < err < FP8_TOLERANCE


def test_fp8_trains_only_lora_learns_and_the_adapter_works_on_the_unquantised_base(tmp_path):
    manifest = write_clips(tmp_path / "clip", n=1, frames=12, height=64, width=64)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run", "model.quantization=fp8", "optim.steps=300",
                         "optim.lr=3e-3", "lora.rank=16", "lora.alpha=16", "checkpoint.every=0")
    result = trainer.train(recipe)
    fam, transformer = result.family, result.family.components.transformer
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in transformer.parameters() if p.requires_grad)
    assert is_quantized(transformer.blocks[0].attn1.to_q.base_layer.weight)
    transformer.eval()
    batch = collate([result.dataset[0]])
    with_lora = trainer.fixed_timestep_loss(fam, transformer, batch, recipe.fps, recipe=recipe)
    transformer.disable_adapters()
    base = trainer.fixed_timestep_loss(fam, transformer, batch, recipe.fps, recipe=recipe)
    transformer.enable_adapters()
    print(f"fp8 wan: base loss {base:.4f}, with LoRA {with_lora:.4f}, margin {1 - with_lora / base:.1%}")
    assert with_lora <= 0.7 * base

    plain = tiny_wan()
    before = predict(plain)
    expert = plain.experts()[0]
    plain.load_adapter(str(result.adapter), expert, "fp8_trained")
    after = predict(plain)
    assert rel_err(after, before) > 0.01


def test_saved_folder_loads_in_fp8_one_tensor_at_a_time(tmp_path, monkeypatch):
    fam = tiny_wan()
    fam.pipeline().save_pretrained(tmp_path)
    names = set(fp8_layer_names(fam.components.transformer))

    def refuse(*args, **kwargs):
        raise AssertionError("the whole state dict was read at once")

    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr("safetensors.torch.load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    # Count full-precision block weights alive at once: each must be gone before the next is read.
    alive, peak = [0], [0]
    real_open = fp8.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            if key.removesuffix(".weight") in names and key.endswith(".weight"):
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])
                weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            return t

    monkeypatch.setattr(fp8, "safe_open", CountingOpen)
    spec = ModelSpec(str(tmp_path), quantization="fp8", dtype=torch.float32)
    loaded = load_transformer(diffusers.WanTransformer3DModel, spec)
    assert peak[0] == 1 and alive[0] == 0, f"{peak[0]} full-precision block weights were alive at once"
    assert all(is_quantized(loaded.get_submodule(n).weight) for n in names)
    assert not any(p.requires_grad for p in loaded.parameters())
    # Loaded from disk equals quantised after build.
    assert torch.equal(predict(fam, loaded), predict(tiny_wan("fp8")))


def test_fp8_on_a_folder_without_safetensors_is_a_named_error(tmp_path):
    fam = tiny_wan()
    fam.components.transformer.save_pretrained(tmp_path / "transformer", safe_serialization=False)
    with pytest.raises(Fp8Unsupported, match="no .safetensors"):
        load_transformer(diffusers.WanTransformer3DModel, ModelSpec(str(tmp_path), quantization="fp8"))


def test_fp8_is_a_recipe_error_where_the_family_cannot_take_it(tmp_path):
    for name in ("wan", "ltx", "mochi"):
        load_recipe(f"recipes/tiny/{name}.yaml", ["model.quantization=fp8"])  # accepted on tiny models
    with pytest.raises(RecipeError, match="quantization='fp8': longcat's transformer cannot be loaded in fp8"):
        load_recipe("recipes/tiny/longcat.yaml", ["model.quantization=fp8"])
    with pytest.raises(RecipeError, match="needs real weights on a GPU"):
        load_recipe("recipes/tiny/wan.yaml", ["model.quantization=nf4"])
    with pytest.raises(RecipeError, match="memory.text_encoder='tpu'"):
        load_recipe("recipes/tiny/wan.yaml", ["memory.text_encoder=tpu"])


def test_a_model_without_block_linears_is_a_named_error():
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ModuleList([torch.nn.Conv2d(3, 3, 1)]))
    with pytest.raises(Fp8Unsupported, match="no nn.Linear layers in repeated blocks"):
        fp8.quantize_fp8(convs)


@pytest.mark.parametrize("case", ["wan:cpu", "wan:fp8", "wan:int8", "hunyuanvideo:fp8"])
def test_text_encoder_modes_embed_within_tolerance(case):
    """Every text encoder of the family (HunyuanVideo has two) quantised or left on the CPU."""
    name, mode = case.split(":")
    cls, prompts = get_family(name), ["a red square sliding", "mystyle, a blue circle"]
    full_fam = cls.load(ModelSpec("tiny", tiny=True))
    full = full_fam.encode_prompts(prompts)
    fam = cls.load(ModelSpec("tiny", tiny=True, text_encoder=mode))
    for attr in ("text_encoder", "text_encoder_2"):
        te = getattr(fam.components, attr)
        if te is not None:
            assert te.device.type == "cpu"
            linears = [m for m in te.modules() if isinstance(m, torch.nn.Linear)]
            assert any(is_quantized(m.weight) for m in linears) == (mode != "cpu"), attr
    embeds = fam.encode_prompts(prompts)
    for key, want in full.items():
        err = rel_err(embeds[key], want)
        print(f"{name} text encoder {mode}: {key} relative error {err:.4f}")
        assert err == 0 if mode == "cpu" else err < TEXT_TOLERANCE, key
    # Quantised encoders key the cache apart from the full-precision ones.
    assert (fam.encoders_id() == full_fam.encoders_id()) == (mode == "cpu")


def test_trainer_caches_with_an_fp8_text_encoder(clips, tmp_path):
    recipe = tiny_recipe("wan", clips, tmp_path / "run", "memory.text_encoder=fp8", "model.quantization=fp8",
                         "optim.steps=2", "checkpoint.every=0")
    result = trainer.train(recipe)
    assert result.steps == 2 and result.adapter.is_file()
    assert trainer.cache_key(recipe, tiny_wan(text_encoder="fp8")).model_id.endswith("+text_encoder-fp8")


def fp8_families() -> list[str]:
    from finetune.families import family_names

    return [n for n in family_names() if get_family(n).fp8_ok]


@pytest.mark.parametrize("name", fp8_families())
def test_every_fp8_family_loads_its_saved_folder_in_fp8(name, tmp_path):
    """The real loading path of each family that offers fp8 (load_transformer) gives the same
    weights as quantising the tiny build: same fp8 values and scales, the rest unchanged."""
    cls = get_family(name)
    cls.load(ModelSpec("tiny", tiny=True)).pipeline().save_pretrained(tmp_path)
    want = cls.load(ModelSpec("tiny", tiny=True, quantization="fp8"))
    got = cls.load(ModelSpec(str(tmp_path), quantization="fp8"))
    for part in (e.attr for e in want.experts()):
        a, b = getattr(got.components, part).state_dict(), getattr(want.components, part).state_dict()
        assert a.keys() == b.keys()
        quantised = [k for k, v in b.items() if is_quantized(v)]
        assert quantised, f"{name}: no fp8 layers in {part}"
        for k, v in b.items():
            if k in quantised:
                assert torch.equal(a[k].qdata.float(), v.qdata.float()) and torch.equal(a[k].scale, v.scale), k
            else:
                assert torch.equal(a[k], v), k


def test_fp8_run_resumes_from_its_checkpoint(clips, tmp_path):
    """Checkpoints hold only the LoRA weights, so fp8 base weights never reach save_state."""
    args = ("model.quantization=fp8", "checkpoint.every=1")
    trainer.train(tiny_recipe("wan", clips, tmp_path / "run", *args, "optim.steps=2"))
    result = trainer.train(tiny_recipe("wan", clips, tmp_path / "run", *args, "optim.steps=3"), resume="latest")
    assert result.start_step == 1 and result.steps == 3 and result.adapter.is_file()
