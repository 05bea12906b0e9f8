"""The demo's promise: a style learned in pixels on the pretrained tiny Wan."""

from __future__ import annotations

import json


from conftest import ROOT
from finetune import demo
from finetune.video import read_clip


def test_the_tiny_base_is_a_diffusers_folder_with_its_story():
    base = ROOT / "assets" / "tiny-wan-base"
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert "python -m finetune.tiny_base" in (base / "README.md").read_text()
    assert "ATTRIBUTION.md" in (base / "README.md").read_text()
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_the_grade_is_black_and_white(tmp_path):
    src = ROOT / "tests" / "assets" / "bigbuckbunny.mp4"
    from finetune.video import write_video

    clip = write_video(((read_clip(src, 5, 8, 32, 32) + 1) / 2).permute(1, 2, 3, 0), tmp_path / "clip.mp4", 8)
    graded = demo.grade_video(clip, tmp_path / "graded.mp4")
    before = ((read_clip(clip, 5, 8, 32, 32) + 1) / 2).permute(1, 2, 3, 0).numpy()
    after = ((read_clip(graded, 5, 8, 32, 32) + 1) / 2).permute(1, 2, 3, 0).numpy()
    assert demo.saturation(before) > 0.2 and demo.saturation(after) < 0.02
    assert after.shape == before.shape


def test_the_lora_render_moves_at_least_halfway_to_the_style(tmp_path):
    """The demo's own check on a short configuration (one clip per shot, fewer steps)."""
    check = demo.run(tmp_path, steps=SHORT_STEPS, clips_per_shot=1)
    assert check.share >= 0.5, check
    for name in ("base_vs_lora.mp4", "base_vs_lora.png", "base.mp4", "lora.mp4"):
        assert (tmp_path / name).is_file()


SHORT_STEPS = 60
