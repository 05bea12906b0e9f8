"""Validation a user can read: val_loss on held-out clips, base | LoRA samples in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_recipe, write_clips
from finetune import trainer
from finetune.config import recipe_from_dict
from finetune.data import Clip, split_validation
from finetune.errors import DataError, RecipeError


def _events(run_dir: Path) -> EventAccumulator:
    files = sorted((run_dir / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_size)
    acc = EventAccumulator(str(files[-1]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_split_is_seeded_disjoint_and_keeps_manifest_order():
    clips = [Clip(Path(f"c{i}.mp4"), f"clip {i}") for i in range(10)]
    train, held = split_validation(clips, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(clips)
    assert split_validation(clips, 0.2, seed=3) == (train, held)
    assert train == [c for c in clips if c in train]
    assert split_validation(clips, 0.0, seed=3) == (clips, [])
    assert len(split_validation(clips, 0.01, seed=3)[1]) == 1  # any fraction > 0 holds out at least one clip
    with pytest.raises(DataError, match=r"data.validation_split=0.5 holds out 1 of 1 clips, leaving none"):
        split_validation(clips[:1], 0.5, seed=0)


def test_split_and_second_manifest_are_exclusive_and_bounded():
    data = {"frames": 9, "height": 32, "width": 32, "validation_split": 0.2, "validation_manifest": "val.jsonl"}
    with pytest.raises(RecipeError, match="held-out clips come from one or the other"):
        recipe_from_dict({"model": {"family": "wan", "tiny": True}, "data": data})
    data = {"frames": 9, "height": 32, "width": 32, "validation_split": 0.9}
    with pytest.raises(RecipeError, match=r"data.validation_split=0.9: Input should be less than or equal to 0.5"):
        recipe_from_dict({"model": {"family": "wan", "tiny": True}, "data": data})


def test_val_loss_on_held_out_clips_and_base_vs_lora_samples_in_tensorboard(tmp_path):
    manifest = write_clips(tmp_path / "clips", n=4, frames=9, height=32, width=32)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run", "optim.steps=2", "checkpoint.every=0",
                         "data.validation_split=0.25", "validation.every=1", "validation.steps=2",
                         "validation.prompts=[mystyle a square]")
    result = trainer.train(recipe)

    # One clip held out: cached like the others, never trained on.
    assert len(result.dataset) == 3 and len(result.val_dataset) == 1
    held = result.val_dataset.entries[0].latents
    assert held.is_file() and held not in {e.latents for e in result.dataset.entries}

    events = _events(result.run_dir)
    val = {e.step: e.value for e in events.Scalars("val_loss")}
    assert sorted(val) == [0, 1, 2]  # before training, then every validation.every steps
    # It is the fixed-noise loss of the held-out clip under the final adapter.
    expert = trainer.trained_experts(recipe, result.family)
    again = trainer.validation_loss(trainer.make_accelerator(recipe, tmp_path / "again"), result.family,
                                    [result.family.components.transformer], expert, result.val_dataset, recipe)
    assert val[2] == pytest.approx(again, rel=1e-4)

    # base | LoRA, side by side, at every sampling step; the base rendered once into samples/.
    images = events.Images("samples/base_vs_lora_0")
    assert [im.step for im in images] == [1, 2]
    assert (images[0].width, images[0].height) == (2 * 32 + 2, 32)
    assert images[0].encoded_image_string[:6] == b"GIF89a"  # animated: TensorBoard plays it as a video
    assert (result.run_dir / "samples" / "base-0.mp4").is_file()


def test_a_skipped_training_clip_does_not_shift_the_held_out_ones(tmp_path, monkeypatch):
    """build_cache drops clips it cannot use; the held-out entries must still be the held-out clips'."""
    from finetune.cache import latent_fingerprint

    manifest = write_clips(tmp_path / "clips", n=4, frames=9, height=32, width=32)
    recipe = tiny_recipe("wan", manifest, tmp_path / "run", "optim.steps=1", "checkpoint.every=0",
                         "data.validation_split=0.25")
    train_clips, held = trainer.training_and_held_out(recipe)
    train_clips[0].path.write_bytes(b"not a video")  # a training clip that cannot be decoded
    keys, build = [], trainer.build_cache
    monkeypatch.setattr(trainer, "build_cache", lambda family, clips, key, *a, **k: keys.append(key) or
                        build(family, clips, key, *a, **k))
    result = trainer.train(recipe)
    assert len(result.dataset) == 2 and len(result.val_dataset) == 1
    assert result.val_dataset.entries[0].latents.stem == latent_fingerprint(held[0], keys[0])
