"""Quiet by default: the entry scripts, run as a user runs them (``--plan``, tiny training runs,
``infer.py``, data_prep; publish in test_publish.py), print nothing on stderr but our own lines and
progress bars; ``-v`` shows the third-party warnings held back; the filters hold back only the
known harmless messages, at their source."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT, tiny_recipe_path, write_clips
from finetune import _quiet

# Our own stderr lines start with one of these (finetune/cli.py, data_prep, the trainer's notes).
OURS = ("error:", "warning:", "note:", "stopped:")
# A tqdm bar: "[elapsed<remaining, rate]" or, without a total, "[elapsed, rate]".
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d(:\d\d)?(<|, )")
PLAN = ["train_lora.py", "--plan", "--recipe", "recipes/wan/t2v-14b_24gb.yaml", "--vram", "16"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(_quiet.VERBOSE_ENV, None)
    env.pop("TQDM_DISABLE", None)  # the bars are part of what a user sees
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def foreign_lines(stderr: str) -> list[str]:
    """stderr lines (tqdm redraws split at carriage returns) that are neither ours nor a progress bar."""
    lines = (line.strip() for line in re.split(r"[\r\n]+", stderr))
    return [line for line in lines if line and not line.startswith(OURS) and not PROGRESS_BAR.search(line)]


def checked(args: list[str]) -> subprocess.CompletedProcess:
    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert foreign_lines(done.stderr) == [], f"{' '.join(args)} printed:\n" + "\n".join(foreign_lines(done.stderr))
    return done


def test_foreign_lines_keep_warnings_and_drop_ours_and_bars():
    stderr = ("cache text:   0%|          | 0/2 [00:00<?, ?prompt/s]\rcache text: 100%|##| 2/2 [00:00<00:00, 3.7prompt/s]\n"
              "cache latents: 0clip [00:00, ?clip/s]\n"
              "note: 2 of 3 clips are not 32x32-shaped\nerror: data.manifest=x: file not found\n"
              "/x/peft/tuners/lora/torchao.py:39: UserWarning: TorchaoLoraLinear was instantiated\n  warnings.warn(\n")
    assert foreign_lines(stderr) == ["/x/peft/tuners/lora/torchao.py:39: UserWarning: TorchaoLoraLinear was instantiated",
                                     "warnings.warn("]


@pytest.fixture(scope="module")
def plan_quiet():
    return checked(PLAN)


@pytest.mark.slow
def test_plan_prints_only_our_lines(plan_quiet):
    assert "memory plan for recipes/wan/t2v-14b_24gb.yaml" in plan_quiet.stdout


@pytest.mark.slow
def test_verbose_brings_the_held_back_warnings_back(plan_quiet):
    loud = run([*PLAN, "-v"])
    assert loud.returncode == 0, loud.stderr[-3000:]
    extra = foreign_lines(loud.stderr)
    assert extra, "-v showed no third-party warning that the quiet run held back"
    known = [n for n in _quiet.LOG_NOISE if any(re.search(n.message, line) for line in extra)]
    assert known, "-v showed none of the held-back messages:\n" + "\n".join(extra)
    assert loud.stdout == plan_quiet.stdout


@pytest.mark.slow
def test_tiny_training_fp8_training_and_infer_print_only_our_lines(tmp_path):
    manifest = write_clips(tmp_path / "clips", n=2, frames=9, height=32, width=32)
    recipe = str(tiny_recipe_path("wan").relative_to(ROOT))
    common = ["train_lora.py", "--recipe", recipe, f"data.manifest={manifest}", "optim.steps=1", "checkpoint.every=0"]
    checked([*common, f"output.dir={tmp_path / 'run'}"])
    # fp8 weights (peft wraps them in its torchao LoRA layer) in bf16 (tiny builds cast as loaded)
    checked([*common, f"output.dir={tmp_path / 'fp8'}", "model.quantization=fp8", "model.dtype=bf16"])
    done = checked(["infer.py", "--lora", str(tmp_path / "run"), "--prompt", "mystyle, a square", "--steps", "2",
                    "--out", str(tmp_path / "out.mp4")])
    assert (tmp_path / "out.mp4").is_file() and "video:" in done.stdout


@pytest.mark.slow
def test_data_prep_prints_only_our_lines(tmp_path):
    footage = tmp_path / "footage"
    footage.mkdir()
    shutil.copy2(ROOT / "tests" / "assets" / "synth_lavfi.mp4", footage)
    done = checked(["-m", "data_prep", "prepare", str(footage), str(tmp_path / "dataset"), "--family", "wan",
                    "--frames", "9", "--fps", "8", "--size", "32x32", "--trigger", "mystyle"])
    assert (tmp_path / "dataset" / "manifest.jsonl").is_file() and "dataset:" in done.stdout


# ---------------------------------------------------------------------------- the filters themselves


@pytest.fixture
def captured_logger():
    """The logger of diffusers' torchao quantizer with a handler that records what passes its filters."""
    logger = logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    yield logger, seen
    logger.removeHandler(handler)


def test_log_filter_holds_back_only_the_known_message(captured_logger, monkeypatch):
    monkeypatch.delenv(_quiet.VERBOSE_ENV, raising=False)
    logger, seen = captured_logger
    logger.warning("Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
    logger.warning("Casting a quantized model to a new `dtype` is unsupported")  # another message: shown
    assert seen == ["Casting a quantized model to a new `dtype` is unsupported"]
    monkeypatch.setenv(_quiet.VERBOSE_ENV, "1")
    logger.warning("Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
    assert seen[-1].startswith("Unable to import `torchao` Tensor objects")


def test_held_back_drops_only_its_message_in_its_block(monkeypatch):
    monkeypatch.delenv(_quiet.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet.held_back(r"TorchaoLoraLinear was instantiated"):
            warnings.warn("TorchaoLoraLinear was instantiated without it", UserWarning)
            warnings.warn("There are modules in X that should be kept in float32", UserWarning)
        warnings.warn("TorchaoLoraLinear was instantiated without it", UserWarning)  # outside the block
    assert [str(w.message) for w in caught] == ["There are modules in X that should be kept in float32",
                                                "TorchaoLoraLinear was instantiated without it"]
    monkeypatch.setenv(_quiet.VERBOSE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet.held_back(r"TorchaoLoraLinear was instantiated"):
            warnings.warn("TorchaoLoraLinear was instantiated without it", UserWarning)
    assert len(caught) == 1


def test_every_entry_script_takes_verbose():
    for args in (["train_lora.py"], ["infer.py"], ["-m", "finetune.publish"], ["-m", "finetune.demo"],
                 ["-m", "data_prep", "prepare"]):
        done = run([*args, "--help"])
        assert done.returncode == 0 and "-v, --verbose" in done.stdout, args
