"""Helpers shared by the tiny random builders (``Family.build_tiny``).

Tests never touch the network, so a tiny model needs everything a real one downloads, made in
code: a tokenizer and random weights that do not block LoRA gradients.
"""

from __future__ import annotations

import string

import torch
import transformers

# Printable ASCII without whitespace: the Metaspace pre-tokenizer turns spaces into "▁", so
# whitespace entries would never be used.
_TINY_CHARS = tuple(c for c in string.printable if not c.isspace())


def tiny_t5_tokenizer(model_max_length: int) -> transformers.T5Tokenizer:
    """A character-level T5 (sentencepiece-unigram) tokenizer built in code, no download.

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, then one id per printable ASCII character and
    ``▁`` (word start); anything else maps to ``<unk>``. Same class and special tokens as the
    real T5/UMT5 tokenizers, so pipelines treat it the same way."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # Equal scores make the unigram model split every word into single characters.
    vocab += [(c, -1.0) for c in _TINY_CHARS] + [("▁", -1.0)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


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
