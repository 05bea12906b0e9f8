"""Helpers shared by the tiny random builders (``Family.build_tiny``).

Tests never touch the network, so a tiny model needs everything a real one downloads, made in
code: a tokenizer, random weights that do not block LoRA gradients, and latent statistics that
fit its own random VAE the way the shipped statistics fit the real one.
"""

from __future__ import annotations

import string

import torch
import transformers

from finetune.families.base import TEXT_LEN_KEY

# Printable ASCII without whitespace: the Metaspace pre-tokenizer turns spaces into "▁", so
# whitespace entries would never be used.
_TINY_CHARS = tuple(c for c in string.printable if not c.isspace())


def tiny_t5_encoder_config(config_cls: type, tokenizer: transformers.T5Tokenizer) -> transformers.PretrainedConfig:
    """A 1-layer, d_model 32 config of ``config_cls`` (T5Config or UMT5Config) for ``tokenizer``,
    gated-GELU as the real T5-v1.1-XXL and umT5-XXL encoders."""
    return config_cls(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_tokenizer(model_max_length: int) -> transformers.T5Tokenizer:
    """A character-level T5 (sentencepiece-unigram) tokenizer built in code, no download.

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, then one id per printable ASCII character and
    ``▁`` (word start); anything else maps to ``<unk>``. Same class and special tokens as the
    real T5/UMT5 tokenizers, so pipelines treat it the same way."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # Equal scores make the unigram model split every word into single characters.
    vocab += [(c, -1.0) for c in _TINY_CHARS] + [("▁", -1.0)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_text(encoder_cls: type, text_len: int) -> tuple[transformers.T5Tokenizer, transformers.PreTrainedModel,
                                                            dict]:
    """The tiny stand-in of a T5-XXL or umT5-XXL text encoder: a character tokenizer padding to
    ``text_len`` (:func:`tiny_t5_tokenizer`), a 1-layer ``encoder_cls`` (``T5EncoderModel`` or
    ``UMT5EncoderModel``, :func:`tiny_t5_encoder_config`) for it, and the ``components.extra``
    entry that records the shorter prompt length."""
    tokenizer = tiny_t5_tokenizer(model_max_length=text_len)
    return tokenizer, encoder_cls(tiny_t5_encoder_config(encoder_cls.config_class, tokenizer)), {TEXT_LEN_KEY: text_len}


def tiny_gemma_tokenizer(model_max_length: int) -> transformers.GemmaTokenizer:
    """A character-level Gemma tokenizer (BPE, no merges) built in code, no download: the real
    class and special tokens, one id per printable ASCII character and ``▁``."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate([*specials, *_TINY_CHARS, "▁"])}
    return transformers.GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


@torch.no_grad()
def refill_zero_params(module: torch.nn.Module, std: float = 0.02) -> list[str]:
    """Refill every all-zero parameter of ``module`` with N(0, std) noise, in place.

    Real checkpoints have trained gates, modulation tables and output projections, but some
    constructors initialise them to zero. In a random model such a zero blocks the gradient
    path to every LoRA layer before it, so LoRA tests would see zero gradients. Draws from the
    global torch RNG, so the result is deterministic under the caller's seed.

    Returns the names of the refilled parameters (empty if none were all-zero)."""
    refilled = []
    for name, param in module.named_parameters():
        if param.numel() > 0 and not param.any():
            param.normal_(0.0, std)
            refilled.append(name)
    return refilled


def calibration_videos(frames: int, height: int, width: int, batch: int = 2) -> torch.Tensor:
    """[batch, 3, frames, height, width] in [-1, 1]: smooth random colour fields (noise on a grid
    8x coarser in space, 2x in time, trilinearly upsampled), closer to real clips than white
    noise. Draws from the global torch RNG, so it is deterministic under the caller's seed."""
    coarse = torch.rand(batch, 3, max(2, frames // 2), max(2, height // 8), max(2, width // 8)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=True)


@torch.no_grad()
def channel_stats(latents: torch.Tensor, eps: float = 1e-6) -> tuple[list[float], list[float]]:
    """latents [B, C, f, h, w] -> (mean, std) per channel, each a list of C floats (std >= eps).

    Real checkpoints ship per-channel latent statistics measured on their own VAE; a random VAE
    needs its own, or normalised latents are a constant offset with the clip content nearly
    invisible, and a LoRA has nothing to learn."""
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(eps)
    return mean.tolist(), std.tolist()


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_llama3_tokenizer(model_max_length: int, special_tokens: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (one token per byte) built in code, no download:
    the same class and byte-level scheme as the Llama-3 tokenizers (``PreTrainedTokenizerFast``),
    ``<|begin_of_text|>`` prepended, ``<|end_of_text|>`` as end and pad token. ``special_tokens``
    (chat headers, ``<image>``) become single tokens, as they are in the real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    vocab = {t: i for i, t in enumerate((bos, eos, *special_tokens))}
    for c in _byte_level_alphabet():
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                               model_max_length=model_max_length)
    out.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return out


def tiny_clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges (one token per character, with and without the
    ``</w>`` word end) built in code, no download; same class and special tokens as the real one."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _byte_level_alphabet():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_text() -> tuple[transformers.CLIPTokenizer, transformers.CLIPTextModel]:
    """The tiny stand-in of CLIP ViT-L/14's text tower: :func:`tiny_clip_tokenizer` and a 1-layer
    CLIP text model (hidden 32) with the 77 positions the pipelines pad to."""
    tokenizer = tiny_clip_tokenizer()
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, transformers.CLIPTextModel(config)


def tiny_qwen_tokenizer() -> transformers.Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer built in code, no download: one token per byte, no merges,
    right padding, Qwen's chat special tokens (``<|im_start|>``, ``<|im_end|>``)."""
    tokenizer = transformers.Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_byte_level_alphabet())}, merges=[],
                                            model_max_length=4096, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen_text_config(tokenizer: transformers.Qwen2Tokenizer, layers: int) -> dict:
    """Keyword arguments of a Qwen2.5-VL text config of ``layers`` layers (hidden 32, 4 heads, 2
    key/value heads, multimodal rope) for ``tokenizer``: the tiny stand-in of Qwen2.5-VL-7B's
    text model, which HunyuanVideo-1.5 and Kandinsky 5 read prompts with."""
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
