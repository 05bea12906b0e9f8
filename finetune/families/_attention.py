"""Attention over the valid tokens only: exact, mask-free replacements for attention whose mask
does nothing but mark padding tokens.

Why: HunyuanVideo-1.5 pads its prompts and masks the padding out of every attention call with a
dense mask, [B, 1, S, S] with S the video plus text tokens (about 51k at 480p x 121 frames: 2.6 GB
as bool, 5 GB once SDPA turns it into a bf16 bias), built again in each of its 54 blocks. A mask
also rules out the flash kernel (it takes none), and the padding tokens' own rows are fully
masked. A fully masked row has logsumexp -inf, and cuDNN's SDPA backward (PyTorch's first choice
on H100/H200; a regression since torch 2.11) writes NaN into grad_q when an explicit mask is
passed, the sequence length is 64 mod 128 and some row's logsumexp is below ln(FLT_MAX) ~ -88.7
(pytorch/pytorch#196678; the same bug behind huggingface/trl#7181). A NaN in grad_q reaches every
LoRA weight before it.

What: each sample attends over its valid tokens alone, with no mask. For a valid query this is the
masked computation (masked-out keys get weight exactly 0 there), and no row is ever fully masked;
a padding query gets zeros, which is also what PyTorch's math kernel returns for a fully masked
row, so on a CPU even the padding rows equal the masked computation. Samples run one after the
other, since their valid counts differ; valid tokens that form a prefix (right padding, as every
model here lays them out) are attended as a view, others as a gathered copy.

Cost: a few host syncs per call (is everything valid; then each sample's valid positions),
small beside a block of a video model; padding tokens still go through the per-token layers, only
attention skips them.

The memory planner traces with value-free fake tensors (finetune/memory/trace.py), where
``bool(valid.all())`` reads True: it sees one unmasked call over every token, as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb


def attend_valid(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                 backend: Any = None) -> torch.Tensor:
    """query, key, value [B, S, heads, head_dim]; valid [B, S] bool (True: the token takes part),
    or None for all -> [B, S, heads, head_dim]. Equal, on valid rows, to attention with the mask
    ``valid[:, None, :, None] & valid[:, None, None, :]``; zeros on the others. SDPA never gets a
    mask; ``backend`` is diffusers' attention backend (None: its default, torch SDPA)."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)

    if valid is None or bool(valid.all()):
        return attend(query, key, value)
    b, s = valid.shape
    outs = []
    for i in range(b):
        q, k, v = query[i:i + 1], key[i:i + 1], value[i:i + 1]
        idx = valid[i].nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:  # a sample with nothing valid: every row fully masked
            outs.append(torch.zeros_like(q))
        elif int(idx[-1]) == n - 1:  # the valid tokens are a prefix
            outs.append(F.pad(attend(q[:, :n], k[:, :n], v[:, :n]), (0, 0, 0, 0, 0, s - n)))
        else:
            out = attend(*(t.index_select(1, idx) for t in (q, k, v)))
            outs.append(out.new_zeros(q.shape).index_copy(1, idx, out))
    return torch.cat(outs)


