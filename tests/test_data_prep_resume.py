"""Resuming: a second run does no work; a changed setting redoes only what depends on it; captions a
person wrote survive; the trigger word is applied once."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_prep_fixtures import write_video

from data_prep import PrepOptions, on_dataset, prepare
from data_prep.caption import apply_trigger, words_from_name
from data_prep.manifest import read_jsonl


def small_footage(root: Path) -> Path:
    root.mkdir(parents=True)
    write_video(root / "cat_jumping.mp4", 24)
    write_video(root / "dog-running.mp4", 24)
    (root / "dog-running.txt").write_text("a [trigger] dog running on a beach")
    return root


def opts(**kw) -> PrepOptions:
    base = dict(family="wan", frames=5, fps=8, size="64x48", trigger="mystyle", progress=False)
    return PrepOptions(**{**base, **kw})


@pytest.fixture
def footage(tmp_path):
    return small_footage(tmp_path / "footage")


def test_second_run_does_no_work(footage, tmp_path):
    first = prepare(footage, tmp_path / "ds", opts())
    assert (first.files_probed, first.files_split, first.clips_written, first.captions_made) == (2, 2, 2, 2)
    assert first.manifest_written and first.report_written
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*") if p.is_file() and p.name != "prep_state.json"}
    again = prepare(footage, tmp_path / "ds", opts())
    assert (again.files_probed, again.files_split, again.clips_written, again.captions_made) == (0, 0, 0, 0)
    assert not again.manifest_written and not again.report_written
    assert again.clips == first.clips == 2
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*") if p.is_file() and p.name != "prep_state.json"}
    assert after == mtimes, "a run with nothing to do must not rewrite any file"


def test_changing_frames_redoes_cut_caption_and_manifest_only(footage, tmp_path):
    prepare(footage, tmp_path / "ds", opts())
    changed = prepare(footage, tmp_path / "ds", opts(frames=9))
    assert (changed.files_probed, changed.files_split) == (0, 0)
    assert changed.clips_written == 2 and changed.captions_made == 2 and changed.manifest_written
    assert {r["frames"] for r in read_jsonl(tmp_path / "ds" / "manifest.jsonl")} == {9}


def test_changing_the_detector_resplits_but_keeps_probes(footage, tmp_path):
    prepare(footage, tmp_path / "ds", opts())
    changed = prepare(footage, tmp_path / "ds", opts(detector="content"))
    assert changed.files_probed == 0 and changed.files_split == 2
    assert changed.clips_written == 0  # the same shots, so the same clips


def test_a_touched_source_is_redone(footage, tmp_path):
    prepare(footage, tmp_path / "ds", opts())
    write_video(footage / "cat_jumping.mp4", 30)
    again = prepare(footage, tmp_path / "ds", opts())
    assert (again.files_probed, again.files_split, again.clips_written) == (1, 1, 1)


def test_stale_clips_are_removed_when_the_plan_changes(footage, tmp_path):
    prepare(footage, tmp_path / "ds", opts(mode="sliding", stride=1, filter=False))
    many = {p.name for p in (tmp_path / "ds" / "clips").glob("*.mp4")}
    prepare(footage, tmp_path / "ds", opts(mode="head", filter=False))
    few = {p.name for p in (tmp_path / "ds" / "clips").glob("*.mp4")}
    assert len(few) == 2 < len(many) and few < many


def test_template_captions_and_trigger_placeholder(footage, tmp_path):
    prepare(footage, tmp_path / "ds", opts())
    caps = {Path(r["source"]).name: r["caption"] for r in read_jsonl(tmp_path / "ds" / "manifest.jsonl")}
    assert caps == {"cat_jumping.mp4": "mystyle, cat jumping", "dog-running.mp4": "a mystyle dog running on a beach"}


def test_human_captions_survive_and_trigger_is_applied_once(footage, tmp_path):
    ds = tmp_path / "ds"
    prepare(footage, ds, opts())
    cat = next(p for p in (ds / "clips").glob("cat_jumping*.txt"))
    cat.write_text("a grey cat leaps onto a sofa")  # a person edits a caption
    again = on_dataset(ds, opts(), steps=("caption", "manifest"))
    assert again.captions_made == 0 and again.human_captions == 1
    rows = {Path(r["source"]).name: r["caption"] for r in read_jsonl(ds / "manifest.jsonl")}
    assert rows["cat_jumping.mp4"] == "mystyle, a grey cat leaps onto a sofa"
    assert cat.read_text() == "a grey cat leaps onto a sofa", "a person's file is never rewritten"
    # re-runs (also a full prepare, and after the clip itself is re-cut) never double the trigger
    for o in (opts(), opts(frames=9)):
        prepare(footage, ds, o)
        rows = {Path(r["source"]).name: r["caption"] for r in read_jsonl(ds / "manifest.jsonl")}
        assert rows["cat_jumping.mp4"] == "mystyle, a grey cat leaps onto a sofa"
        assert all(c.count("mystyle") == 1 for c in rows.values())
    # --overwrite replaces it (machine captions that are up to date are not made again)
    over = on_dataset(ds, opts(overwrite=True), steps=("caption", "manifest"))
    assert over.captions_made == 1 and over.human_captions == 0
    rows = {Path(r["source"]).name: r["caption"] for r in read_jsonl(ds / "manifest.jsonl")}
    assert rows["cat_jumping.mp4"] == "mystyle, cat jumping"


def test_caption_written_before_the_first_caption_run_is_kept(footage, tmp_path):
    ds = tmp_path / "ds"
    prepare(footage, ds, opts(), steps=("probe", "split", "cut", "filter", "manifest"))
    dog = next(p for p in (ds / "clips").glob("dog-running*.mp4"))
    dog.with_suffix(".txt").write_text("mystyle, a dog chasing a ball")
    on_dataset(ds, opts(), steps=("caption", "manifest"))
    rows = {Path(r["source"]).name: r["caption"] for r in read_jsonl(ds / "manifest.jsonl")}
    assert rows["dog-running.mp4"] == "mystyle, a dog chasing a ball"


@pytest.mark.parametrize(
    "caption,trigger,want",
    [
        ("a cat", "mystyle", "mystyle, a cat"),
        ("mystyle, a cat", "mystyle", "mystyle, a cat"),
        ("a [trigger] cat", "mystyle", "a mystyle cat"),
        ("[trigger], a cat", "mystyle", "mystyle, a cat"),
        ("a cat", "", "a cat"),
        ("a mystyles cat", "mystyle", "mystyle, a mystyles cat"),  # whole words only
        ("", "mystyle", "mystyle"),
    ],
)
def test_apply_trigger(caption, trigger, want):
    assert apply_trigger(caption, trigger) == want
    assert apply_trigger(apply_trigger(caption, trigger), trigger) == want


def test_words_from_name():
    assert words_from_name("footage/my_cat-jumping.02.mp4") == "my cat jumping 02"


def test_filter_sets_aside_static_dark_blurred_and_duplicates(tmp_path):
    import numpy as np

    from data_prep_fixtures import texture_frame

    f = tmp_path / "footage"
    f.mkdir()
    write_video(f / "a_moving.mp4", 24, frame_fn=lambda i: texture_frame(i, seed=1))
    write_video(f / "b_copy.mp4", 24, frame_fn=lambda i: texture_frame(i, seed=1))
    write_video(f / "c_static.mp4", 24, frame_fn=lambda i: texture_frame(0, seed=2))
    write_video(f / "d_dark.mp4", 24, frame_fn=lambda i: texture_frame(i, seed=3) // 16)
    write_video(f / "e_blurred.mp4", 24, frame_fn=lambda i: np.full((48, 64, 3), 60 + 4 * i, np.uint8))
    s = prepare(f, tmp_path / "ds", opts(), steps=("probe", "split", "cut", "filter", "manifest"))
    reasons = {Path(r["source"]).name: r["reason"] for r in read_jsonl(tmp_path / "ds" / "rejected.jsonl")}
    assert set(reasons) == {"b_copy.mp4", "c_static.mp4", "d_dark.mp4", "e_blurred.mp4"}
    assert reasons["b_copy.mp4"].startswith("near-duplicate of a_moving")
    assert reasons["c_static.mp4"].startswith("nearly static")
    assert reasons["d_dark.mp4"].startswith("too dark")
    assert reasons["e_blurred.mp4"].startswith("blurred")
    assert s.clips == 1 and s.rejected == 4
    assert all((tmp_path / "ds" / "clips" / Path(r["path"]).name).is_file() for r in read_jsonl(tmp_path / "ds" / "rejected.jsonl"))
    # thresholds changed afterwards: no re-cut, just a new decision
    again = on_dataset(tmp_path / "ds", opts(filter=False), steps=("filter", "manifest"))
    assert again.clips == 5 and again.clips_written == 0
