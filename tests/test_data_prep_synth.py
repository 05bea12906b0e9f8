"""data_prep on the sample videos with known cuts (tests/assets/ATTRIBUTION.md): shots found at the
listed frames, clips that never span a cut, every clip frame-exact at the requested size and fps."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import pytest
from data_prep_fixtures import ASSETS, SYNTH, SYNTH_CUTS, SYNTH_FRAMES, copy_synth

from data_prep import PrepOptions, prepare
from data_prep.manifest import MANIFEST_KEYS, read_jsonl
from data_prep.probe import probe_file
from data_prep.split import detect_shots

KNOWN_CUTS = {"synth_lavfi.mp4": SYNTH_CUTS, "bigbuckbunny.mp4": [], "oa4_launch.webm": [74]}


@pytest.mark.parametrize("detector", ["adaptive", "content"])
@pytest.mark.parametrize("name", sorted(KNOWN_CUTS))
def test_detectors_find_the_known_cuts(name, detector):
    shots = detect_shots(probe_file(ASSETS / name), detector)
    assert shots.cuts == KNOWN_CUTS[name]
    assert shots.shots[0].start_frame == 0 and shots.shots[-1].end_frame == shots.frames
    assert all(a.end_frame == b.start_frame for a, b in zip(shots.shots, shots.shots[1:]))


def decoded(path: Path) -> tuple[list, av.video.stream.VideoStream, str, str]:
    """Every frame of a clip, plus its stream facts (codec, pix_fmt)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        return frames, s.average_rate, s.codec_context.name, frames[0].format.name


def assert_clip_exact(root: Path, row: dict) -> None:
    frames, rate, codec, pix_fmt = decoded(root / row["path"])
    assert len(frames) == row["frames"], row["path"]
    assert rate == Fraction(row["fps"]).limit_denominator(1001)
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert {(f.width, f.height) for f in frames} == {(row["width"], row["height"])}
    pts = [f.pts for f in frames]
    steps = {b - a for a, b in zip(pts, pts[1:])}
    assert len(steps) == 1, f"{row['path']} is not constant frame rate: pts steps {steps}"


def assert_inside_shots(row: dict, cuts: list[int], n_frames: int) -> None:
    bounds = [0, *cuts, n_frames]
    shot = row["shot"]
    assert bounds[shot] <= row["start_frame"] < row["end_frame"] <= bounds[shot + 1], row


@pytest.fixture(scope="module")
def synth_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_wan")
    footage = copy_synth(root / "footage")
    opts = PrepOptions(family="wan", frames=17, fps=16, size="128x96", trigger="mystyle", progress=False)
    summary = prepare(footage, root / "dataset", opts)
    return root / "dataset", summary


def test_synth_head_mode_clips_are_exact_and_inside_shots(synth_wan):
    dataset, summary = synth_wan
    assert summary.cuts[str(next(iter(summary.cuts)))] == SYNTH_CUTS
    assert summary.exit_code == 0 and not summary.skipped
    rows = read_jsonl(dataset / "manifest.jsonl")
    rejected = read_jsonl(dataset / "rejected.jsonl")
    # one clip at the head of each of the 7 shots; some are set aside (static bars, smooth gradient)
    assert len(rows) + len(rejected) == len(SYNTH_CUTS) + 1
    assert sorted(r["shot"] for r in rows + rejected) == list(range(7))
    for row in rows + rejected:
        assert (row["frames"], row["fps"], row["width"], row["height"]) == (17, 16.0, 128, 96)
        assert_inside_shots(row, SYNTH_CUTS, SYNTH_FRAMES)
        assert_clip_exact(dataset, row)
    for row in rows:
        assert list(row) == list(MANIFEST_KEYS)
        assert row["caption"].startswith("mystyle, ") and row["caption"].count("mystyle") == 1
        assert row["start_frame"] in [0, *SYNTH_CUTS]
        # 17 frames at 16 fps span 1 s: 24 source frames at 24 fps, end exclusive
        assert row["end_frame"] - row["start_frame"] == 25
        assert row["end_time"] == pytest.approx(row["start_time"] + 17 / 16)
    assert all(r["reason"] for r in rejected)


