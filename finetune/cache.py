"""Latent and text-embedding cache.

Each clip's VAE latents and each caption's text-encoder outputs are computed once and stored as
safetensors, named by a fingerprint of everything that determines them:

  latents:  clip content (sha256), model id + revision, family, task, frames, height, width, fps,
            the conditioning frames of a continuation task
            (the file also holds the task's conditioning, e.g. the first frame's latents for i2v)
  text:     caption text, model id + revision, family

so changing one caption re-encodes that caption only, and changing the resolution recomputes
the latents but keeps the text embeddings. Files are written to a temp name then renamed, so an
interrupted run never leaves a half-written entry; an entry damaged anyway (a disk error, a copy
cut short) is noticed by its header and recomputed.

A clip that cannot be used (undecodable, too short, a size the family cannot take) or a caption
the text encoder rejects does not stop the cache: it is left out and listed in
``CacheStats.skipped`` with its reason; the trainer decides whether that is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from finetune import diskspace
from finetune.data import Clip
from finetune.errors import DataError
from finetune.families.base import Family
from finetune.video import read_clip


@dataclass(frozen=True)
class CacheEntry:
    latents: Path
    text: Path


@dataclass
class CacheStats:
    latents_computed: int = 0
    latents_reused: int = 0
    text_computed: int = 0
    text_reused: int = 0
    damaged: int = 0  # entries whose file was unreadable and were recomputed
    skipped: list[tuple[Clip, str]] = field(default_factory=list)  # (clip, reason) left out


@dataclass(frozen=True)
class CacheKey:
    """The non-clip parts of a fingerprint."""

    family: str
    model_id: str
    revision: str | None
    frames: int
    height: int
    width: int
    fps: float
    task: str = "t2v"
    # conditioning frames of a video-conditioned task (continue); None for the others
    cond_frames: int | None = None


@lru_cache(maxsize=4096)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the lru key so an edited file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: Path) -> str:
    st = path.stat()
    return _file_sha256(path.resolve(), st.st_size, st.st_mtime_ns)


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def latent_fingerprint(clip: Clip, key: CacheKey, with_caption: bool = False) -> str:
    """``with_caption``: the conditioning stored beside the latents depends on the caption too."""
    parts = {"kind": "latents", "clip": content_hash(clip.path), "family": key.family, "model": key.model_id,
             "revision": key.revision, "frames": key.frames, "height": key.height, "width": key.width,
             "fps": key.fps, "task": key.task}
    if key.cond_frames is not None:  # only where set, so other tasks keep their fingerprints
        parts["cond_frames"] = key.cond_frames
    if with_caption:
        parts["caption"] = clip.caption
    return _digest(parts)


def text_fingerprint(caption: str, key: CacheKey) -> str:
    return _digest({"kind": "text", "caption": caption, "family": key.family, "model": key.model_id,
                    "revision": key.revision})


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def entry_ok(path: Path) -> bool:
    """True if ``path`` is a cache entry whose safetensors header reads (a truncated or garbled
    file fails here: the header must cover the whole file)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return bool(list(f.keys()))
    except (SafetensorError, OSError):
        return False


def build_cache(
    family: Family, clips: list[Clip], key: CacheKey | list[CacheKey], cache_dir: str | Path,
    show_progress: bool = True,
) -> tuple[list[CacheEntry], CacheStats]:
    """Make sure every clip's latents and caption embeddings are in ``cache_dir``. ``key`` is
    one for all clips, or one per clip (aspect buckets: each clip at its own size).

    Returns one CacheEntry per usable clip (same order) and what was computed, reused and
    skipped (with the reason). Raises DiskSpaceError before writing if the entries to compute
    will not fit.
    """
    cache_dir = Path(cache_dir)
    stats = CacheStats()
    keys = key if isinstance(key, list) else [key] * len(clips)
    with_caption = family.conditioning_uses_captions()
    entries = [
        CacheEntry(latents=cache_dir / "latents" / f"{latent_fingerprint(c, k, with_caption)}.safetensors",
                   text=cache_dir / "text" / f"{text_fingerprint(c.caption, k)}.safetensors")
        for c, k in zip(clips, keys)
    ]
    todo_latents = [(c, e, k) for c, e, k in zip(clips, entries, keys) if not entry_ok(e.latents)]
    stats.latents_reused = len(clips) - len(todo_latents)
    stats.damaged = sum(e.latents.is_file() for _, e, _ in todo_latents)
    text_missing = sum(not entry_ok(p) for p in {e.text for e in entries})
    diskspace.require_free(cache_dir, diskspace.cache_bytes([(k.frames, k.height, k.width) for _, _, k in todo_latents],
                                                            text_missing, family.text_len),
                           f"the cache ({len(todo_latents)} clips, {text_missing} captions to encode)",
                           "set cache.dir to a folder on a bigger disk")
    failed: set[Path] = set()  # cache entries of clips or captions that could not be encoded
    if todo_latents:
        vae_param = next(family.components.vae.parameters())
        device, vae_dtype = vae_param.device, vae_param.dtype
    for clip, entry, k in tqdm(todo_latents, desc="cache latents", unit="clip", disable=not show_progress):
        try:
            video = read_clip(clip.path, k.frames, k.fps, k.height, k.width)
            # Seeded by the fingerprint: the cached sample does not depend on clip order.
            gen = torch.Generator(device="cpu").manual_seed(int(entry.latents.stem[:15], 16))
            with torch.no_grad():
                pixels = video.unsqueeze(0).to(device, vae_dtype)
                latents = family.encode_videos(pixels, generator=gen)
                captions = {"captions": [clip.caption]} if with_caption else {}
                cond = family.encode_conditioning(pixels, latents, **captions)
        except (DataError, ValueError) as e:  # ValueError: the family's size/frame checks
            stats.skipped.append((clip, str(e).removeprefix(f"{clip.path}: ")))
            failed.add(entry.latents)
            continue
        _save_atomic({"latents": latents[0], **{k: v[0] for k, v in cond.items()}}, entry.latents)
        stats.latents_computed += 1

    unique_text = {e.text: c.caption for c, e in zip(clips, entries)}
    todo_text = [(p, cap) for p, cap in unique_text.items() if not entry_ok(p)]
    stats.text_computed = len(todo_text)
    stats.text_reused = len(unique_text) - len(todo_text)
    for path, caption in tqdm(todo_text, desc="cache text", unit="prompt", disable=not show_progress):
        try:
            with torch.no_grad():
                out = family.encode_prompts([caption])
        except (ValueError, TypeError, IndexError, RuntimeError) as e:  # what tokenizers and encoders raise
            stats.skipped += [(c, f"caption {caption[:60]!r} cannot be encoded ({type(e).__name__}: {e})")
                              for c, en in zip(clips, entries) if en.text == path and en.latents not in failed]
            failed.add(path)
            continue
        _save_atomic({k: v[0] for k, v in out.items()}, path)
    return [e for e in entries if e.latents not in failed and e.text not in failed], stats


class CachedDataset(torch.utils.data.Dataset):
    """Item i: {"latents": [C, f, h, w], **text tensors, **conditioning tensors} read from the cache
    files; conditioning made with the caption replaces the caption's own text tensors."""

    def __init__(self, entries: list[CacheEntry]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.entries[i]
        return {**load_file(str(e.text)), **load_file(str(e.latents))}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
