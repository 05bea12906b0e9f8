"""Bad input: each case ends in its named error, exit code 2, and no traceback."""

from __future__ import annotations

import pytest

import train_lora
from conftest import ROOT, write_clips
from finetune.cli import USER_ERROR_EXIT, run_main


def _train(capsys, family, manifest, out, *extra):
    rc = run_main(train_lora.main, ["--recipe", str(ROOT / f"recipes/tiny/{family}.yaml"), f"data.manifest={manifest}",
                                    f"output.dir={out}", *extra])
    return rc, capsys.readouterr().err


def test_missing_manifest(capsys, tmp_path):
    rc, err = _train(capsys, "wan", tmp_path / "nope.jsonl", tmp_path / "run")
    assert rc == USER_ERROR_EXIT
    assert "data.manifest=" in err and "file not found" in err and "python -m data_prep prepare" in err


def test_clip_shorter_than_the_recipe(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=1, frames=5, height=32, width=32)
    rc, err = _train(capsys, "wan", manifest, tmp_path / "run")
    assert rc == USER_ERROR_EXIT
    assert "no usable clip; 1 of 1 clips: clip000.mp4 (clip too short: 5 frames at 8 fps, the recipe needs " \
           "data.frames=9" in err


def test_frame_count_breaking_the_family_rule(capsys, tmp_path):
    rc, err = _train(capsys, "ltx", tmp_path / "m.jsonl", tmp_path / "run", "data.frames=12")
    assert rc == USER_ERROR_EXIT
    assert "data.frames=12 must be 8k+1 for ltx (try 9)" in err


def test_unknown_recipe_key(capsys, tmp_path):
    rc, err = _train(capsys, "wan", tmp_path / "m.jsonl", tmp_path / "run", "lora.rnak=4")
    assert rc == USER_ERROR_EXIT
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in err


def test_resume_without_a_checkpoint(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=1, frames=9, height=32, width=32)
    rc, err = _train(capsys, "wan", manifest, tmp_path / "run", "--resume", "latest")
    assert rc == USER_ERROR_EXIT
    assert "--resume latest: no checkpoint in" in err


def test_manifest_with_bad_lines_names_them(capsys, tmp_path):
    manifest = write_clips(tmp_path / "c", n=1, frames=9, height=32, width=32)
    manifest.write_text(manifest.read_text() + "not json\n" + '{"path": "gone.mp4", "caption": "x"}\n')
    rc, err = _train(capsys, "wan", manifest, tmp_path / "run")
    assert rc == USER_ERROR_EXIT
    assert "2 of 3 entries unusable: line 2: not JSON" in err and "gone.mp4 not found" in err


@pytest.mark.parametrize("arg", ["--resume", "--recipe"])
def test_argparse_errors_are_usage_errors(arg, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_lora.main(["--recipe"] if arg == "--recipe" else ["--recipe", "x.yaml", "--resume"])
    assert e.value.code == 2


def test_clips_of_another_aspect_are_named_before_cropping(capsys, tmp_path):
    from finetune.data import aspect_mismatches, load_manifest

    manifest = write_clips(tmp_path / "c", n=2, frames=9, height=32, width=64)
    clips = load_manifest(manifest)
    assert [c.size for c in clips] == [(64, 32), (64, 32)]
    assert aspect_mismatches(clips, width=64, height=32) == []
    assert len(aspect_mismatches(clips, width=32, height=32)) == 2
    rc = run_main(train_lora.main, ["--recipe", str(ROOT / "recipes/tiny/wan.yaml"), f"data.manifest={manifest}",
                                    f"output.dir={tmp_path / 'run'}", "optim.steps=1", "checkpoint.every=0"])
    assert rc == 0
    assert "note: 2 of 2 clips are not 32x32-shaped (e.g. clip000.mp4 is 64x32)" in capsys.readouterr().out
