"""manifest: the JSONL file the trainer's ``data.manifest`` reads, the rejected list, a short
dataset card, and ``metadata.jsonl``, which makes the folder a Hugging Face video dataset.

One clip per line with exactly the keys in ``MANIFEST_KEYS``. ``path`` is relative to the
manifest's folder; ``start_time``/``end_time`` are seconds in the source (end = start + frames/fps);
``start_frame``/``end_frame`` index the source's decoded frames, end exclusive; ``audio`` says
whether the clip carries its source's sound (an AAC track over the same time range).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_KEYS = (
    "path", "caption", "frames", "fps", "width", "height", "source", "shot",
    "start_time", "end_time", "start_frame", "end_frame", "audio",
)  # fmt: skip


# metadata.jsonl: one kept clip per line, ``file_name`` (the clip, relative to the folder) first, as
# the ``videofolder`` builder of ``datasets`` reads it; every other key becomes a column.
METADATA_KEYS = (
    "file_name", "caption", "trigger", "source", "shot", "fps", "frames", "width", "height",
    "start_time", "end_time", "audio", "query_score",
)  # fmt: skip


def metadata_row(row: dict, trigger: str) -> dict:
    """The metadata.jsonl line of manifest row ``row``: the source by file name only (a dataset
    shared on the Hub should not carry the folders of the machine it was made on), the trigger
    word its caption carries, the --query score (null without a query)."""
    out = {"file_name": row["path"], "caption": row["caption"], "trigger": trigger, "source": Path(row["source"]).name}
    out.update({k: row[k] for k in METADATA_KEYS[4:-1]})
    out["query_score"] = row.get("query_score")
    return out


def caption_trigger(state: dict, given: str = "") -> str:
    """The trigger word the captions carry: ``given`` (this run's), else the one the last caption
    run of the dataset (run state ``state``) applied; empty if none."""
    last = state.get("caption_settings", {}).get("trigger", "-")
    return given or ("" if last == "-" else last)


def manifest_row(plan: dict, caption: str, clip_rel: str, audio: bool = False) -> dict:
    row = {"path": clip_rel, "caption": caption}
    row.update({k: plan[k] for k in MANIFEST_KEYS[2:-1]})
    row["audio"] = bool(audio)
    return row


def write_if_changed(path: Path, text: str) -> bool:
    """Write atomically unless the file already holds exactly ``text``. Returns True if written."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def dataset_card(rows: list[dict], rejected: list[dict], settings: dict, skipped: list[tuple[str, str]]) -> str:
    """A short README.md for the dataset folder: what is in it and how to train on it."""
    seconds = sum(r["frames"] / r["fps"] for r in rows)
    sizes = sorted({f"{r['width']}x{r['height']}" for r in rows})
    sources = sorted({r["source"] for r in rows})
    reasons: dict[str, int] = {}
    for r in rejected:
        key = r["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    lines = [
        "# Video clip dataset",
        "",
        f"{len(rows)} clips ({seconds:.1f} s) from {len(sources)} source files, made by `python -m data_prep`.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += [
        f"| bucket sizes used | {', '.join(sizes) or '-'} |",
        "",
        f"Set aside: {len(rejected)} clips" + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) + ")" if reasons else "") + "; see `rejected.jsonl` and `report.html`.",
        f"Skipped inputs: {len(skipped)}" + (": " + ", ".join(f"{Path(p).name} ({r})" for p, r in skipped[:5]) + (", ..." if len(skipped) > 5 else "") if skipped else "") + ".",
        "",
        "## Use",
        "",
        "Train on it with `data.manifest: <this folder>/manifest.jsonl` (or `data.dataset: <this folder>`) in a "
        "recipe. Each line: " + ", ".join(f"`{k}`" for k in MANIFEST_KEYS)
        + ". Clips are constant-frame-rate H.264 MP4 (yuv420p) with exactly `frames` frames; "
        "those with `audio: true` carry their source's sound as 48 kHz stereo AAC.",
        "",
        "It is a Hugging Face video dataset too: `datasets.load_dataset(\"videofolder\", data_dir=\"<this folder>\")` "
        "reads `metadata.jsonl` (columns " + ", ".join(f"`{k}`" for k in ("video",) + METADATA_KEYS[1:]) + "; "
        "decoding the `video` column needs `torchcodec`, or cast it to `Video(decode=False)` for paths). "
        "Share it with `python -m data_prep push <this folder> --repo USER/NAME`.",
        "",
        "Edit a caption by writing `clips/<clip>.txt`; later caption runs keep it unless `--overwrite`.",
        "",
    ]
    return "\n".join(lines)
