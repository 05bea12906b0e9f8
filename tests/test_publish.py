"""Publishing a run folder: the dry-run repo folder (files, card metadata, previews that decode),
named errors before any upload, and the upload itself against a local HTTP endpoint that records
what it receives (tests/hub_server.py; the Hub is never contacted). CPU, offline, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from conftest import ROOT, tiny_recipe, write_clips
from hub_server import committed_files, serve
from finetune import trainer
from finetune.publish import PublishError, build_folder, main

TOKEN = "hf_test_DoNotLeakThis0123456789"
PROMPTS = ["mystyle, a square", "mystyle, two squares"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    manifest = write_clips(tmp / "clips", n=2, frames=9, height=32, width=32)
    recipe = tiny_recipe("wan", manifest, tmp / "run", "optim.steps=2", "optim.lr=1e-2", "checkpoint.every=0",
                         "lora.rank=8", "lora.alpha=16", f"validation.prompts={json.dumps(PROMPTS)}",
                         "validation.steps=2", "validation.guidance=1.0")
    return trainer.train(recipe).run_dir


@pytest.fixture(scope="module")
def dry_run(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "repo"
    assert main([str(run_dir), "--repo", "me/my-style", "--dry-run", str(out)]) == 0
    return out


def test_dry_run_folder_holds_both_lora_files_the_run_description_and_previews(dry_run):
    names = {p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file()}
    assert names == {
        "README.md", "pytorch_lora_weights.safetensors", "comfyui_lora.safetensors", "video_lora.json", "recipe.yaml",
        "previews/preview-0.mp4", "previews/preview-0.webp", "previews/preview-1.mp4", "previews/preview-1.webp",
    }


def test_card_metadata_and_text(dry_run):
    card = ModelCard.load(dry_run / "README.md")
    d = card.data
    assert d.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert d.base_model_relation == "adapter" and d.library_name == "diffusers"
    assert d.pipeline_tag == "text-to-video" and d.instance_prompt == "mystyle"
    assert {"lora", "wan", "text-to-video"} <= set(d.tags)
    assert d.license == "other"
    assert [w["output"]["url"] for w in d.widget] == ["previews/preview-0.webp", "previews/preview-1.webp"]
    assert [w["text"] for w in d.widget] == PROMPTS
    for needle in ("load_lora_weights(\"me/my-style\"", "LoraLoaderModelOnly", "comfyui_lora.safetensors",
                   "| steps | 2 |", "| rank / alpha | 8 / 16.0 |", "| clips | 2", "9 at 8 fps, 32x32"):
        assert needle in card.text, needle


def test_previews_decode_side_by_side(dry_run, run_dir):
    with av.open(str(dry_run / "previews" / "preview-0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32 + 4 + 32, 3)
    # left half is the base render, right half the LoRA render: they differ
    left, right = frames[-1][:, :32].astype(int), frames[-1][:, 36:].astype(int)
    assert abs(left - right).max() > 0
    with Image.open(dry_run / "previews" / "preview-0.webp") as im:
        assert im.format == "WEBP" and getattr(im, "n_frames", 1) == 9
    assert (run_dir / "samples" / "base-0.mp4").is_file(), "base renders are kept for the next publish"


def test_unfinished_run_and_bad_repo_id_are_named_errors(run_dir, tmp_path):
    with pytest.raises(PublishError, match=r"--repo 'my-style': must be USER/NAME"):
        build_folder(run_dir, tmp_path / "x", "my-style")
    with pytest.raises(PublishError, match=r"--repo 'me/bad name!'"):
        build_folder(run_dir, tmp_path / "x", "me/bad name!")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("{}")
    with pytest.raises(PublishError, match="not a trained run folder.*only finished runs can be published"):
        build_folder(unfinished, tmp_path / "x", "me/x")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def hub():
    with serve() as (endpoint, requests):
        yield endpoint, requests


def test_upload_sends_the_folder_in_one_commit_and_the_token_only_as_authorization(run_dir, dry_run, hub, tmp_path):
    endpoint, requests = hub
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "finetune.publish", str(run_dir), "--repo", "me/my-style", "--private"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert TOKEN not in done.stdout + done.stderr

    create = [r for r in requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1 and json.loads(create[0]["body"])["visibility"] == "private"
    commits = [r for r in requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/models/me/my-style/commit/")
    sent = committed_files(commits[0])
    expected = {p.relative_to(dry_run).as_posix(): p for p in dry_run.rglob("*") if p.is_file()}
    assert set(sent) == set(expected)
    for name in ("pytorch_lora_weights.safetensors", "comfyui_lora.safetensors", "video_lora.json"):
        assert sent[name] == expected[name].read_bytes()

    secret = TOKEN.encode()
    for r in requests:
        assert r["headers"].get("authorization") == f"Bearer {TOKEN}", (r["method"], r["path"])
        others = {k: v for k, v in r["headers"].items() if k != "authorization"}
        assert TOKEN not in json.dumps(others) and TOKEN not in r["path"] and secret not in r["body"]
    for content in sent.values():
        assert secret not in content
    for p in Path(dry_run).rglob("*"):
        assert not p.is_file() or secret not in p.read_bytes()


def test_upload_without_a_token_is_a_named_error(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    with pytest.raises(PublishError, match="no Hugging Face token"):
        main([str(run_dir), "--repo", "me/my-style"])
