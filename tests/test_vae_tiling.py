"""memory.vae_tiling: tiled VAE encoding at cache time (finetune/weights/vae.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe
from finetune import trainer
from finetune.cache import latent_fingerprint
from finetune.config import load_recipe
from finetune.data import load_manifest
from finetune.errors import RecipeError
from finetune.families import get_family
from finetune.families.base import ModelSpec
from finetune.weights import vae as vae_tiling


def smooth_video(frames: int, size: int) -> torch.Tensor:
    """[1, 3, F, H, W] in about [-1, 1]: seeded noise blurred, so it has structure across tiles."""
    x = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return (torch.nn.functional.avg_pool3d(x, (1, 9, 9), 1, (0, 4, 4)) * 3).clamp(-1, 1)


# One family per VAE class that others share: the Wan VAE (wan, wan22, longcat) and the
# HunyuanVideo VAE (hunyuanvideo, kandinsky5). Tolerance: relative L2 difference of the latents
# below 0.15 (measured 0.075 and 0.025). The tiny VAEs have random weights, so their overlapping
# tiles blend less smoothly than a trained VAE's; what the test guards is that tiling runs and
# keeps the latents' shape and content, not a trained model's fidelity.
@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_tiled_encode_tiles_and_is_close_to_untiled(family):
    cls = get_family(family)
    fam = cls.load(ModelSpec(pretrained="tiny", tiny=True, vae_tiling="off"))
    vae = fam.components.vae
    tile_h, tile_w = vae_tiling.tile_size(vae)
    size = max(tile_h, tile_w) * 5 // 4  # two overlapping tiles a side
    video = smooth_video(cls.frame_rule.temporal_factor + 1, size)
    calls = []
    real = vae.tiled_encode
    vae.tiled_encode = lambda *a, **k: (calls.append(a[0].shape), real(*a, **k))[1]
    with torch.no_grad():
        whole = fam.encode_videos(video, generator=torch.Generator().manual_seed(1))
        assert not calls and not fam.vae_tiling_on()
        fam.set_vae_tiling(True)
        tiled = fam.encode_videos(video, generator=torch.Generator().manual_seed(1))
    assert fam.vae_tiling_on() and len(calls) == 1, "the VAE did not encode in tiles"
    assert tiled.shape == whole.shape
    rel = float((tiled - whole).norm() / whole.norm())
    assert rel < 0.15, f"tiled latents differ from untiled by {rel:.3f} (relative L2)"


def test_auto_tiles_on_a_gpu_only_and_off_switches_it_off():
    assert vae_tiling.wanted("auto", "cuda") is True
    assert vae_tiling.wanted("auto", "cpu") is None
    assert vae_tiling.wanted("on", "cpu") is True and vae_tiling.wanted("off", "cuda") is False
    fam = get_family("wan").load(ModelSpec(pretrained="tiny", tiny=True, vae_tiling="on"))
    assert fam.vae_tiling_on() and fam.components.vae.use_slicing
    fam.set_vae_tiling(False)
    assert not fam.vae_tiling_on()


def test_tiling_is_part_of_the_latent_fingerprint(clips, tmp_path):
    keys = {}
    for mode in ("off", "on"):
        recipe = tiny_recipe("wan", clips, tmp_path / "run", f"memory.vae_tiling={mode}")
        fam = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
        keys[mode] = trainer.cache_key(recipe, fam)
    assert (keys["off"].vae_tiling, keys["on"].vae_tiling) == (False, True)
    clip = load_manifest(clips)[0]
    assert latent_fingerprint(clip, keys["off"]) != latent_fingerprint(clip, keys["on"])
    # untiled entries keep the fingerprint they had before the setting existed
    from dataclasses import fields

    assert [f.name for f in fields(keys["off"])][-1] == "vae_tiling"


def test_tiling_on_for_a_family_without_tiles_is_a_named_error(clips, tmp_path, monkeypatch):
    from conftest import tiny_recipe_path

    monkeypatch.setattr(get_family("wan"), "vae_tiles", False)
    with pytest.raises(RecipeError, match=r"memory.vae_tiling='on': wan's VAE cannot encode in tiles"):
        load_recipe(tiny_recipe_path("wan"), [f"data.manifest={clips}", "memory.vae_tiling=on"])
    # the same at load time, for code that builds a spec without a recipe
    with pytest.raises(vae_tiling.VaeTilingUnsupported, match="memory.vae_tiling=on: wan's VAE"):
        get_family("wan").load(ModelSpec(pretrained="tiny", tiny=True, vae_tiling="on"))
    # auto and off stay quiet: there is nothing to switch
    get_family("wan").load(ModelSpec(pretrained="tiny", tiny=True, vae_tiling="auto"))


def test_the_planner_counts_one_tile_of_encode_working_memory():
    from finetune.memory.planner import caching_phase

    path = "recipes/wan/i2v-14b_16gb.yaml"
    work = {}
    for mode in ("off", "on", "auto"):
        phase = caching_phase(load_recipe(path, [f"memory.vae_tiling={mode}"]), 81)[0]
        (item,) = [it for it in phase.items if it[0].startswith("VAE encode working memory")]
        work[mode] = item
    assert work["auto"] == work["on"] and "tiled 256x256" in work["on"][0]
    # 480x832 against 256x256 tiles: the frame is 6.1 tiles
    assert work["off"][1] / work["on"][1] == pytest.approx(480 * 832 / (256 * 256))


@pytest.mark.parametrize("family", sorted({c.partition(":")[0] for c in __import__("conftest").registry_cases()}))
def test_every_tiny_vae_encodes_with_tiling_on(family, tmp_path):
    """memory.vae_tiling=on (the GPU default) must not break a family's tiny recipe: the latents keep
    their shape (the tiny CogVideoX VAE's tiles follow its small sample size and needed widening)."""
    recipe = tiny_recipe(family, tmp_path / "manifest.jsonl", tmp_path / "run", "memory.vae_tiling=on")
    fam = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
    assert fam.vae_tiling_on()
    d = recipe.data
    video = smooth_video(d.frames, max(d.height, d.width))[..., :d.height, :d.width]
    with torch.no_grad():
        tiled = fam.encode_videos(video, generator=torch.Generator().manual_seed(0))
        fam.set_vae_tiling(False)
        whole = fam.encode_videos(video, generator=torch.Generator().manual_seed(0))
    assert tiled.shape == whole.shape
