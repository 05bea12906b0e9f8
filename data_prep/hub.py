"""push: a prepared dataset folder as a Hugging Face dataset repo, uploaded in one commit.

    python -m data_prep push dataset/ --repo me/my-clips [--private] [--license cc-by-4.0]
    python -m data_prep push dataset/ --repo me/my-clips --dry-run out/   # writes the repo folder, uploads nothing

The repo holds the clips the manifest lists (``clips/*.mp4`` as cut), ``metadata.jsonl`` (one line a
clip: ``file_name`` and the columns of :data:`data_prep.manifest.METADATA_KEYS`), a contact sheet and
a dataset card (``README.md``) whose metadata makes ``datasets.load_dataset("USER/NAME")`` use the
``videofolder`` builder. What stays home: clips set aside, caption sidecars, shot lists, the run
state, and the folders the footage came from (sources are named by file name only).

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; huggingface_hub sends it in the
Authorization header and nothing here reads it into a string.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep.manifest import METADATA_KEYS, caption_trigger, jsonl, metadata_row, read_jsonl
from data_prep.options import OptionsError
from finetune.errors import UserError

SHEET = "contact_sheet.png"
SHEET_CLIPS = 48  # clips on the card's contact sheet, spread over the dataset
CARD_TAGS = ["video", "text-to-video", "lora", "video-lora-studio"]


class PushError(UserError):
    """A dataset folder that cannot be pushed (or no token), found before anything is uploaded."""


def check_repo_id(repo_id: str) -> str:
    """``USER/NAME`` as the Hub accepts it. Raises OptionsError (a usage error) naming the fix."""
    from finetune.hub import repo_id_problem

    problem = repo_id_problem(repo_id)
    if problem:
        raise OptionsError([f"--repo {repo_id!r}: {problem}; e.g. --repo me/my-clips"])
    return repo_id


def read_dataset(root: Path) -> tuple[list[dict], dict]:
    """The manifest rows and run state of a prepared dataset folder. Raises PushError if it is not
    one, lists no clip, or some clips are missing (counted, the first few named)."""
    state_file, manifest = root / "prep_state.json", root / "manifest.jsonl"
    if not state_file.is_file() or not manifest.is_file():
        missing = ", ".join(p.name for p in (state_file, manifest) if not p.is_file())
        raise PushError(f"{root}: not a prepared dataset folder ({missing} missing); make one with: "
                        f"python -m data_prep prepare footage/ {root}")
    rows = read_jsonl(manifest)
    if not rows:
        raise PushError(f"{root}: the manifest lists no clips; prepare the dataset first "
                        f"(python -m data_prep prepare footage/ {root}) and check report.html")
    gone = [r["path"] for r in rows if not (root / r["path"]).is_file()]
    if gone:
        raise PushError(f"{root}: {len(gone)} of {len(rows)} clips in manifest.jsonl are missing: "
                        f"{', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}; re-run "
                        f"python -m data_prep prepare footage/ {root} to cut them again")
    return rows, json.loads(state_file.read_text())


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def dataset_card(rows: list[dict], state: dict, repo_id: str, license: str, shown: int):
    """The repo's README: Hub metadata (licence, task, tags, size, the videofolder config) and what
    the clips are, what they were cut for, where they came from and how to use them."""
    from huggingface_hub import DatasetCard, DatasetCardData

    cut = dict(state.get("cut_settings", {}))
    caption = state.get("caption_settings", {})
    family = cut.get("family", "")
    data = DatasetCardData(
        license=license, task_categories=["text-to-video"], size_categories=_size_category(len(rows)),
        pretty_name=repo_id.split("/")[1], tags=CARD_TAGS + ([family] if family else []),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": ["metadata.jsonl", "clips/*.mp4"]}]}],
    )
    seconds = sum(r["frames"] / r["fps"] for r in rows)
    per_source: dict[str, list[dict]] = {}
    for r in rows:
        per_source.setdefault(Path(r["source"]).name, []).append(r)
    sources = "\n".join(f"| {name} | {len(rs)} | {sum(r['frames'] / r['fps'] for r in rs):.1f} |"
                        for name, rs in sorted(per_source.items()))
    settings = {**cut, **({"captioner": caption["captioner"]} if caption.get("captioner") else {}),
                "trigger word": caption_trigger(state) or "-"}
    table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    licence_note = (" The licence of the footage was not given (`push --license`): check the terms of every source "
                    "below before using or sharing the clips." if license == "other" else "")
    columns = ", ".join(("video",) + METADATA_KEYS[1:])
    files = f"{len(per_source)} source file{'s' if len(per_source) != 1 else ''}"
    body = f"""
