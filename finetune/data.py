"""The clip manifest the trainer reads: JSONL, one clip per line, ``path`` (relative to the
manifest's folder, or absolute) and ``caption`` required. ``data_prep`` writes it; other keys
(frames, fps, width, height, source, shot, start/end) are kept for people and checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str
    # (width, height) as the manifest states it, if it does
    size: tuple[int, int] | None = None


def aspect_mismatches(clips: list[Clip], width: int, height: int, tolerance: float = 0.05) -> list[Clip]:
    """Clips whose stated aspect ratio differs from width/height by more than ``tolerance``
    (relative): the trainer centre-crops them, losing part of the frame."""
    target = width / height
    return [c for c in clips if c.size and abs(c.size[0] / c.size[1] - target) > tolerance * target]


def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word in front of the caption unless the caption already has it."""
    if not trigger or trigger in caption:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for names the OS rejects (too long, NUL bytes) rather than raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def load_manifest(manifest: str | Path | None, trigger: str = "") -> list[Clip]:
    """Clips listed in ``manifest``, captions carrying ``trigger``.

    Raises DataError naming the manifest and, for bad lines or missing clip files, how many
    there are and the first few, so all can be fixed in one pass.
    """
    if manifest is None:
        raise DataError("data.manifest is not set: pass data.manifest=path/to/manifest.jsonl "
                        "(python -m data_prep prepare footage/ dataset/ writes one)")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"data.manifest={manifest}: file not found (python -m data_prep prepare footage/ dataset/ "
                        f"writes dataset/manifest.jsonl; or fix the path)")
    clips, problems = [], []
    for n, raw in enumerate(manifest.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"line {n}: not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("caption"), str):
            problems.append(f"line {n}: needs string keys 'path' and 'caption'")
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        if not _is_file(path):
            problems.append(f"line {n}: clip {path} not found")
            continue
        w, h = row.get("width"), row.get("height")
        size = (w, h) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else None
        clips.append(Clip(path=path, caption=apply_trigger(row["caption"].strip(), trigger), size=size))
    if problems:
        head = ", ".join(problems[:3]) + (", ..." if len(problems) > 3 else "")
        raise DataError(f"{manifest}: {len(problems)} of {len(problems) + len(clips)} entries unusable: {head}")
    if not clips:
        raise DataError(f"{manifest}: no clips listed (one JSON object per line with 'path' and 'caption')")
    return clips


def split_validation(clips: list[Clip], fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """(training clips, held-out clips): ``round(fraction * len(clips))`` clips, at least one when
    ``fraction`` > 0, picked by a permutation seeded with ``seed`` (the same split every run and
    on every process), both lists in manifest order. Raises DataError if nothing would be left to
    train on."""
    if fraction <= 0:
        return list(clips), []
    n_val = max(1, round(fraction * len(clips)))
    if n_val >= len(clips):
        raise DataError(f"data.validation_split={fraction:g} holds out {n_val} of {len(clips)} clips, leaving none to "
                        f"train on; add clips, or lower data.validation_split")
    import torch  # the manifest reader itself stays torch-free

    held = set(torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return [c for i, c in enumerate(clips) if i not in held], [c for i, c in enumerate(clips) if i in held]
