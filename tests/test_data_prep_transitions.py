"""Fades and dissolves are found frame-exactly: real sample shots joined by ffmpeg's xfade and fade
filters, with the mixed frames known from the same edit made of solid colours (data_prep_fixtures.
compose). Shots end within 2 frames of where the mixing starts and begin within 2 frames of where
it ends; every shot long enough for a clip gives one; hard cuts stay exactly where they were; the
review page shows each transition as a strip of frames, marked."""

from __future__ import annotations

import re

import numpy as np
import pytest
from data_prep_fixtures import ASSETS, SYNTH_CUTS, compose
from PIL import Image

from data_prep import PrepOptions, prepare
from data_prep.manifest import read_jsonl
from data_prep.probe import probe_file
from data_prep.report import strip_frames
from data_prep.split import detect_shots, shot_ranges
from data_prep.transitions import find_transitions, fit_ramp, mix_weights

TOL = 2  # frames, at each end

EDITS = {
    "dissolve24": [("bunny", 72), ("dissolve", 24), ("pad", 60)],
    "dissolve16": [("city", 64), ("dissolve", 16), ("rocket", 60)],
    "dissolve8": [("towers", 56), ("dissolve", 8), ("bunny", 56)],
    "fade": [("pad", 60), ("fade", 12, 0, 12), ("towers", 60)],
    "fade_hold": [("bunny", 60), ("fade", 8, 6, 16), ("rocket", 72)],  # the rocket brightens after the fade in
    # the edit a user tried (issue 18): 24-frame dissolve, fade to black and back, 16-frame dissolve
    "four_shots": [("bunny", 96), ("dissolve", 24), ("pad", 72), ("fade", 12, 0, 12), ("city", 96),
                   ("dissolve", 16), ("rocket", 60)],
    "hard_cut": [("bunny", 50), ("cut",), ("rocket", 50)],
}


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    return {name: compose(root / f"{name}.mp4", parts) for name, parts in EDITS.items()}


def overlaps(a: int, b: int, lo: int, hi: int) -> bool:
    return a < hi and lo < b


def test_ground_truth_of_the_edits(edits):
    """The solid-colour twin says what ffmpeg does: an xfade of L frames mixes L - 1 of them, a
    fade of 12 + 12 frames darkens 11, one black frame, 11 lit."""
    assert edits["four_shots"].frames == 284
    assert edits["four_shots"].transitions == [(73, 96), (133, 156), (225, 240)]
    assert edits["dissolve8"].transitions == [(49, 56)]
    assert edits["hard_cut"].transitions == [] and edits["hard_cut"].shots == [(0, 50), (50, 100)]


@pytest.mark.parametrize("name", [n for n in EDITS if n != "hard_cut"])
def test_transitions_are_found_frame_exactly(edits, name):
    edit = edits[name]
    shots = detect_shots(probe_file(edit.path))
    got = [(s.start_frame, s.end_frame) for s in shots.shots]
    assert len(got) == len(edit.shots), (got, edit.shots)
    for (a, b), (ta, tb) in zip(got, edit.shots):
        assert abs(a - ta) <= TOL and abs(b - tb) <= TOL, (got, edit.shots)
    assert len(shots.transitions) == len(edit.transitions), (shots.transitions, edit.transitions)
    for (a, b), (ta, tb) in zip(shots.transitions, edit.transitions):
        assert abs(a - ta) <= TOL and abs(b - tb) <= TOL, (shots.transitions, edit.transitions)
    kinds = ["fade" if "fade" in p else "dissolve" for p in EDITS[name][1::2]]
    assert shots.transition_kinds == kinds


def test_hard_cuts_stay_hard_cuts(edits):
    shots = detect_shots(probe_file(edits["hard_cut"].path))
    assert shots.transitions == [] and shots.cuts == [50]


@pytest.mark.parametrize("name", ["dissolve24", "dissolve16", "dissolve8"])
def test_without_transitions_the_dissolve_is_in_a_shot(edits, name):
    """The option is what makes the difference: PySceneDetect's content detectors alone miss it."""
    edit = edits[name]
    shots = detect_shots(probe_file(edit.path), transitions=False)
    assert shots.transitions == []
    assert any(overlaps(s.start_frame, s.end_frame, *edit.transitions[0]) for s in shots.shots)


@pytest.fixture(scope="module")
def four_shots(edits, tmp_path_factory):
    """The user's run of issue 18 (--mode sliding --family wan --fps 16 --frames 17) on the four-shot
    edit, every step but captions by a model."""
    out = tmp_path_factory.mktemp("four_shots") / "ds"
    opts = PrepOptions(family="wan", frames=17, fps=16, size="64x48", buckets="fixed", mode="sliding", filter=False,
                       progress=False)  # fmt: skip
    return out, prepare(edits["four_shots"].path, out, opts)


def test_every_shot_with_a_clean_second_gives_clips_and_none_holds_a_transition(edits, four_shots):
    """A clip lasts one second, so every shot, the 37 clean frames between the first dissolve and
    the fade included, gives at least one, and no clip holds a mixed or black frame."""
    edit = edits["four_shots"]
    out, summary = four_shots
    rows = read_jsonl(out / "manifest.jsonl")
    assert summary.exit_code == 0 and summary.short_shots == 0
    need = 1.0 * 24 + 1 + 2 * TOL  # frames a clean stretch needs for one clip, with the tolerance at both ends
    for a, b in edit.shots:
        if b - a >= need:
            assert any(a - TOL <= r["start_frame"] and r["end_frame"] <= b + TOL for r in rows), ((a, b), rows)
    for r in rows:
        for lo, hi in edit.transitions:
            assert not overlaps(r["start_frame"], r["end_frame"], lo + TOL, hi - TOL), (r, (lo, hi))
    assert {r["shot"] for r in rows} == {0, 1, 2, 3}


