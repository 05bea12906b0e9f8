"""data_prep keeps sound: a clip cut from a source with an audio track carries the same time range
of it (48 kHz stereo AAC, as long as the video within one AAC frame), the manifest says so, a
silent source still gives clips (``audio: false``), and ``--no-audio`` drops the sound."""

from __future__ import annotations

import shutil

import av
import numpy as np
import pytest
from data_prep_fixtures import ASSETS, SYNTH

from data_prep import PrepOptions, prepare
from data_prep.__main__ import build_parser
from data_prep.cut import CLIP_AUDIO_RATE
from data_prep.manifest import read_jsonl
from finetune.video import read_audio

AAC_FRAME = 1024  # samples per AAC frame
BUNNY = ASSETS / "bigbuckbunny.mp4"  # AAC 48 kHz, 5.3 s (tests/assets/ATTRIBUTION.md)


def streams(path) -> dict[str, float]:
    """Duration in seconds of each stream of ``path`` by type, from its packets."""
    out = {}
    with av.open(str(path)) as c:
        for s in c.streams:
            out[s.type] = float(s.duration * s.time_base)
            if s.type == "audio":
                out["rate"], out["channels"] = s.codec_context.sample_rate, s.codec_context.layout.nb_channels
                out["codec"] = s.codec_context.name
    return out


def prep(root, **kw):
    opts = PrepOptions(family="ltx2", frames=9, fps=8, size="64x64", buckets="fixed", mode="uniform",
                       clips_per_shot=2, filter=False, progress=False, workers=1, **kw)
    return prepare(root / "footage", root / "dataset", opts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    (root / "footage").mkdir()
    for src in (BUNNY, SYNTH):
        shutil.copy(src, root / "footage" / src.name)
    summary = prep(root)
    return root, summary


def test_clips_of_a_source_with_sound_keep_that_time_range(dataset):
    root, summary = dataset
    assert summary.exit_code == 0
    rows = [r for r in read_jsonl(root / "dataset" / "manifest.jsonl") if r["source"].endswith(BUNNY.name)]
    assert len(rows) == 2 and rows[1]["start_time"] > 1.0  # uniform: one at the head, one later
    for row in rows:
        clip = root / "dataset" / row["path"]
        s = streams(clip)
        assert row["audio"] is True
        assert (s["codec"], s["rate"], s["channels"]) == ("aac", CLIP_AUDIO_RATE, 2)
        assert abs(s["audio"] - s["video"]) <= AAC_FRAME / CLIP_AUDIO_RATE, s
        # the clip's sound is the source's over the clip's range, not its start
        duration = row["frames"] / row["fps"]
        got = read_audio(clip, CLIP_AUDIO_RATE, 2, duration=duration)[0]
        same = read_audio(BUNNY, CLIP_AUDIO_RATE, 2, start=row["start_time"], duration=duration)[0]
        other = read_audio(BUNNY, CLIP_AUDIO_RATE, 2, start=row["start_time"] + 0.5, duration=duration)[0]
        assert np.abs(same).max() > 0.01  # there is sound to compare
        err_same, err_other = np.abs(got - same).mean(), np.abs(got - other).mean()
        assert err_same < 0.2 * err_other, (err_same, err_other)


def test_a_silent_source_gives_clips_without_sound(dataset):
    root, _ = dataset
    rows = [r for r in read_jsonl(root / "dataset" / "manifest.jsonl") if r["source"].endswith(SYNTH.name)]
    assert rows
    for row in rows:
        assert row["audio"] is False
        assert "audio" not in streams(root / "dataset" / row["path"])


def test_no_audio_drops_the_sound_and_recuts(tmp_path):
    (tmp_path / "footage").mkdir()
    shutil.copy(BUNNY, tmp_path / "footage" / BUNNY.name)
    assert prep(tmp_path).clips_written == 2
    summary = prep(tmp_path, audio=False)
    assert summary.clips_written == 2  # the setting is part of each clip's fingerprint
    for row in read_jsonl(tmp_path / "dataset" / "manifest.jsonl"):
        assert row["audio"] is False
        assert "audio" not in streams(tmp_path / "dataset" / row["path"])


def test_the_command_line_has_no_audio():
    args = build_parser().parse_args(["prepare", "footage", "dataset", "--no-audio"])
    assert args.audio is False
    assert "audio" not in vars(build_parser().parse_args(["prepare", "footage", "dataset"]))