# {repo_id.split("/")[1]}

{len(rows)} video clips ({seconds:.1f} s) from {files}, cut, captioned and reviewed with video-lora-studio's
`data_prep` for LoRA training{f" of {family} models" if family else ""}.

![contact sheet]({SHEET})

First, middle and last frame of {shown} of the {len(rows)} clips, with their captions.

## Cut for

| setting | value |
|---|---|
{table}

Every clip is constant-frame-rate H.264 (yuv420p) with exactly `frames` frames at `fps`, from one shot of
its source: no hard cut, fade or dissolve inside.

## Sources

| source | clips | seconds |
|---|---|---|
{sources}

## Licence

`{license}`.{licence_note}

## Use

```python
from datasets import load_dataset

ds = load_dataset("{repo_id}", split="train")  # columns: {columns}
```

Decoding the `video` column needs `torchcodec`; `ds.cast_column("video", Video(decode=False))` gives the file
paths instead. Train a LoRA on it with video-lora-studio: `data.dataset: {repo_id}` in a recipe.
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def repo_files(dataset: str | Path, repo_id: str, license: str | None, workdir: Path) -> dict[str, Path]:
    """Every file of the repo by its path in the repo: the clips where they are in ``dataset``,
    metadata.jsonl, the contact sheet and README.md written into ``workdir``. Raises OptionsError
    (repo id) or PushError (dataset folder) before writing anything."""
    from data_prep.report import contact_sheet

    root = Path(dataset)
    check_repo_id(repo_id)
    rows, state = read_dataset(root)
    workdir.mkdir(parents=True, exist_ok=True)
    trigger = caption_trigger(state)
    (workdir / "metadata.jsonl").write_text(jsonl([metadata_row(r, trigger) for r in rows]), encoding="utf-8")
    shown = rows[:: max(1, -(-len(rows) // SHEET_CLIPS))]
    contact_sheet(shown, root, workdir / SHEET)
    dataset_card(rows, state, repo_id, license or "other", len(shown)).save(workdir / "README.md")
    files = {r["path"]: root / r["path"] for r in rows}
    files.update({name: workdir / name for name in ("metadata.jsonl", SHEET, "README.md")})
    return files


def build_folder(dataset: str | Path, out_dir: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write the repo folder for ``dataset`` into ``out_dir`` (emptied first if it holds an earlier
    build), to look at before pushing. Raises OptionsError or PushError before writing anything."""
    import tempfile

    root, out_dir = Path(dataset), Path(out_dir)
    check_repo_id(repo_id)
    read_dataset(root)
    if out_dir.resolve() == root.resolve() or root.resolve() in out_dir.resolve().parents:
        raise PushError(f"--dry-run {out_dir}: inside the dataset folder; pass a folder outside it")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "metadata.jsonl").is_file():
            raise PushError(f"--dry-run {out_dir}: folder is not empty; pass a new or empty folder")
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        for name, src in repo_files(root, repo_id, license, Path(tmp)).items():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out_dir / name)
    return out_dir


def require_token() -> None:
    from finetune.hub import token_missing

    missing = token_missing()
    if missing:
        raise PushError(missing)


def upload(files: dict[str, Path], repo_id: str, private: bool, n_clips: int) -> str:
    """Create the dataset repo (if new) and add ``files`` (path in repo -> local file) in one
    commit, clips straight from the dataset folder. Returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    require_token()
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset")
        api.create_commit(repo_id=repo_id, repo_type="dataset",
                          operations=[CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v)) for k, v in files.items()],
                          commit_message=f"Upload {n_clips} clips from video-lora-studio data_prep")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no answer"
        raise PushError(f"upload of dataset {repo_id} failed ({status}: {str(e).splitlines()[0]}); check that the token "
                        f"may write to {repo_id.split('/')[0]} (a write token; hf auth whoami) and try again") from None
    return str(url)


def push(dataset: str | Path, repo_id: str, private: bool = False, dry_run: str | Path | None = None,
         license: str | None = None) -> str:
    """Upload ``dataset`` as ``repo_id`` (or, with ``dry_run``, write the repo folder there).
    Returns a line for the user. Raises OptionsError or PushError before any upload."""
    import tempfile

    check_repo_id(repo_id)
    rows, _ = read_dataset(Path(dataset))
    if dry_run is not None:
        out = build_folder(dataset, dry_run, repo_id, license)
        return f"dry run: dataset repo folder written to {out} ({len(rows)} clips; nothing uploaded)"
    require_token()
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        url = upload(repo_files(dataset, repo_id, license, Path(tmp)), repo_id, private, len(rows))
    return f"pushed {len(rows)} clips: {url}"
