"""The clip manifest the trainer reads: JSONL, one clip per line, ``path`` (relative to the
manifest's folder, or absolute) and ``caption`` required. ``data_prep`` writes it; other keys
(frames, fps, width, height, source, shot, start/end) are kept for people and checks.

``data.dataset`` names a folder of clips instead (or a Hugging Face dataset id, downloaded once into
huggingface_hub's cache): its ``manifest.jsonl`` (a ``data_prep`` folder), else its
``metadata.jsonl`` (the ``videofolder`` layout: ``file_name`` and ``caption`` per clip) is read the
same way, so both reach the same cache and trainer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
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


def load_manifest(manifest: str | Path | None, trigger: str = "", path_key: str = "path") -> list[Clip]:
    """Clips listed in ``manifest``, captions carrying ``trigger``; ``path_key`` names the key that
    holds each clip's file ("file_name" in a videofolder metadata.jsonl).

    Raises DataError naming the manifest and, for bad lines or missing clip files, how many
    there are and the first few, so all can be fixed in one pass.
    """
    if manifest is None:
        raise DataError("data.manifest is not set: pass data.manifest=path/to/manifest.jsonl "
                        "(python -m data_prep prepare footage/ dataset/ writes one) or data.dataset=USER/NAME "
                        "(a Hugging Face dataset) or data.dataset=path/to/clip/folder")
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
        if not isinstance(row, dict) or not isinstance(row.get(path_key), str) or not isinstance(row.get("caption"), str):
            found = f" (has {', '.join(sorted(row)[:8])})" if isinstance(row, dict) else ""
            problems.append(f"line {n}: needs string keys '{path_key}' and 'caption'{found}")
            continue
        path = Path(row[path_key])
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
        raise DataError(f"{manifest}: no clips listed (one JSON object per line with '{path_key}' and 'caption')")
    return clips


@lru_cache(maxsize=8)
def resolve_dataset(dataset: str) -> tuple[Path, bool]:
    """(local folder, whether it came from the Hub) of ``data.dataset``: an existing folder as it
    is, else a Hub dataset id downloaded with ``huggingface_hub.snapshot_download`` (once: later
    runs find it in the cache; HF_HUB_OFFLINE=1 uses the cache alone). Raises DataError naming
    the value and the fix."""
    from finetune.hub import repo_id_problem

    folder = Path(dataset).expanduser()
    if folder.is_dir():
        return folder, False
    if folder.exists() or repo_id_problem(dataset):
        raise DataError(f"data.dataset={dataset!r}: not a folder of clips and not a Hub dataset id USER/NAME "
                        f"(python -m data_prep prepare footage/ dataset/ makes a folder; push shares it)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(dataset, repo_type="dataset")), True
    except RepositoryNotFoundError:
        raise DataError(f"data.dataset={dataset}: no such dataset on the Hub, or it is private (log in with "
                        f"`hf auth login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise DataError(f"data.dataset={dataset}: not in the local cache and the Hub cannot be reached (offline?); "
                        f"connect once to download it, or point data.dataset at a local folder") from None
    except HfHubHTTPError as e:
        raise DataError(f"data.dataset={dataset}: download failed ({str(e).splitlines()[0]})") from None


def dataset_index(dataset: str) -> tuple[Path, str]:
    """(file listing the clips, the key naming each clip's file) of ``data.dataset``: its
    manifest.jsonl (data_prep's), else its metadata.jsonl (videofolder). Raises DataError."""
    folder, _ = resolve_dataset(dataset)
    for name, key in (("manifest.jsonl", "path"), ("metadata.jsonl", "file_name")):
        if (folder / name).is_file():
            return folder / name, key
    raise DataError(f"data.dataset={dataset}: {folder} has neither manifest.jsonl (python -m data_prep prepare "
                    f"writes one) nor metadata.jsonl (a videofolder dataset: file_name and caption per clip)")


def load_clips(manifest: str | None, dataset: str | None, trigger: str = "") -> list[Clip]:
    """The training clips of a recipe's ``data.manifest`` or ``data.dataset`` (see
    :func:`load_manifest`, :func:`dataset_index`). Raises DataError."""
    if dataset and not manifest:
        index, key = dataset_index(dataset)
        return load_manifest(index, trigger, key)
    return load_manifest(manifest, trigger)


def clips_cache_dir(manifest: str | None, dataset: str | None) -> Path:
    """Where the latent cache goes unless cache.dir says: beside the manifest or in the dataset
    folder (``.cache``); for a Hub dataset, huggingface_hub's assets folder, not its read-only
    download cache."""
    if dataset and not manifest:
        folder, from_hub = resolve_dataset(dataset)
        if from_hub:
            from huggingface_hub import cached_assets_path

            return cached_assets_path("video-lora-studio", namespace=dataset.replace("/", "--"), subfolder="latents")
        return folder / ".cache"
    return Path(manifest).parent / ".cache"


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