def _border_runs(strip: Image.Image, y: int) -> list[str]:
    """Colours along row ``y`` of a strip, runs collapsed: "kept" (green), "out" (red)."""
    row = np.asarray(strip.convert("RGB"))[y].astype(int)
    names = ["kept" if g > 110 and r < 100 else "out" if r > 150 and g < 90 else "" for r, g, _ in row]
    runs = [n for i, n in enumerate(names) if n and (i == 0 or names[i - 1] != n)]
    return runs


def test_review_page_shows_each_transition_as_a_marked_strip(edits, four_shots):
    """report.html names every transition found and shows a strip of frames across it: two kept
    frames each side framed green, the left-out frames (at most 8) framed red."""
    out, _ = four_shots
    page = (out / "report.html").read_text()
    shots = detect_shots(probe_file(edits["four_shots"].path))
    assert "Transitions left out (3)" in page
    for (a, b), kind in zip(shots.transitions, shots.transition_kinds):
        assert f"{kind}, frames {a}-{b - 1}," in page
        found = re.search(rf'src="(transitions/four_shots-\w+_{a:06d}-{b:06d}\.jpg)"', page)
        assert found, (a, b)
        with Image.open(out / found.group(1)) as strip:
            assert _border_runs(strip, 23) == ["kept", "kept"] + ["out"] * min(b - a, 8) + ["kept", "kept"]
    assert strip_frames(73, 96, 284) == ([71, 72], [73, 76, 79, 82, 86, 89, 92, 95], [96, 97])
    assert strip_frames(0, 3, 5) == ([], [0, 1, 2], [3, 4])


@pytest.mark.parametrize("name,cuts", [("synth_lavfi.mp4", SYNTH_CUTS), ("oa4_launch.webm", [74]),
                                       ("bigbuckbunny.mp4", []), ("city_cc0.mp4", [116])])  # fmt: skip
def test_hard_cut_samples_have_no_transitions(name, cuts):
    """Moving test patterns, a zoom into a fractal, smoke, a panning bunny, a tilt up a tower at
    night: none is a fade or a dissolve, so the shots are exactly those between the known cuts."""
    shots = detect_shots(probe_file(ASSETS / name))
    assert shots.transitions == [] and shots.cuts == cuts
    assert [(s.start_frame, s.end_frame) for s in shots.shots] == list(zip([0, *cuts], [*cuts, shots.frames]))


# ---------------------------------------------------------------------------------------------
# the model on arrays


def _texture(rng, tint=(1.0, 1.0, 1.0), h=18, w=32) -> np.ndarray:
    """A random picture [h, w, 3] float; ``tint`` scales its B, G, R (two shots differ in colour)."""
    return (rng.integers(0, 256, size=(h, w, 3)) * np.array(tint)).astype(np.float32)


def _thumbs(frames: list[np.ndarray]) -> np.ndarray:
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def test_mix_weights_and_ramp_on_a_synthetic_dissolve():
    rng = np.random.default_rng(0)
    a, b = _texture(rng, (0.4, 0.7, 1.0)), _texture(rng, (1.0, 0.8, 0.3))
    s, e = 20, 33  # mixed frames
    frames = [a if i < s else b if i >= e else a + (b - a) * (i - s + 1) / (e - s + 1) for i in range(50)]
    flat = _thumbs(frames).reshape(50, -1).astype(np.float32)
    w, off = mix_weights(flat, s - 1, e, 0, 50)
    assert np.allclose(w[:s], 0, atol=0.01) and np.allclose(w[e:], 1, atol=0.01) and off.max() < 0.02
    assert fit_ramp(w, 3)[:2] == (s, e)


def test_find_transitions_on_arrays_dissolve_fade_in_and_motion():
    """A dissolve between two noisy still shots is found exactly; a fade in from black at the very
    start leaves its black and dark frames out of every shot; a texture sliding sideways (motion,
    whose frames differ as much as a dissolve's ends) is no transition."""
    rng = np.random.default_rng(1)
    a, b = _texture(rng, (0.4, 0.7, 1.0)), _texture(rng, (1.0, 0.8, 0.3))
    noise = lambda: rng.normal(0, 2, size=a.shape)  # noqa: E731
    frames = [np.zeros_like(a)] * 5 + [a * i / 10 for i in range(1, 10)]  # black 0-4, fade in 5-13
    frames += [a + noise() for _ in range(30)]  # 14-43
    frames += [a + (b - a) * j / 17 + noise() for j in range(1, 17)]  # dissolve 44-59
    frames += [b + noise() for _ in range(30)]  # 60-89
    wide = np.tile(_texture(rng), (1, 4, 1))
    frames += [wide[:, 2 * i : 2 * i + 32] for i in range(40)]  # 90-129: sliding texture after a cut
    got = find_transitions(_thumbs(frames), rate=24.0, hard_cuts=[90])
    assert [(t.start, t.end, t.kind) for t in got] == [(0, 14, "fade"), (44, 60, "dissolve")]


def test_shot_ranges_leave_transitions_out():
    assert shot_ranges(100, [50], []) == [(0, 50), (50, 100)]
    assert shot_ranges(100, [], [(30, 40)]) == [(0, 30), (40, 100)]
    assert shot_ranges(100, [50], [(45, 55)]) == [(0, 45), (55, 100)]
    assert shot_ranges(100, [], [(0, 10), (90, 100)]) == [(10, 90)]
