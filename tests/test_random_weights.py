"""``model.weights: random``: every component built from its full-size config with random values,
loaded tensor by tensor through the same code as a checkpoint (fp8 while loading, block-swapped
transformers in host memory), so ``train_lora.py`` on a real recipe measures itself. The full-size
configs are too big for these tests; they stand in the tiny build's own configs as "full size"
(``tiny_as_full``), which runs the same loader on the same classes."""

from __future__ import annotations

import json

import pytest
import torch

import train_lora
from conftest import registry_cases, tiny_recipe_path, write_clips
from finetune.families import get_family
from finetune.families.base import COND_FRAMES_KEY, TEXT_LEN_KEY, FullSize, ModelSpec

CASES = registry_cases()


def _modules(components) -> dict[str, torch.nn.Module]:
    """Every module of a build: the Components attributes and those the family keeps in extra."""
    extra = {k: v for k, v in components.extra.items() if isinstance(v, torch.nn.Module)}
    return {**components.modules(), **extra}


def _full_size_of(module: torch.nn.Module) -> FullSize:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return FullSize(type(module), config)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A quantised (torchao) weight as the plain tensor it stands for."""
    return t.dequantize() if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "dequantize") else t


def tiny_as_full(monkeypatch, cls, task: str) -> dict[str, FullSize]:
    """Make ``cls.full_size_configs(task)`` answer with the tiny build's module configs for the
    task's default checkpoint (the Wan VAE keeps its float32 as the real entry says)."""
    torch.manual_seed(0)
    real = cls.full_size_configs(task)[cls.model_id_for(task)]
    tiny = cls.build_tiny(task)
    parts = {n: FullSize(type(m), _full_size_of(m).config, *((real[n].dtype, real[n].block_keys) if n in real else ()))
             for n, m in _modules(tiny).items()}
    monkeypatch.setattr(cls, "full_size_configs", classmethod(lambda c, t: {c.model_id_for(t): parts}))
    # the facts a tiny build shrinks through extra are then the "full-size" facts (a learned position
    # table sized for the tiny prompt length takes no longer prompt)
    monkeypatch.setattr(cls, "max_sequence_length", tiny.extra.get(TEXT_LEN_KEY, cls.max_sequence_length))
    monkeypatch.setattr(cls, "default_cond_frames", tiny.extra.get(COND_FRAMES_KEY, cls.default_cond_frames))
    return parts


@pytest.mark.parametrize("case", CASES)
def test_full_size_configs_cover_every_module_of_the_model(case):
    """A random full-size build replaces every module of the tiny build (nothing tiny is left
    beside full-size weights): the default checkpoint's full-size configs name them all."""
    name, _, task = case.partition(":")
    cls = get_family(name)
    torch.manual_seed(0)
    tiny = _modules(cls.build_tiny(task))
    full = cls.full_size_configs(task)[cls.model_id_for(task)]
    assert set(tiny) <= set(full), f"{case}: no full-size config for {sorted(set(tiny) - set(full))}"
    for n in tiny:
        assert issubclass(full[n].cls, type(tiny[n]).__mro__[0]) or isinstance(tiny[n], full[n].cls), n