def test_synth_clip_frames_come_from_the_right_source_frames(synth_wan):
    """Output frame j of a clip is the source frame nearest in time (ties to the earlier one):
    start + ceil(j * 24/16 - 1/2). Resampling keeps the real speed."""
    import math

    import numpy as np

    from data_prep.cut import frame_to_rgb

    dataset, _ = synth_wan
    row = read_jsonl(dataset / "manifest.jsonl")[0]
    with av.open(str(SYNTH)) as c:
        src = [f for i, f in zip(range(row["end_frame"]), c.decode(video=0))]
    clip, *_ = decoded(dataset / row["path"])
    for j in (0, 1, 5, 16):
        k_want = row["start_frame"] + math.ceil(j * 1.5 - 0.5)
        want = frame_to_rgb(src[k_want], 0, 128, 96).astype(int)
        got = clip[j].to_ndarray(format="rgb24").astype(int)
        others = [frame_to_rgb(src[k], 0, 128, 96).astype(int) for k in range(len(src)) if k != k_want]
        err = np.abs(got - want).mean()
        assert err < min(np.abs(got - o).mean() for o in others), j


def test_manifest_loads_with_datasets(synth_wan):
    import datasets

    dataset, _ = synth_wan
    ds = datasets.load_dataset("json", data_files=str(dataset / "manifest.jsonl"), split="train")
    assert ds.column_names == list(MANIFEST_KEYS)
    assert len(ds) == len(read_jsonl(dataset / "manifest.jsonl"))
    assert all((dataset / p).is_file() for p in ds["path"])
    card = (dataset / "README.md").read_text()
    assert "manifest.jsonl" in card and "wan" in card and "4k+1" in card


def test_synth_report_lists_clips_and_rejects(synth_wan):
    from PIL import Image

    dataset, _ = synth_wan
    page = (dataset / "report.html").read_text()
    rows = read_jsonl(dataset / "manifest.jsonl")
    rejected = read_jsonl(dataset / "rejected.jsonl")
    assert page.count("<video") == len(rows) + len(rejected)
    for r in rejected:
        assert r["path"] in page and r["reason"].split(" (")[0] in page
    sheet = Image.open(dataset / "contact_sheet.png")
    assert sheet.height >= 96 * (len(rows) + len(rejected))


def test_synth_sliding_windows_ltx(tmp_path):
    """LTX (8k+1, spatial 32) with overlapping sliding windows: still inside shots and exact."""
    footage = copy_synth(tmp_path / "footage")
    opts = PrepOptions(family="ltx", frames=9, fps=24, size="128x96", mode="sliding", stride=8, filter=False, progress=False)
    summary = prepare(footage, tmp_path / "ds", opts, steps=("probe", "split", "cut", "filter", "manifest"))
    rows = read_jsonl(tmp_path / "ds" / "manifest.jsonl")
    # shot lengths 60 50 45 55 40 65 50: windows of 9 frames every 8 frames fit (len - 9) // 8 + 1 times
    assert len(rows) == sum((n - 9) // 8 + 1 for n in (60, 50, 45, 55, 40, 65, 50)) == summary.clips
    for row in rows:
        assert_inside_shots(row, SYNTH_CUTS, SYNTH_FRAMES)
        assert row["end_frame"] - row["start_frame"] == 9  # same fps: one source frame per clip frame
    for row in rows[::7]:
        assert_clip_exact(tmp_path / "ds", row)


def test_uniform_mode_spreads_clips_over_the_shot(tmp_path):
    footage = copy_synth(tmp_path / "footage")
    opts = PrepOptions(family="wan", frames=5, fps=8, size="64x48", mode="uniform", clips_per_shot=3, filter=False, progress=False)
    prepare(footage, tmp_path / "ds", opts, steps=("probe", "split", "cut", "filter", "manifest"))
    rows = read_jsonl(tmp_path / "ds" / "manifest.jsonl")
    assert len(rows) == 21
    first_shot = [r for r in rows if r["shot"] == 0]
    # shot 0 is frames 0..59; 5 frames at 8 fps span 0.5 s = 12 source frames: starts 0, 23/24, 47
    assert [r["start_frame"] for r in first_shot][0] == 0 and first_shot[-1]["end_frame"] == 60
    assert json.loads((tmp_path / "ds" / "prep_state.json").read_text())["cut_settings"]["mode"] == "uniform"


def test_manifest_feeds_a_tiny_training_run(synth_wan, tmp_path):
    """The spine's trainer reads the manifest as written: the tiny Wan recipe, a few steps."""
    from finetune import trainer
    from finetune.config import load_recipe
    from finetune.data import load_manifest

    dataset, _ = synth_wan
    manifest = dataset / "manifest.jsonl"
    clips = load_manifest(manifest, trigger="mystyle")
    assert len(clips) == len(read_jsonl(manifest)) and all(c.caption.count("mystyle") == 1 for c in clips)
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(
        root / "recipes" / "tiny" / "wan.yaml",
        [f"data.manifest={manifest}", f"output.dir={tmp_path / 'run'}", "optim.steps=2", "checkpoint.every=0"],
    )
    result = trainer.train(recipe)
    assert result is not None
    assert any((tmp_path / "run").rglob("*.safetensors"))
