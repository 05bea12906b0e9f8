"""Clips left out of a run: named in the output and in ``<run>/skipped_clips.jsonl``, so one
damaged file costs one clip, not the run. ``data.strict: true`` turns any of them into an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune.data import Clip
from finetune.errors import DataError

SKIPPED_FILE = "skipped_clips.jsonl"


def bucket_misfits(clips: list[Clip], factor: int, family: str) -> tuple[list[Clip], list[tuple[Clip, str]]]:
    """Split ``clips`` into those aspect buckets can train (manifest size known, both sides a
    multiple of ``factor``) and the others, each with its reason."""
    ok, bad = [], []
    for c in clips:
        if c.size is None:
            bad.append((c, "no width/height in the manifest, needed for data.buckets=true"))
        elif c.size[0] % factor or c.size[1] % factor:
            bad.append((c, f"size {c.size[0]}x{c.size[1]} is not a multiple of {factor} for {family} "
                           f"(re-cut it with data_prep --family {family})"))
        else:
            ok.append(c)
    return ok, bad


def summary(skipped: list[tuple[Clip, str]], total: int, shown: int = 3) -> str:
    """``2 of 5 clips: a.mp4 (reason), b.mp4 (reason)``: count first, then the first few."""
    head = ", ".join(f"{c.path.name} ({reason})" for c, reason in skipped[:shown])
    return f"{len(skipped)} of {total} clips: {head}{', ...' if len(skipped) > shown else ''}"


def report_skipped(skipped: list[tuple[Clip, str]], total: int, run_dir: Path, manifest: str | Path,
                   strict: bool, write: bool) -> str | None:
    """Apply the skip policy to the clips left out of a run of ``total`` clips.

    Raises DataError if ``strict`` and any clip was left out, or if none is left. Otherwise, when
    ``write`` (the main process), writes ``<run_dir>/skipped_clips.jsonl`` (removing a stale one
    when nothing was skipped). Returns the warning to print, or None.
    """
    if skipped and strict:
        raise DataError(f"{manifest}: data.strict=true and {summary(skipped, total)}; fix or remove them from the "
                        f"manifest, or set data.strict=false to train on the others")
    if skipped and len(skipped) >= total:
        raise DataError(f"{manifest}: no usable clip; {summary(skipped, total)}")
    path = Path(run_dir) / SKIPPED_FILE
    if write:
        if skipped:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps({"path": str(c.path), "caption": c.caption, "reason": reason}) + "\n"
                                   for c, reason in skipped))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()
    if not skipped:
        return None
    return (f"warning: skipped {summary(skipped, total)}; training on the other {total - len(skipped)} "
            f"(all listed in {path})")
