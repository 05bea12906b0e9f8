"""Fades and dissolves are shot boundaries: on footage made from two real sample clips with a
transition at known frames, no shot and no clip contains a frame of it; hard cuts stay as they were
(the known cuts of the sample videos: test_data_prep_synth)."""

from __future__ import annotations

import pytest
from data_prep_fixtures import ASSETS, SYNTH_CUTS, TRANSITIONS, write_transition

from data_prep import PrepOptions, prepare
from data_prep.manifest import read_jsonl
from data_prep.probe import probe_file
from data_prep.split import detect_shots, merge_ranges, shot_ranges

KIND = {"dissolve.mp4": "dissolve", "fade_black.mp4": "fade"}


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    root = tmp_path_factory.mktemp("transitions")
    for name, kind in KIND.items():
        write_transition(root / name, kind)
    return root


def overlaps(a: int, b: int, lo: int, hi: int) -> bool:
    return a < hi and lo < b


@pytest.mark.parametrize("name", sorted(KIND))
def test_transition_frames_are_in_no_shot(footage, name):
    lo, hi = TRANSITIONS[name]
    shots = detect_shots(probe_file(footage / name))
    assert len(shots.shots) == 2, shots.shots  # one shot each side
    assert shots.shots[0].end_frame <= lo and shots.shots[1].start_frame >= hi
    assert any(a <= lo and hi <= b for a, b in shots.transitions), shots.transitions
    # the detector is not greedy: most of each 48-frame source clip is kept
    assert shots.shots[0].end_frame - shots.shots[0].start_frame >= 24
    assert shots.shots[1].end_frame - shots.shots[1].start_frame >= 20


@pytest.mark.parametrize("name", sorted(KIND))
def test_without_transitions_the_dissolve_is_one_shot(footage, name):
    """The option is what makes the difference: PySceneDetect's content detectors alone miss it."""
    shots = detect_shots(probe_file(footage / name), transitions=False)
    assert shots.transitions == []
    assert any(overlaps(s.start_frame, s.end_frame, *TRANSITIONS[name]) for s in shots.shots)


def test_no_clip_contains_a_transition(footage, tmp_path):
    opts = PrepOptions(family="wan", frames=9, fps=24, size="64x48", buckets="fixed", mode="sliding", stride=4,
                       filter=False, progress=False)  # fmt: skip
    summary = prepare(footage, tmp_path / "ds", opts, steps=("probe", "split", "cut", "filter", "manifest"))
    rows = read_jsonl(tmp_path / "ds" / "manifest.jsonl")
    assert summary.exit_code == 0
    for name in KIND:
        lo, hi = TRANSITIONS[name]
        mine = [r for r in rows if r["source"].endswith(name)]
        assert {r["shot"] for r in mine} == {0, 1}, name
        for r in mine:
            assert not overlaps(r["start_frame"], r["end_frame"], lo, hi), (name, r)


@pytest.mark.parametrize("name,cuts", [("synth_lavfi.mp4", SYNTH_CUTS), ("oa4_launch.webm", [74]), ("bigbuckbunny.mp4", [])])
def test_hard_cut_samples_have_no_transitions(name, cuts):
    """Moving test patterns, a slow gradient, a dark Mandelbrot, smoke and a panning bunny: none is
    a fade or a dissolve, so the shots are exactly those between the known hard cuts."""
    shots = detect_shots(probe_file(ASSETS / name))
    assert shots.transitions == [] and shots.cuts == cuts
    assert [(s.start_frame, s.end_frame) for s in shots.shots] == list(zip([0, *cuts], [*cuts, shots.frames]))


def test_shot_ranges_leave_transitions_out():
    assert shot_ranges(100, [50], []) == [(0, 50), (50, 100)]
    assert shot_ranges(100, [], [(30, 40)]) == [(0, 30), (40, 100)]
    assert shot_ranges(100, [50], [(45, 55)]) == [(0, 45), (55, 100)]
    assert shot_ranges(100, [], [(0, 10), (90, 100)]) == [(10, 90)]
    assert merge_ranges([(5, 10), (8, 12), (12, 14), (-3, 1), (99, 120)], 100) == [(0, 1), (5, 14), (99, 100)]
