"""data_prep on messy inputs: a corpus generated in code (tests/data_prep_fixtures.py) with broken
files and awkward good ones. Every good file is used, every bad one named with its reason, and the
exit status and summary count the skipped ones."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from data_prep_fixtures import BAD, GOOD, MPEGPS_CUT, TOO_SHORT, build_corpus, texture_frame

from data_prep.__main__ import main
from data_prep.manifest import read_jsonl
from data_prep.pipeline import EXIT_SKIPPED
from data_prep.probe import probe_file

ARGS = ["--family", "wan", "--frames", "5", "--fps", "8", "--size", "64x48", "--trigger", "mystyle", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "footage")


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime) for p in corpus.iterdir()}
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    code = main(["prepare", str(corpus), str(out), *ARGS, "--json"])
    after = {p.name: (p.stat().st_size, p.stat().st_mtime) for p in corpus.iterdir()}
    assert before == after, "the footage folder must never be modified"
    return out, code


@pytest.mark.parametrize("name,words", sorted(BAD.items()))
def test_probe_names_the_reason(corpus, name, words):
    res = probe_file(corpus / name)
    assert not res.ok and words in res.reason


def test_probe_records_the_awkward_good_files(corpus):
    rot = probe_file(corpus / "portrait_rot90.mp4")
    assert rot.ok and rot.rotation == 90 and rot.display_size == (48, 64)
    vfr = probe_file(corpus / "vfr.mp4")
    assert vfr.ok and vfr.vfr and not probe_file(corpus / "plain.mp4").vfr
    assert probe_file(corpus / "tenbit.mp4").bit_depth == 10
    assert probe_file(corpus / "theora.ogv").codec == "theora"
    ps = probe_file(corpus / "mpegps_offset.mpg")
    assert ps.start_time > 0 and ps.frames == 40 and not ps.decord_exact
    assert probe_file(corpus / "one_frame.mp4").frames == 1


def test_prepare_uses_every_good_file_and_names_every_bad_one(prepared, capsys):
    out, code = prepared
    assert code == EXIT_SKIPPED
    rows = read_jsonl(out / "manifest.jsonl") + read_jsonl(out / "rejected.jsonl")
    used = {Path(r["source"]).name for r in rows}
    assert used == set(GOOD)
    state = json.loads((out / "prep_state.json").read_text())
    skipped = {Path(p).name: e["result"]["reason"] for p, e in state["probe"].items() if not e["result"]["ok"]}
    skipped.update({Path(p).name: r for p, r in state["skipped"].items()})
    assert set(skipped) == set(BAD) | set(TOO_SHORT)
    for name, words in {**BAD, **TOO_SHORT}.items():
        assert words in skipped[name]
    page = (out / "report.html").read_text()
    assert all(name in page for name in skipped)


def test_cli_summary_counts_then_names(corpus, tmp_path, capsys):
    code = main(["prepare", str(corpus), str(tmp_path / "ds"), *ARGS, "--no-filter"])
    text = capsys.readouterr().out
    n_bad = len(BAD) + len(TOO_SHORT)
    n_all = n_bad + len(GOOD)
    assert code == EXIT_SKIPPED
    assert f"{n_bad} of {n_all} files skipped: " in text
    assert f"{n_all} files: {len(GOOD)} used, {n_bad} skipped" in text


def test_every_clip_is_exact_including_rotated_vfr_10bit_theora_mpegps(prepared):
    out, _ = prepared
    for row in read_jsonl(out / "manifest.jsonl") + read_jsonl(out / "rejected.jsonl"):
        with av.open(str(out / row["path"])) as c:
            frames = list(c.decode(video=0))
            assert c.streams.video[0].codec_context.name == "h264"
        assert len(frames) == row["frames"] == 5
        assert {(f.width, f.height, f.format.name) for f in frames} == {(row["width"], row["height"], "yuv420p")}
        want = (48, 64) if "portrait" in row["source"] else (64, 48)
        assert (row["width"], row["height"]) == want


def test_rotation_is_applied(prepared, corpus):
    """The portrait clip shows the source frame turned as a player would show it (counter-clockwise 90)."""
    out, _ = prepared
    row = next(r for r in read_jsonl(out / "manifest.jsonl") if "portrait" in r["source"])
    with av.open(str(out / row["path"])) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    src = texture_frame(0, seed=sum(b"portrait_rot90.mp4"))
    right, wrong = np.rot90(src, 1).astype(int), np.rot90(src, -1).astype(int)
    assert np.abs(first - right).mean() < 12 < np.abs(first - wrong).mean()


def test_mpegps_with_start_offset_is_cut_at_the_decoded_frame(prepared):
    """decord puts cuts in MPEG-PS files that start at an offset in the wrong place; our frame
    numbers are PyAV decode order, so the cut is at the frame where the picture changes."""
    out, _ = prepared
    state = json.loads((out / "prep_state.json").read_text())
    shot_file = next(e["file"] for p, e in state["split"].items() if p.endswith(".mpg"))
    shots = json.loads((out / "shots" / shot_file).read_text())
    assert [s["start_frame"] for s in shots["shots"]] == [0, MPEGPS_CUT]
    rows = [r for r in read_jsonl(out / "manifest.jsonl") if r["source"].endswith(".mpg")]
    assert [r["start_frame"] for r in rows] == [0, MPEGPS_CUT]
    assert rows[1]["start_time"] == pytest.approx(MPEGPS_CUT / 25)


def test_vfr_source_is_resampled_by_time(prepared):
    """vfr.mp4 has frames every 80 then 40 ms; 5 frames at 8 fps (every 125 ms) must pick the
    source frames nearest to 0, 125, 250, 375, 500 ms."""
    out, _ = prepared
    state = json.loads((out / "prep_state.json").read_text())
    shot_file = next(e["file"] for p, e in state["split"].items() if p.endswith("vfr.mp4"))
    times = json.loads((out / "shots" / shot_file).read_text())["frame_times"]
    row = next(r for r in read_jsonl(out / "manifest.jsonl") + read_jsonl(out / "rejected.jsonl") if r["source"].endswith("vfr.mp4"))
    want_last = min(range(len(times)), key=lambda i: (abs(times[i] - 0.5), i))
    assert row["end_frame"] == want_last + 1
    assert row["end_time"] == pytest.approx(5 / 8)


def test_nothing_usable_exits_1(tmp_path, corpus):
    footage = tmp_path / "footage"
    footage.mkdir()
    for name in BAD:
        (footage / name).write_bytes((corpus / name).read_bytes())
    assert main(["prepare", str(footage), str(tmp_path / "ds"), *ARGS]) == 1


def test_bad_options_are_all_reported_before_any_work(tmp_path, corpus, capsys):
    code = main(["cut", str(corpus), str(tmp_path / "ds"), "--frames", "80", "--size", "100x48", "--fps", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "frames=80 must be 4k+1 for wan (try 81)" in err
    assert "size 100x48 must be a multiple of 16" in err and "(try 96x48)" in err
    assert not (tmp_path / "ds" / "clips").exists()


def test_cli_probe_runs_as_a_program_without_torch(corpus, tmp_path):
    """`python -m data_prep probe` and `split` never import torch or the families (they stay fast)."""
    import subprocess
    import sys

    code = (
        "import sys; from data_prep.__main__ import main; "
        f"rc = main(['split', {str(corpus)!r}, {str(tmp_path / 'ds')!r}, '--no-progress']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_SKIPPED, run.stderr
    assert "mpegps_offset.mpg: 2 shots, cuts at frames [20]" in run.stdout
    help_text = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True).stdout
    assert "exit status:" in help_text and "3  clips were made, but some inputs were skipped" in help_text


def test_every_registered_family_gets_its_own_clip_rules():
    """``--family`` takes any family in the registry; its frame rule and size factor apply."""
    from data_prep.options import OptionsError, PrepOptions, family_facts, resolve_clip_settings
    from finetune.families import family_names

    for name in family_names():
        facts = family_facts(name)
        frames = facts.frame_rule.nearest(33)
        side = facts.spatial_factor * 8
        fps, buckets = resolve_clip_settings(PrepOptions(family=name, frames=frames, size=f"{side}x{side}"), facts)
        assert fps == facts.default_fps and buckets, name
        with pytest.raises(OptionsError, match=f"for {name}"):
            resolve_clip_settings(PrepOptions(family=name, frames=frames + 1, size=f"{side}x{side}"), facts)