class _ValidTokensProcessor:
    """Base of the processors below: diffusers' attention-backend attributes, which
    ``set_attention_backend`` sets on every processor of a model."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                valid: torch.Tensor | None) -> torch.Tensor:
        if self._parallel_config is not None:
            raise NotImplementedError(f"{type(self).__name__}: context parallelism splits the sequence that this "
                                      "processor cuts per sample; it is not supported (leave parallel_config unset)")
        return attend_valid(query, key, value, valid, self._attention_backend)


class SelfAttentionProcessor(_ValidTokensProcessor):
    """diffusers' AttnProcessor2_0 for a plain self-attention ``Attention`` (to_q/k/v, optional
    per-head q/k norms, to_out) whose [B, 1, L, L] mask comes from a padding mask: a valid row
    sees exactly the valid tokens. The token refiners build it so: HunyuanVideo-1.5 as
    valid_i & valid_j (padding rows fully masked), HunyuanVideo 13B letting every row also see
    token 0, a valid one under right padding. The valid tokens are the mask's diagonal, and they
    attend over each other alone (:func:`attend_valid`).

    hidden_states [B, L, D] -> [B, L, D]. Raises ValueError for an ``Attention`` with parts this
    form does not have (cross-attention input, spatial or group norm, residual, output rescale)."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if (encoder_hidden_states is not None or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.residual_connection or attn.rescale_output_factor != 1.0):
            raise ValueError(f"{type(self).__name__} computes plain self-attention only; this Attention has a "
                             "cross-attention input, spatial/group norm, residual or output rescale: keep "
                             "diffusers' AttnProcessor2_0 for it")
        heads = (attn.heads, -1)
        query = attn.to_q(hidden_states).unflatten(2, heads)
        key = attn.to_k(hidden_states).unflatten(2, heads)
        value = attn.to_v(hidden_states).unflatten(2, heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        valid = None if attention_mask is None else attention_mask.bool().flatten(1, 2).diagonal(dim1=1, dim2=2)
        out = self._attend(query, key, value, valid).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideo15Processor(_ValidTokensProcessor):
    """HunyuanVideo-1.5's double-stream attention (diffusers' HunyuanVideo15AttnProcessor2_0):
    video tokens (RoPE) then text tokens, each with its own projections and q/k norms, one
    attention over both. diffusers turns the text mask into a dense [B, 1, S, S] mask; here the
    padding text tokens are left out (:func:`attend_valid`), no mask at all.

    hidden_states [B, N, D] video tokens (all valid); encoder_hidden_states [B, L, D] text tokens
    (the model's reordering puts each sample's valid ones first); attention_mask [B, L], nonzero
    for a valid text token -> (video [B, N, D], text [B, L, D]; a padding token's row is
    ``to_add_out`` of zeros, as PyTorch's math kernel gives for the masked computation)."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads = (attn.heads, -1)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, heads))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, heads))
        value = attn.to_v(hidden_states).unflatten(2, heads)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        valid = None
        if encoder_hidden_states is not None:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, heads)
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, heads)
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, heads)
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(p, dim=1) for p in ((query, text_q), (key, text_k), (value, text_v)))
            if attention_mask is not None:
                valid = F.pad(attention_mask.bool(), (hidden_states.shape[1], 0), value=True)
        out = self._attend(query, key, value, valid).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        n = hidden_states.shape[1]
        video, text = out[:, :n], out[:, n:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


class PadFreeJointProcessor:
    """Wraps a diffusers joint-attention processor called as (attn, video [B, N, D], text [B, L, D],
    mask, rotary) whose mask is a key mask [B, 1, 1, N + L] over video then text tokens with each
    sample's valid text tokens first (HunyuanVideo 13B's HunyuanVideoAttnProcessor2_0: valid
    = position < N + prompt length). Each sample runs through the wrapped processor with its
    padding text tokens cut off and no mask, so SDPA may pick the flash kernel; the padding text
    rows come back as zeros (diffusers' key mask lets them attend to the valid tokens; no valid
    token ever reads them, so the video output is the same). Returns what the wrapped processor
    returns: (video [B, N, D], text [B, L, D])."""

    def __init__(self, inner: Any):
        self.inner = inner

    # diffusers' set_attention_backend sets these on every processor: pass them to the wrapped one.
    @property
    def _attention_backend(self) -> Any:
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.inner._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.inner._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        if value is not None:
            raise NotImplementedError(f"{type(self).__name__}: context parallelism splits the sequence that this "
                                      "processor cuts per sample; it is not supported (leave parallel_config unset)")

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None or encoder_hidden_states is None or bool(attention_mask.all()):
            return self.inner(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)
        n, length = hidden_states.shape[1], encoder_hidden_states.shape[1]
        counts = attention_mask.reshape(attention_mask.shape[0], -1)[:, n:].sum(1).tolist()
        videos, texts = [], []
        for i, count in enumerate(counts):
            if count == 0:  # an empty text slice breaks the wrapped processor's [:-L] splits: keep the key mask
                video, text = self.inner(attn, hidden_states[i:i + 1], encoder_hidden_states[i:i + 1],
                                         attention_mask[i:i + 1], image_rotary_emb)
            else:
                video, text = self.inner(attn, hidden_states[i:i + 1], encoder_hidden_states[i:i + 1, :count], None,
                                         image_rotary_emb)
                text = F.pad(text, (0, 0, 0, length - count))
            videos.append(video)
            texts.append(text)
        return torch.cat(videos), torch.cat(texts)