@pytest.mark.parametrize("case", CASES)
def test_random_weights_load_through_the_checkpoint_loader_and_predict(case, monkeypatch):
    name, _, task = case.partition(":")
    cls = get_family(name)
    parts = tiny_as_full(monkeypatch, cls, task)
    quant = "fp8" if cls.fp8_ok else "none"
    spec = ModelSpec(pretrained=cls.model_id_for(task), weights="random", task=task, quantization=quant)
    fam = cls.load(spec)
    again = cls.load(spec)
    torch.manual_seed(0)
    tiny = _modules(cls.build_tiny(task))
    mods = _modules(fam.components)
    assert set(mods) == set(parts)
    for n, m in mods.items():
        assert type(m) is parts[n].cls
        a, b, t = m.state_dict(), _modules(again.components)[n].state_dict(), tiny[n].state_dict()
        assert a.keys() == t.keys(), n
        assert not any(p.is_meta for p in m.parameters()), n
        for key in a:
            assert a[key].shape == t[key].shape, f"{n}.{key}"
            assert torch.equal(_plain(a[key]), _plain(b[key])), f"{n}.{key}: random weights must be deterministic"
        assert any(a[k].ndim >= 2 and not torch.equal(_plain(a[k]).float(), t[k].float()) for k in a), \
            f"{n}: these are the tiny build's weights, not random ones"
    if quant == "fp8":
        from finetune.weights.fp8 import fp8_layer_names, is_quantized

        t = fam.components.transformer
        assert all(is_quantized(t.get_submodule(x).weight) for x in fp8_layer_names(t))
    assert TEXT_LEN_KEY not in fam.components.extra and fam.text_len == cls.max_sequence_length
    # a forward at the real prompt length, as a training step makes it
    videos = torch.rand(1, 3, cls.frame_rule.floor(9), 32, 32) * 2 - 1
    with torch.no_grad():
        text = fam.encode_prompts(["a red ball"])
        latents = fam.encode_videos(videos)
        captions = {"captions": ["a red ball"]} if fam.conditioning_uses_captions() else {}
        cond = {**text, **fam.encode_conditioning(videos, latents, **captions)}
        noised = fam.noisy_input_and_target(latents, torch.randn_like(latents), torch.tensor([0.5]), cond)
        kwargs = {"streams": noised.streams} if noised.streams else {}
        out = fam.predict(fam.components.transformer, noised.noisy, noised.timesteps, cond, cls.default_fps, **kwargs)
    pred = out[0] if isinstance(out, tuple) else out
    assert pred.shape == noised.target.shape and torch.isfinite(pred).all()


def test_a_random_weights_run_trains_through_train_lora_and_is_marked_unusable(tmp_path, monkeypatch, capsys):
    """train_lora.py on a recipe with model.weights=random and block swap: the transformer's
    swapped blocks stay in host memory; the run's description says random, publish refuses it,
    infer renders with random weights and says so."""
    from finetune.errors import UserError
    from finetune.export import RunInfo
    from finetune.publish import check_run

    cls = get_family("wan")
    tiny_as_full(monkeypatch, cls, "t2v")
    manifest = write_clips(tmp_path / "clips", n=1, frames=9, height=32, width=32)
    run = tmp_path / "run"
    args = ["--recipe", str(tiny_recipe_path("wan")), f"data.manifest={manifest}", f"output.dir={run}",
            "model.tiny=false", "model.weights=random", f"model.pretrained={cls.default_model_id}",
            "model.quantization=fp8", "memory.blocks_to_swap=1", "optim.steps=2", "checkpoint.every=0"]
    assert train_lora.main(args) == 0
    info = RunInfo.read(run)
    assert info.weights == "random" and not info.usable
    assert json.loads((run / "video_lora.json").read_text())["weights"] == "random"
    with pytest.raises(UserError, match="model.weights=random.*not published"):
        check_run(run)
    import infer

    capsys.readouterr()
    assert infer.main(["--lora", str(run), "--prompt", "a ball", "--steps", "2", "--out", str(tmp_path / "o.mp4")]) == 0
    assert "random full-size weights" in capsys.readouterr().out
    assert (tmp_path / "o.mp4").is_file()


def test_random_weights_for_an_unknown_checkpoint_name_the_known_ones():
    from finetune.errors import UserError

    cls = get_family("wan")
    with pytest.raises(UserError, match=r"no full-size config of 'me/my-wan'.*known: .*Wan2.1-T2V-1.3B"):
        cls.load(ModelSpec(pretrained="me/my-wan", weights="random"))


@pytest.mark.parametrize("bad, message", [
    (["model.tiny=true", "model.weights=random"], "set one of them"),
    (["model.tiny=false", "model.weights=random", "model.quantization=nf4"], "fp8 only"),
])
def test_random_weights_recipe_errors(bad, message, tmp_path):
    from finetune.config import load_recipe
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe_path("wan"), [f"output.dir={tmp_path}", *bad])
