"""Trainer behaviour, in process: what trains, that it learns, the cache, divergence handling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import registry_cases, tiny_recipe, write_clips
from finetune import trainer
from finetune.cache import CachedDataset, build_cache, collate
from finetune.data import load_manifest
from finetune.errors import TrainingDiverged
from finetune.families import get_family

CASES = registry_cases()


@pytest.mark.parametrize("family", CASES)
def test_only_lora_parameters_change(family, clips, tmp_path):
    recipe = tiny_recipe(family, clips, tmp_path / "run", "optim.steps=4", "checkpoint.every=0")
    result = trainer.train(recipe)
    trained = result.family.components.transformer.state_dict()
    base = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu"))).components.transformer.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    saved = load_file(str(result.adapter))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k), "LoRA B never left zero"
    # The encoders were released before the loop.
    assert result.family.components.text_encoder is None and result.family.components.vae is None


@pytest.mark.parametrize("family", CASES)
def test_lora_learns_one_clip(family, tmp_path):
    manifest = write_clips(tmp_path / "clip", n=1, frames=12, height=64, width=64)
    # Two experts share the steps, and the high-noise one (sigmas ~0.9-1 at Wan 2.2's shift 12)
    # learns a clip slowest: 400 steps each at a higher rate (margins 35% and 37% when tuned).
    experts = len(get_family(family.partition(":")[0]).expert_names)
    schedule = ("optim.steps=300", "optim.lr=3e-3") if experts < 2 else (f"optim.steps={400 * experts}", "optim.lr=6e-3")
    recipe = tiny_recipe(family, manifest, tmp_path / "run", *schedule, "lora.rank=16", "lora.alpha=16",
                         "checkpoint.every=0")
    result = trainer.train(recipe)
    fam = result.family
    batch = collate([result.dataset[0]])
    # Each trained expert on its own share of the noise levels (one full-range expert for most).
    for expert in trainer.trained_experts(recipe, fam):
        transformer = getattr(fam.components, expert.attr)
        transformer.eval()
        args = dict(expert=expert, recipe=recipe)
        with_lora = trainer.fixed_timestep_loss(fam, transformer, batch, recipe.fps, **args)
        transformer.disable_adapters()
        base = trainer.fixed_timestep_loss(fam, transformer, batch, recipe.fps, **args)
        transformer.enable_adapters()
        print(f"{family} {expert.name}: base loss {base:.4f}, with LoRA {with_lora:.4f}, "
              f"margin {1 - with_lora / base:.1%}")
        assert with_lora <= 0.7 * base, expert.name


def test_cache_reencodes_only_what_changed(tmp_path):
    manifest = write_clips(tmp_path / "c", n=3, frames=12, height=64, width=64)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run")
    spec = trainer.model_spec(recipe, torch.device("cpu"))
    fam = get_family("wan").load(spec)
    key = trainer.cache_key(recipe, fam)
    cache_dir = tmp_path / "cache"

    _, first = build_cache(fam, load_manifest(manifest), key, cache_dir, show_progress=False)
    assert (first.latents_computed, first.text_computed) == (3, 3)

    again_entries, again = build_cache(fam, load_manifest(manifest), key, cache_dir, show_progress=False)
    assert (again.latents_computed, again.text_computed, again.latents_reused) == (0, 0, 3)

    lines = manifest.read_text().splitlines()
    lines[1] = lines[1].replace("number 1", "number one")
    manifest.write_text("\n".join(lines) + "\n")
    _, caption = build_cache(fam, load_manifest(manifest), key, cache_dir, show_progress=False)
    assert (caption.latents_computed, caption.text_computed, caption.text_reused) == (0, 1, 2)

    bigger = trainer.cache_key(tiny_recipe("wan", manifest, tmp_path / "run", "data.height=48", "data.width=48"), fam)
    entries, res = build_cache(fam, load_manifest(manifest), bigger, cache_dir, show_progress=False)
    assert (res.latents_computed, res.text_computed) == (3, 0)
    item = CachedDataset(entries)[0]
    assert item["latents"].shape[-2:] == (6, 6)  # 48 px / 8 (Wan VAE)
    assert CachedDataset(again_entries)[0]["latents"].shape[-2:] == (4, 4)  # 32 px / 8

    other_weights = trainer.cache_key(recipe, get_family("wan").load(trainer.model_spec(
        tiny_recipe("wan", manifest, tmp_path / "run", "model.tiny_seed=1"), torch.device("cpu"))))
    _, res = build_cache(fam, load_manifest(manifest), other_weights, cache_dir, show_progress=False)
    assert (res.latents_computed, res.text_computed) == (3, 3)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(clips, tmp_path, monkeypatch):
    recipe = tiny_recipe("wan", clips, tmp_path / "run", "optim.steps=10", "checkpoint.every=4")
    real = trainer.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (6, 7, 8) else loss

    monkeypatch.setattr(trainer, "denoising_loss", poisoned)
    # two bad steps are skipped; the third in a row (optim.max_bad_steps=3) stops the run
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 8: 3 bad steps.*step-00000004 \(untouched\)"):
        trainer.train(recipe)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert (ckpt / "lora.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "step-00000008").exists()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_batches_are_a_pure_function_of_the_step():
    a = [trainer.batch_indices(5, 3, m, 2, r, 2) for m in range(6) for r in range(2)]
    b = [trainer.batch_indices(5, 3, m, 2, r, 2) for m in range(6) for r in range(2)]
    assert a == b
    # Each epoch (5 items) is a permutation: the first 10 draws cover every item twice.
    flat = [i for batch in a for i in batch][:10]
    assert sorted(flat) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_validation_samples_are_rendered_during_training(clips, tmp_path):
    from finetune.video import probe_frames

    recipe = tiny_recipe("wan", clips, tmp_path / "run", "optim.steps=4", "checkpoint.every=0",
                         "validation.prompts=[mystyle a square, mystyle a circle]", "validation.every=2",
                         "validation.steps=2")
    trainer.train(recipe)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["base-0.mp4", "base-1.mp4",  # the base model's renders, made once
                       "step-00000002-0.mp4", "step-00000002-1.mp4", "step-00000004-0.mp4", "step-00000004-1.mp4"]
    assert probe_frames(tmp_path / "run" / "samples" / samples[0])[:3] == (9, 32, 32)


def test_aspect_buckets_train_each_clip_at_its_own_size(tmp_path):
    import json
    from pathlib import Path

    from finetune.errors import DataError

    folder = tmp_path / "clips"
    landscape = write_clips(folder / "l", n=1, frames=9, height=32, width=64)
    portrait = write_clips(folder / "p", n=1, frames=9, height=64, width=32)
    rows = [json.loads(m.read_text()) | {"path": f"{m.parent.name}/clip000.mp4"} for m in (landscape, portrait)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe("wan", manifest, tmp_path / "run", "data.buckets=true", "optim.steps=2", "checkpoint.every=0")
    result = trainer.train(recipe)
    shapes = sorted(tuple(result.dataset[i]["latents"].shape[-2:]) for i in range(2))
    assert shapes == [(4, 8), (8, 4)]  # [h/8, w/8] of 32x64 and 64x32

    rows[1]["width"] = 40
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A clip buckets cannot take is skipped and listed; data.strict=true makes it the old error.
    assert len(trainer.train(recipe).dataset) == 1
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped_clips.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).parent.name, r["reason"][:34]) for r in skipped] == [("p", "size 40x64 is not a multiple of 16")]
    strict = tiny_recipe("wan", manifest, tmp_path / "run", "data.buckets=true", "optim.steps=2", "checkpoint.every=0",
                         "data.strict=true")
    with pytest.raises(DataError, match=r"1 of 2 clips .* not a multiple of 16 for wan: clip000.mp4 \(40x64\)"):
        trainer.train(strict)


def test_adamw8bit_from_bitsandbytes_trains(clips, tmp_path):
    import bitsandbytes as bnb

    recipe = tiny_recipe("wan", clips, tmp_path / "run", "optim.optimizer=adamw8bit", "optim.steps=3",
                         "checkpoint.every=0")
    assert isinstance(trainer.make_optimizer([torch.nn.Parameter(torch.zeros(8192))], recipe), bnb.optim.AdamW8bit)
    saved = load_file(str(trainer.train(recipe).adapter))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


def test_two_expert_run_routes_each_step_to_one_expert(tmp_path, monkeypatch):
    """Wan 2.2 A14B, both experts: every step trains the expert whose noise range its sigmas fall
    in, and only that expert's LoRA gets gradients; both experts get steps."""
    manifest = write_clips(tmp_path / "clips", n=2, frames=12, height=32, width=32)
    recipe = tiny_recipe("wan22", manifest, tmp_path / "run", "optim.steps=8", "checkpoint.every=0")
    seen = []
    real_accumulate, real_sample = trainer.accumulate_gradients, trainer.sample_sigmas

    def sample(*args, **kwargs):
        sigmas = real_sample(*args, **kwargs)
        seen.append({"sigmas": sigmas.tolist()})
        return sigmas

    def accumulate(accelerator, family, transformers, experts, *args):
        loss = real_accumulate(accelerator, family, transformers, experts, *args)
        seen[-1]["grads"] = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters() if p.requires_grad)
                             for t in transformers]
        seen[-1]["experts"] = experts
        return loss

    monkeypatch.setattr(trainer, "sample_sigmas", sample)
    monkeypatch.setattr(trainer, "accumulate_gradients", accumulate)
    trainer.train(recipe)
    assert len(seen) == 8
    used = set()
    for step in seen:
        (k,) = [i for i, g in enumerate(step["grads"]) if g]  # exactly one expert learned
        expert = step["experts"][k]
        assert all(expert.serves(s) for s in step["sigmas"]), (expert, step["sigmas"])
        used.add(expert.name)
    assert used == {"high", "low"}


