"""Finding shots by text on the real path: ``from_pretrained`` on a local folder holding a tiny random
SigLIP (a real transformers text-image class) and its processor, built in code and saved with
``save_pretrained``, exactly as ``--query-model`` loads a hub model. Random weights score at random,
so ranking is checked on a constructed case: a text embedding equal to one shot's image embedding
must rank that shot first, through the same pipeline the command line runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_prep_fixtures import SYNTH_CUTS, copy_synth

from data_prep.__main__ import main
from data_prep.manifest import read_jsonl
from data_prep.query import ShotScorer, match_scores, select_shots, shot_embeddings

WORDS = "night street neon day forest sea red blue green car person city light dark".split()
ARGS = ["--family", "wan", "--frames", "9", "--fps", "8", "--size", "64x48", "--buckets", "fixed", "--no-filter", "--no-progress"]
N_SHOTS = len(SYNTH_CUTS) + 1


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A seeded 1-layer SigLIP (text and vision towers, 32 wide) and its processor, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", model_max_length=16)
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, projection_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    return copy_synth(tmp_path_factory.mktemp("query") / "footage")


def test_scores_rank_by_similarity_and_select():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(9, 16))
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    shots = shot_embeddings(frames, [0, 0, 0, 1, 1, 1, 2, 2, 2], 3)
    assert np.allclose(np.linalg.norm(shots, axis=1), 1)
    for want in range(3):
        for bias in (None, -10.0):
            scores = match_scores(shots, shots[want], 10.0, bias)
            assert int(np.argmax(scores)) == want
    scores = {("a", 0): 0.9, ("a", 1): 0.2, ("b", 0): 0.5, ("b", 1): 0.5}
    assert select_shots(scores, 2, None) == {("a", 0), ("b", 0)}  # a tie goes to source, shot order
    assert select_shots(scores, None, 0.5) == {("a", 0), ("b", 0), ("b", 1)}
    assert select_shots(scores, 3, 0.6) == {("a", 0)}


def test_the_tiny_model_loads_through_from_pretrained(tiny_siglip):
    scorer = ShotScorer(str(tiny_siglip))
    scorer.load()
    images = [np.full((48, 64, 3), v, np.uint8) for v in (0, 128, 255)]
    emb = scorer.image_embeddings(images)
    text = scorer.text_embedding("Night street, neon")
    assert emb.shape == (3, 32) and text.shape == (32,)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5) and abs(np.linalg.norm(text) - 1) < 1e-5
    scale, bias = scorer.scale_bias
    assert scale > 0 and bias is not None  # SigLIP: a learned bias, so scores are probabilities
    assert np.allclose(text, scorer.text_embedding("night street, neon"))  # lower-cased, as SigLIP was trained


def test_a_text_equal_to_a_shots_embedding_keeps_that_shot(tiny_siglip, footage, tmp_path, monkeypatch, capsys):
    """The constructed case, through the command line: text embedding := shot 3's image embedding."""
    from data_prep.probe import probe_file
    from data_prep.query import embed_source
    from data_prep.split import detect_shots

    scorer = ShotScorer(str(tiny_siglip))
    src = footage / "synth_lavfi.mp4"
    target = embed_source(scorer, detect_shots(probe_file(src)), 0, 3)[3]
    monkeypatch.setattr(ShotScorer, "text_embedding", lambda self, text: target)
    out = tmp_path / "ds"
    code = main(["prepare", str(footage), str(out), *ARGS, "--query", "night street, neon", "--query-model", str(tiny_siglip),
                 "--query-top", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = read_jsonl(out / "manifest.jsonl")
    state = json.loads((out / "prep_state.json").read_text())["query"]
    ranked = state["shots"]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert len(ranked) == N_SHOTS and ranked[0]["shot"] == 3 and [r["kept"] for r in ranked] == [True, True] + [False] * (N_SHOTS - 2)
    assert {r["shot"] for r in rows} == {ranked[0]["shot"], ranked[1]["shot"]}
    assert all(r["query_score"] == next(s["score"] for s in ranked if s["shot"] == r["shot"]) for r in rows)
    page = (out / "report.html").read_text()
    assert "night street, neon" in page and page.count("<tr class=") == N_SHOTS
    assert page.count('class="kept"') == 2 and page.count('class="dropped"') == N_SHOTS - 2
    assert all((out / r["thumb"]).is_file() for r in ranked)
    assert "query: kept 2 of 7 shots" in capsys.readouterr().out


def test_a_new_query_reuses_the_shot_embeddings(tiny_siglip, footage, tmp_path):
    out = tmp_path / "ds"
    base = ["prepare", str(footage), str(out), *ARGS, "--query-model", str(tiny_siglip)]
    assert main([*base, "--query", "red car", "--query-min", "0"]) == 0  # every shot kept
    cache = next((out / "query").glob("*.npz"))
    stamp = cache.stat().st_mtime_ns
    assert len(read_jsonl(out / "manifest.jsonl")) == N_SHOTS
    assert main([*base, "--query", "blue sea", "--query-top", "1"]) == 0
    assert cache.stat().st_mtime_ns == stamp  # text re-encoded, frames not
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == 1 and len(list((out / "clips").glob("*.mp4"))) == 1  # dropped shots' clips removed
    assert main([*base]) == 0  # no query: every shot again, no scores
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == N_SHOTS and "query_score" not in rows[0]


def test_query_options_need_a_query(footage, tmp_path, capsys):
    assert main(["cut", str(footage), str(tmp_path / "ds"), *ARGS, "--query-top", "3"]) == 2
    assert "query_top=3 needs a query" in capsys.readouterr().err


def test_a_model_that_is_not_text_image_is_named(footage, tmp_path, capsys):
    code = main(["cut", str(footage), str(tmp_path / "ds"), *ARGS, "--query", "x", "--query-model", str(tmp_path / "nope")])
    assert code == 1
    assert f"--query-model {tmp_path / 'nope'}: cannot load a text-image model" in capsys.readouterr().err
