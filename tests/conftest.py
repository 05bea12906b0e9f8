"""Shared fixtures: synthetic clips written as real mp4 files, and tiny recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# pytest-xdist runs one worker per core: more than one torch thread each oversubscribes the
# cores, and spinning OpenMP threads then slow the tiny-model tests down tenfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every test, also after a test whose code set more (the demo does)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process, and its mixed precision cannot change
    once an Accelerator exists; each in-process run makes its own, so a bf16 run after an fp32 one
    on the same xdist worker would fail depending on how tests are shared out. Clear it after each
    test (as accelerate's own tests do), leaving the process group (PartialState) alone."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state()


def synthetic_frames(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """[F, H, W, 3] uint8: a coloured square moving over a gradient, different per seed."""
    rng = np.random.default_rng(seed)
    bg = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, size=(1, 1, 3))
    colour = rng.integers(0, 256, size=3)
    side = max(4, min(height, width) // 3)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = np.broadcast_to(bg, (height, width, 3)).copy()
        y = (t * 3 + seed * 5) % max(1, height - side)
        x = (t * 4 + seed * 7) % max(1, width - side)
        img[y:y + side, x:x + side] = colour
        out[t] = img.astype(np.uint8)
    return out


def write_clips(folder: Path, n: int, frames: int, height: int, width: int, fps: float = 8,
                captions: list[str] | None = None) -> Path:
    """Write ``n`` mp4 clips and a manifest.jsonl in ``folder``; returns the manifest path."""
    from finetune.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"clip{i:03d}.mp4"
        write_video(synthetic_frames(frames, height, width, seed=i), folder / name, fps)
        caption = captions[i] if captions else f"a coloured square number {i} sliding over a gradient"
        rows.append({"path": name, "caption": caption, "frames": frames, "fps": fps, "width": width, "height": height})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture
def clips(tmp_path):
    """A manifest of 2 clips, 12 frames at 8 fps, 64x64: enough for both tiny families."""
    return write_clips(tmp_path / "clips", n=2, frames=12, height=64, width=64)


def tiny_recipe_path(case: str) -> Path:
    """recipes/tiny/<family>.yaml for "family" or a family's first task, else <family>-<task>.yaml."""
    from finetune.families import get_family

    name, _, task = case.partition(":")
    if not task or task == get_family(name).tasks[0]:
        return ROOT / "recipes" / "tiny" / f"{name}.yaml"
    return ROOT / "recipes" / "tiny" / f"{name}-{task}.yaml"


def tiny_recipe(case: str, manifest: Path, out: Path, *overrides: str):
    """The tiny recipe of ``case`` ("family" or "family:task") for ``manifest``, writing to ``out``."""
    from finetune.config import load_recipe

    return load_recipe(tiny_recipe_path(case), [f"data.manifest={manifest}", f"output.dir={out}", *overrides])


def registry_cases() -> list[str]:
    """"family:task" for every registered family and task it trains."""
    from finetune.families import family_names, get_family

    return [f"{n}:{t}" for n in family_names() for t in get_family(n).tasks]
