"""Publishing a run folder: the dry-run repo folder (files, card metadata, previews that decode),
named errors before any upload, and the upload itself against a local HTTP endpoint that records
what it receives (tests/hub_server.py; the Hub is never contacted). CPU, offline, tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
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


# ---------------------------------------------------------------------------- previews of a run without prompts

# Two clips share a caption (one preview, not two alike); the third lacks the trigger word.
BARE_CAPTIONS = ["mystyle, a red square", "mystyle, a red square", "a blue circle"]
BARE_PROMPTS = ["mystyle, a red square", "mystyle, a blue circle"]


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory):
    """A tiny run with no validation.prompts (so no samples), 2 inference steps for its previews."""
    tmp = tmp_path_factory.mktemp("bare")
    manifest = write_clips(tmp / "clips", n=3, frames=9, height=32, width=32, captions=BARE_CAPTIONS)
    recipe = tiny_recipe("wan", manifest, tmp / "run", "optim.steps=2", "optim.lr=1e-2", "checkpoint.every=0",
                         "validation.steps=2", "validation.guidance=1.0", "validation.seed=3")
    run_dir = trainer.train(recipe).run_dir
    assert not (run_dir / "samples").exists()
    return run_dir


@pytest.fixture(scope="module")
def bare_dry_run(bare_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bare_dry") / "repo"
    assert main([str(bare_run), "--repo", "me/bare", "--dry-run", str(out)]) == 0
    return out


def _frames(path: Path) -> list:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _no_rendering(monkeypatch):
    """Loading a base model fails: a test passes only if nothing is rendered."""
    import finetune.inference

    def refuse(*a, **k):
        raise AssertionError("a base model was loaded")

    monkeypatch.setattr(finetune.inference, "load_base", refuse)


def test_run_without_prompts_gets_previews_from_trigger_and_captions(bare_dry_run, bare_run):
    names = {p.name for p in (bare_dry_run / "previews").iterdir()}
    assert names == {"preview-0.mp4", "preview-0.webp", "preview-1.mp4", "preview-1.webp"}
    card = ModelCard.load(bare_dry_run / "README.md")
    assert [w["text"] for w in card.data.widget] == BARE_PROMPTS
    assert [w["output"]["url"] for w in card.data.widget] == ["previews/preview-0.webp", "previews/preview-1.webp"]
    assert "Rendered when publishing (2 steps, seed 3; prompts: the trigger word and captions" in card.text
    assert "No previews" not in card.text
    for k in (0, 1):
        frames = _frames(bare_dry_run / "previews" / f"preview-{k}.mp4")
        assert len(frames) == 9 and frames[0].shape == (32, 32 + 4 + 32, 3)  # the run's clip size, base | LoRA
        left, right = frames[-1][:, :32].astype(int), frames[-1][:, 36:].astype(int)
        assert abs(left - right).max() > 0
        with Image.open(bare_dry_run / "previews" / f"preview-{k}.webp") as im:
            assert im.format == "WEBP" and im.n_frames == 9
    kept = sorted(p.name for p in (bare_run / "samples").iterdir())
    assert len(kept) == 4 and all(n.startswith("preview-") for n in kept), kept


def test_each_prompt_renders_without_then_with_the_lora_same_seed_at_the_clip_size(bare_run, tmp_path, monkeypatch):
    """Every render publish makes, as the pipeline is called: per prompt one without the adapter and
    one with it, with the recipe's seed and guidance, 2 steps, the run's 9 frames of 32x32."""
    import finetune.inference

    calls = []
    real = finetune.inference.render_with_audio

    def spy(family, pipe, args):
        adapted = any("lora_A" in n for n, _ in family.components.transformer.named_modules())
        calls.append((args.prompt, adapted, args.seed, args.guidance, args.steps, args.frames, args.height, args.width))
        return real(family, pipe, args)

    monkeypatch.setattr(finetune.inference, "render_with_audio", spy)
    fresh = tmp_path / "run"
    shutil.copytree(bare_run, fresh, ignore=shutil.ignore_patterns("samples"))
    build_folder(fresh, tmp_path / "repo", "me/bare")
    settings = (3, 1.0, 2, 9, 32, 32)
    assert calls == [(p, lora, *settings) for lora in (False, True) for p in BARE_PROMPTS]


def test_caption_prompts_are_distinct_and_spread_over_the_manifest(tmp_path):
    from finetune.export import RunInfo
    from finetune.publish import caption_prompts

    captions = [f"clip {i}" for i in range(5)]
    manifest = write_clips(tmp_path / "clips", n=5, frames=1, height=8, width=8, captions=captions)
    info = RunInfo(family="wan", base_model="x", revision=None, tiny=True, tiny_seed=0, trigger="mystyle", steps=1,
                   weight_name="w", recipe={"data": {"manifest": str(manifest)}})
    assert caption_prompts(info) == [("mystyle, clip 0", 0), ("mystyle, clip 2", 2)]
    assert caption_prompts(info, n=1) == [("mystyle, clip 0", 0)]


def test_a_second_publish_reuses_the_renders(bare_dry_run, bare_run, tmp_path, monkeypatch):
    _no_rendering(monkeypatch)
    out = build_folder(bare_run, tmp_path / "again", "me/bare")
    assert (out / "previews" / "preview-1.mp4").read_bytes() == (bare_dry_run / "previews" / "preview-1.mp4").read_bytes()


def test_preview_prompt_chooses_the_prompts(bare_run, tmp_path, capsys):
    assert main([str(bare_run), "--repo", "me/bare", "--dry-run", str(tmp_path / "repo"),
                 "--preview-prompt", "mystyle, a green triangle"]) == 0
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert [w["text"] for w in card.data.widget] == ["mystyle, a green triangle"]
    assert "prompts chosen with `--preview-prompt`" in card.text
    assert sorted(p.name for p in (tmp_path / "repo" / "previews").iterdir()) == ["preview-0.mp4", "preview-0.webp"]


def test_no_previews_renders_nothing(bare_run, tmp_path, monkeypatch):
    _no_rendering(monkeypatch)
    assert main([str(bare_run), "--repo", "me/bare", "--dry-run", str(tmp_path / "repo"), "--no-previews"]) == 0
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert getattr(card.data, "widget", None) is None and "No previews (published with `--no-previews`)." in card.text
    assert not any((tmp_path / "repo").rglob("*.mp4"))


def test_run_whose_manifest_is_gone_publishes_without_previews_and_says_why(bare_run, tmp_path, capsys, monkeypatch):
    moved = tmp_path / "run"
    shutil.copytree(bare_run, moved, ignore=shutil.ignore_patterns("samples"))
    info = json.loads((moved / "video_lora.json").read_text())
    info["recipe"]["data"]["manifest"] = str(tmp_path / "gone" / "manifest.jsonl")
    (moved / "video_lora.json").write_text(json.dumps(info))
    with monkeypatch.context() as m:
        _no_rendering(m)
        assert main([str(moved), "--repo", "me/bare", "--dry-run", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "note: no previews:" in out and str(tmp_path / "gone" / "manifest.jsonl") in out
    assert '--preview-prompt "mystyle, ..."' in out and "dry run: repo folder written" in out
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert getattr(card.data, "widget", None) is None and "No previews: the training manifest was gone" in card.text
    # a t2v run needs no clip to render from: chosen prompts still make previews
    assert main([str(moved), "--repo", "me/bare", "--dry-run", str(tmp_path / "repo2"), "--preview-prompt", "mystyle"]) == 0
    assert (tmp_path / "repo2" / "previews" / "preview-0.webp").is_file()


@pytest.mark.slow
def test_upload_of_a_run_without_prompts_sends_its_previews(bare_run, bare_dry_run, hub, tmp_path):
    from test_quiet import foreign_lines

    endpoint, requests = hub
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "finetune.publish", str(bare_run), "--repo", "me/bare"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert foreign_lines(done.stderr) == []
    commits = [r for r in requests if "/commit/" in r["path"]]
    assert len(commits) == 1
    sent = committed_files(commits[0])
    for name in ("previews/preview-0.mp4", "previews/preview-0.webp", "previews/preview-1.mp4",
                 "previews/preview-1.webp"):
        assert sent[name] == (bare_dry_run / name).read_bytes(), name
    assert b"url: previews/preview-1.webp" in sent["README.md"] and BARE_PROMPTS[1].encode() in sent["README.md"]


def test_i2v_previews_start_from_the_first_frame_of_the_clip_their_caption_came_from(tmp_path, monkeypatch):
    import numpy as np

    import finetune.inference
    from finetune.video import first_frame

    manifest = write_clips(tmp_path / "clips", n=3, frames=9, height=32, width=32, captions=BARE_CAPTIONS)
    recipe = tiny_recipe("wan:i2v", manifest, tmp_path / "run", "optim.steps=1", "checkpoint.every=0",
                         "validation.steps=2", "validation.guidance=1.0")
    run_dir = trainer.train(recipe).run_dir
    images = []
    real = finetune.inference.render_with_audio

    def spy(family, pipe, args):
        images.append((args.prompt, np.asarray(args.image)))
        return real(family, pipe, args)

    monkeypatch.setattr(finetune.inference, "render_with_audio", spy)
    out = build_folder(run_dir, tmp_path / "repo", "me/i2v")
    assert [w["text"] for w in ModelCard.load(out / "README.md").data.widget] == BARE_PROMPTS
    frames = {p: np.asarray(first_frame(manifest.parent / f"clip{i:03d}.mp4")) for p, i in zip(BARE_PROMPTS, (0, 2))}
    assert len(images) == 4 and all(np.array_equal(image, frames[p]) for p, image in images)
    assert (out / "previews" / "preview-1.webp").is_file()
