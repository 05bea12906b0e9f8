"""The clip dataset as a Hugging Face dataset: a prepared folder loads with datasets'
``videofolder`` builder (caption, trigger, shot, fps, frames, audio, query score as columns);
``python -m data_prep push`` writes or uploads it in one commit with a dataset card, the token only
ever in the Authorization header; ``data.dataset`` trains from the folder, or from the Hub after one
download into huggingface_hub's cache. The Hub is a recording server on 127.0.0.1 (hub_server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from data_prep_fixtures import copy_synth
from hub_server import committed_files, serve

from data_prep import PrepOptions, prepare
from data_prep.__main__ import main
from data_prep.manifest import METADATA_KEYS, read_jsonl
from finetune.errors import DataError, RecipeError

TOKEN = "hf_test_DoNotLeakThis0123456789"
COLUMNS = ["video", *METADATA_KEYS[1:]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The synthetic sample cut for the tiny Wan recipe (9 frames at 8 fps, 32x32); the filter sets
    the dark and static clips aside, so the folder holds clips the manifest does not list."""
    root = tmp_path_factory.mktemp("hub")
    opts = PrepOptions(family="wan", frames=9, fps=8, size="32x32", buckets="fixed", trigger="mystyle", progress=False)
    summary = prepare(copy_synth(root / "footage"), root / "dataset", opts)
    assert summary.clips >= 3 and summary.rejected >= 1
    return root / "dataset"


@pytest.fixture(scope="module")
def dry_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "repo"
    assert main(["push", str(prepared), "--repo", "me/clips", "--dry-run", str(out)]) == 0
    return out


def _load(**kwargs):
    import datasets

    ds = datasets.load_dataset(**kwargs, split="train")
    return ds.cast_column("video", datasets.Video(decode=False))  # decoding needs torchcodec


def test_prepared_folder_loads_with_the_videofolder_builder(prepared):
    rows = read_jsonl(prepared / "manifest.jsonl")
    ds = _load(path="videofolder", data_dir=str(prepared))
    assert ds.column_names == COLUMNS
    assert [Path(v["path"]) for v in ds["video"]] == [(prepared / r["path"]).resolve() for r in rows]
    assert ds["caption"] == [r["caption"] for r in rows] and set(ds["trigger"]) == {"mystyle"}
    assert ds["shot"] == [r["shot"] for r in rows] and ds["frames"] == [9] * len(rows)
    assert ds["fps"] == [8.0] * len(rows) and ds["audio"] == [r["audio"] for r in rows]
    assert ds["query_score"] == [None] * len(rows) and set(ds["source"]) == {"synth_lavfi.mp4"}
    rejected = {r["path"] for r in read_jsonl(prepared / "rejected.jsonl")}
    assert rejected and not rejected & {f"clips/{Path(v['path']).name}" for v in ds["video"]}


def test_dry_run_folder_is_the_repo_with_a_card(prepared, dry_run):
    from huggingface_hub import DatasetCard

    rows = read_jsonl(prepared / "manifest.jsonl")
    names = {p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file()}
    assert names == {"README.md", "metadata.jsonl", "contact_sheet.png", *(r["path"] for r in rows)}
    for r in rows:
        assert (dry_run / r["path"]).read_bytes() == (prepared / r["path"]).read_bytes()
    card = DatasetCard.load(dry_run / "README.md")
    assert card.data.license == "other" and card.data.task_categories == ["text-to-video"]
    assert "wan" in card.data.tags and card.data.size_categories == "n<1K"
    for needle in (f"{len(rows)} video clips", "| family | wan |", "| frame rule | 4k+1 |", "| trigger word | mystyle |",
                   f"| synth_lavfi.mp4 | {len(rows)} |", "check the terms of every source", "data.dataset: me/clips",
                   "![contact sheet](contact_sheet.png)"):
        assert needle in card.text, needle
    # the machine's folders stay home: sources by file name only
    text = (dry_run / "metadata.jsonl").read_text() + card.content
    assert str(prepared.parent) not in text
    # the card's config makes the folder load as it will from the Hub
    ds = _load(path=str(dry_run))
    assert ds.column_names == COLUMNS and ds["caption"] == [r["caption"] for r in rows]


