"""The vision-language captioner on its real path: ``from_pretrained`` on a local folder holding a
tiny random LLaVA (a real transformers image-text-to-text class) and a processor, both built in
code and saved with ``save_pretrained``. Output is gibberish; the path, batching, the trigger word
and human captions are what is checked. (Qwen2.5-VL's processor needs torchvision in
transformers 5, which this CPU environment does not have, so the tiny model is LLaVA.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from data_prep_fixtures import write_video

from data_prep import PrepOptions, on_dataset, prepare
from data_prep.manifest import read_jsonl

WORDS = "a the cat dog video clip of in on with and sky red blue green moving camera slow light dark scene person walks".split()
CHAT = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A seeded 2-layer LLaVA (CLIP vision tower + Llama text model) and its processor, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["USER", "ASSISTANT", ":", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=CHAT,
        image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture
def cut_dataset(tmp_path):
    footage = tmp_path / "footage"
    footage.mkdir()
    for k in range(3):
        write_video(footage / f"take{k}.mp4", 24)
    ds = tmp_path / "ds"
    prepare(footage, ds, PrepOptions(frames=5, fps=8, size="64x48", filter=False, progress=False), steps=("probe", "split", "cut", "filter", "manifest"))
    return ds


def test_vlm_captions_in_batches_with_trigger_once(tiny_vlm, cut_dataset, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    batches = []
    real_generate = LlavaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        batches.append(kwargs["input_ids"].shape[0])
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", spy)
    human = next(iter(sorted((cut_dataset / "clips").glob("take1*.mp4")))).with_suffix(".txt")
    human.write_text("a person wrote this")
    opts = PrepOptions(captioner=str(tiny_vlm), trigger="mystyle", caption_batch=2, caption_frames=2, max_new_tokens=6, progress=False)
    summary = on_dataset(cut_dataset, opts, steps=("caption", "manifest"))
    assert summary.captions_made == 2 and summary.human_captions == 1
    assert batches == [2]  # the two clips without a person's caption, in one batch of 2
    rows = read_jsonl(cut_dataset / "manifest.jsonl")
    assert len(rows) == 3 and all(r["caption"].startswith("mystyle") and r["caption"].count("mystyle") == 1 for r in rows)
    assert "mystyle, a person wrote this" in [r["caption"] for r in rows]
    again = on_dataset(cut_dataset, opts, steps=("caption", "manifest"))
    assert again.captions_made == 0 and batches == [2]
    assert read_jsonl(cut_dataset / "manifest.jsonl") == rows


def test_vlm_odd_batch(tiny_vlm, cut_dataset):
    opts = PrepOptions(captioner=str(tiny_vlm), caption_batch=2, caption_frames=1, max_new_tokens=4, progress=False)
    assert on_dataset(cut_dataset, opts, steps=("caption", "manifest")).captions_made == 3


def test_a_folder_that_is_not_a_model_fails_with_the_fix(tmp_path, cut_dataset):
    from finetune.errors import UserError

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(UserError, match="cannot load a vision-language model.*template"):
        on_dataset(cut_dataset, PrepOptions(captioner=str(empty), progress=False), steps=("caption",))