def test_two_expert_adapters_load_into_both_transformers_and_both_render(tmp_path):
    import json

    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render

    manifest = write_clips(tmp_path / "clips", n=1, frames=12, height=32, width=32)
    run = trainer.train(tiny_recipe("wan22", manifest, tmp_path / "run", "optim.steps=6", "optim.lr=1e-2",
                                    "checkpoint.every=0")).run_dir
    info = json.loads((run / "video_lora.json").read_text())
    assert info["adapters"] == {"transformer": "pytorch_lora_weights.safetensors",
                                "transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}
    assert (run / "comfyui_lora.safetensors").is_file() and (run / "comfyui_lora_transformer_2.safetensors").is_file()

    family, run_info = load_base([LoraRef(run)], None, torch.device("cpu"), torch.float32)
    args = complete_args(RenderArgs(prompt="mystyle, a square", steps=6, guidance=1.0), family, run_info)
    pipe = family.pipeline()
    base = render(family, pipe, args)
    apply_loras(family, [LoraRef(run)], merge=False)
    calls = {"transformer": 0, "transformer_2": 0}
    for attr in calls:
        tr = getattr(family.components, attr)
        assert "lora0" in tr.peft_config, attr
        tr.register_forward_hook(lambda *a, attr=attr: calls.__setitem__(attr, calls[attr] + 1))
    adapted = render(family, pipe, args)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls
    assert (adapted - base).abs().max() > 1e-4
