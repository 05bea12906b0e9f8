"""Free-space checks before the cache and each checkpoint are written: a full disk is reported
as a named error before the first byte, not as a half-written file and an ``OSError`` later.

The estimates are deliberately generous (an upper bound of the bytes about to be written);
a check that passes must mean the write fits.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from finetune.errors import DiskSpaceError

# Video VAEs compress pixels by 48x or more (Wan: 4x8x8 time x space into 16 channels from 3;
# LTX-Video: 192x), so 1/48 of the fp32 pixel volume bounds a clip's latents.
LATENT_COMPRESSION = 48
# The widest text-encoder output the families cache (T5-XXL, umT5-XXL): 4096 fp32 per token.
TEXT_HIDDEN_MAX = 4096
# Headroom for file headers, JSON and pickled RNG states.
SLACK_BYTES = 1 << 20


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require_free(folder: str | Path, needed: int, what: str, fix: str) -> None:
    """Raise DiskSpaceError unless ``needed`` bytes (plus slack) are free where ``folder`` lives.
    ``what`` names the write, ``fix`` the setting that moves it elsewhere."""
    needed += SLACK_BYTES
    free = free_bytes(folder)
    if free < needed:
        raise DiskSpaceError(f"not enough disk space for {what}: it needs about {human(needed)} but only "
                             f"{human(free)} is free on the disk holding {folder}; free some space or {fix}")


def cache_bytes(clip_shapes: Iterable[tuple[int, int, int]], n_prompts: int, text_len: int) -> int:
    """Upper bound of the bytes the cache will write: clip_shapes are (frames, height, width) of
    the clips to encode; n_prompts captions of ``text_len`` tokens each."""
    latents = sum(3 * f * h * w * 4 // LATENT_COMPRESSION for f, h, w in clip_shapes)
    return latents + n_prompts * text_len * TEXT_HIDDEN_MAX * 4


def checkpoint_bytes(models: Iterable[torch.nn.Module], previous: Path | None) -> int:
    """Upper bound of one checkpoint: the trainable weights in fp32 three times (weights and
    AdamW's two moments), or the size of the previous checkpoint if that is larger."""
    trainable = sum(p.numel() * 4 for m in models for p in m.parameters() if p.requires_grad)
    before = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
    return max(3 * trainable, before)