def _env(endpoint: str, tmp_path: Path, token: str | None) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def test_push_uploads_one_commit_and_the_token_only_as_authorization(prepared, dry_run, tmp_path):
    with serve() as (endpoint, requests):
        command = [sys.executable, "-m", "data_prep", "push", str(prepared), "--repo", "me/clips", "--private",
                   "--license", "cc-by-4.0"]
        done = subprocess.run(command, cwd=ROOT, env=_env(endpoint, tmp_path, TOKEN), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert TOKEN not in done.stdout + done.stderr and "pushed" in done.stdout
    create = [r for r in requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    body = json.loads(create[0]["body"])
    assert body["type"] == "dataset" and body["visibility"] == "private" and body["name"] == "clips"
    commits = [r for r in requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/datasets/me/clips/commit/")
    sent = committed_files(commits[0])
    expected = {p.relative_to(dry_run).as_posix(): p for p in dry_run.rglob("*") if p.is_file()}
    assert set(sent) == set(expected)
    for name in [n for n in sent if n.endswith(".mp4")] + ["metadata.jsonl"]:
        assert sent[name] == expected[name].read_bytes(), name
    assert b"license: cc-by-4.0" in sent["README.md"]
    for r in requests:
        assert r["headers"].get("authorization") == f"Bearer {TOKEN}", (r["method"], r["path"])
        others = {k: v for k, v in r["headers"].items() if k != "authorization"}
        assert TOKEN not in json.dumps(others) and TOKEN not in r["path"] and TOKEN.encode() not in r["body"]


def test_push_bad_input_is_named_before_anything_is_sent(prepared, tmp_path, capsys, monkeypatch):
    assert main(["push", str(prepared), "--repo", "clips", "--dry-run", str(tmp_path / "x")]) == 2
    assert "--repo 'clips': must be USER/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo", "me/clips", "--dry-run", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a prepared dataset folder" in err and "python -m data_prep prepare footage/" in err
    assert not (tmp_path / "x").exists()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    assert main(["push", str(prepared), "--repo", "me/clips"]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err


def test_a_tiny_run_trains_from_data_dataset(prepared, dry_run, tmp_path):
    """data.dataset=<prepared folder>: the same clips and captions as its manifest, the latent cache
    in the folder; the pushed layout (metadata.jsonl only) lists the same clips."""
    from finetune import trainer
    from finetune.config import load_recipe
    from finetune.data import load_clips, load_manifest

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "wan.yaml",
                         [f"data.dataset={prepared}", f"output.dir={tmp_path / 'run'}", "optim.steps=2",
                          "checkpoint.every=0"])  # fmt: skip
    assert recipe.data.manifest is None
    result = trainer.train(recipe)
    assert result is not None and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert any((prepared / ".cache").rglob("*.safetensors"))
    ours = load_manifest(prepared / "manifest.jsonl", "mystyle")
    pushed = load_clips(None, str(dry_run), "mystyle")
    assert [(c.path.name, c.caption, c.size) for c in pushed] == [(c.path.name, c.caption, c.size) for c in ours]
    # publishing the run makes its previews from the same clips' captions
    from finetune.export import RunInfo
    from finetune.publish import caption_prompts

    prompts = caption_prompts(RunInfo.read(result.run_dir))
    assert prompts and all(p == ours[i].caption for p, i in prompts)


def test_data_dataset_errors_are_named(tmp_path):
    from finetune.config import load_recipe
    from finetune.data import load_clips

    with pytest.raises(RecipeError, match="data.manifest='m.jsonl' and data.dataset='me/clips': train from one"):
        load_recipe(ROOT / "recipes" / "tiny" / "wan.yaml", ["data.manifest=m.jsonl", "data.dataset=me/clips"])
    with pytest.raises(DataError, match=r"data.dataset='no such/folder!': not a folder of clips and not a Hub"):
        load_clips(None, "no such/folder!")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has neither manifest.jsonl .* nor metadata.jsonl"):
        load_clips(None, str(tmp_path / "empty"))


LOAD = """
import sys
from finetune.data import clips_cache_dir, load_clips
clips = load_clips(None, "me/clips", "mystyle")
print(len(clips), clips[0].path.parent.parent, clips_cache_dir(None, "me/clips"))
"""


def test_data_dataset_from_the_hub_is_downloaded_once(prepared, dry_run, tmp_path):
    """The first run downloads every file of the repo into huggingface_hub's cache; the next asks
    the Hub for its revision only; offline, it needs nothing."""
    with serve({"me/clips": dry_run}) as (endpoint, requests):
        runs = []
        for offline in (False, False, True):
            env = _env(endpoint, tmp_path, None) | ({"HF_HUB_OFFLINE": "1"} if offline else {})
            done = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            runs.append((done.stdout.split(), [r["path"] for r in requests]))
            requests.clear()
    n = len(read_jsonl(prepared / "manifest.jsonl"))
    (first, first_requests), (second, second_requests), (third, third_requests) = runs
    assert first[0] == str(n) and first == second == third
    assert Path(first[1]).is_relative_to(tmp_path / "hf" / "hub")  # the clips are read from the cache
    assert Path(first[2]).is_relative_to(tmp_path / "hf") and "video-lora-studio" in first[2]
    downloads = [p for p in first_requests if "/resolve/" in p]
    assert len({p.rsplit("/resolve/", 1)[1] for p in downloads}) == n + 3  # clips, metadata, sheet, card
    assert not [p for p in second_requests if "/resolve/" in p] and len(second_requests) == 1
    assert third_requests == []
