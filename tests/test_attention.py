"""Attention over the valid tokens only (finetune/families/_attention.py): the same numbers as the
masked attention it replaces, without ever handing SDPA a mask; and the tools the family tests
use to check that on whole models (an SDPA spy, a detector of dense masks, and an emulation of
the cuDNN backward bug that fully masked rows trigger on H100/H200, pytorch/pytorch#196678)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.families._attention import PadFreeJointProcessor, SelfAttentionProcessor, attend_valid


# --- tools for the family tests ---
@contextlib.contextmanager
def sdpa_masks() -> Iterator[list]:
    """Records the ``attn_mask`` of every ``F.scaled_dot_product_attention`` call (None or the
    mask), the way diffusers' native backend and the memory planner's trace reach it."""
    real, seen = F.scaled_dot_product_attention, []

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append(attn_mask)
        return real(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = real


class _PoisonRows(torch.autograd.Function):
    """Identity forward; backward writes NaN into the gradient rows of ``rows`` [B, 1|H, L]."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return query.view_as(query)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.masked_fill(rows[..., None], float("nan")), None


@contextlib.contextmanager
def cudnn_fully_masked_row_bug() -> Iterator[None]:
    """SDPA as cuDNN's backward behaves on H100/H200 (pytorch/pytorch#196678): with a mask, a
    query row whose logsumexp is -inf (every key masked out) gets NaN in grad_q. The real bug also
    needs the sequence length to be 64 mod 128; the emulation poisons every such row."""
    real = F.scaled_dot_product_attention

    def buggy(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and query.requires_grad:
            allowed = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
            rows = ~allowed.any(dim=-1)
            if rows.any():
                query = _PoisonRows.apply(query, rows)
        return real(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = buggy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class _LargestBool(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                self.numel = max(self.numel, t.numel())
        return out


def largest_bool_tensor(fn) -> int:
    """Elements of the largest bool tensor any op makes while ``fn()`` runs: a per-token mask has
    B x S, a dense attention mask B x S x S."""
    with _LargestBool() as mode:
        fn()
    return mode.numel


# --- attend_valid ---
LAYOUTS = {
    "right padding": [[1] * 5 + [0] * 3, [1] * 8],
    "scattered": [[1, 0, 1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1, 0]],
    "nothing valid in one sample": [[1] * 6 + [0] * 2, [0] * 8],
    "all valid": [[1] * 8, [1] * 8],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attend_valid_is_masked_attention_without_a_mask(layout):
    """fp32, against SDPA with the dense mask valid_i & valid_j (PyTorch's CPU kernels give a fully
    masked row zeros): the same output on every row, the same gradients, and SDPA never sees a
    mask."""
    valid = torch.tensor(LAYOUTS[layout], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    with sdpa_masks() as masks:
        ours = attend_valid(q, k, v, valid)
    assert masks and all(m is None for m in masks)
    dense = (valid[:, None, :, None] & valid[:, None, None, :])
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert not ours[~valid].any()
    weight = torch.randn(ours.shape, generator=gen)
    grads = torch.autograd.grad((ours * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


def test_self_attention_processor_is_diffusers_masked_self_attention():
    """The token refiners' attention: an ``Attention`` whose [B, 1, L, L] mask is the outer product
    of the padding mask, run by diffusers' AttnProcessor2_0 and by ours: the same output (every
    row on a CPU, padding rows included), in fp32 and in bf16, and finite bf16 gradients under
    the emulated cuDNN bug, which turns diffusers' gradients NaN."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, bias=True)
    x = torch.randn(2, 8, 32)
    valid = torch.tensor([[1] * 3 + [0] * 5, [1] * 8], dtype=torch.bool)
    mask = valid[:, None, None, :] & valid[:, None, :, None]

    def both(dtype):
        out = []
        for proc in (AttnProcessor2_0(), SelfAttentionProcessor()):
            attn.to(dtype).set_processor(proc)
            out.append(attn(x.to(dtype), attention_mask=mask))
        return out

    torch.testing.assert_close(*both(torch.float32), atol=1e-6, rtol=0)
    torch.testing.assert_close(*both(torch.bfloat16), atol=1e-2, rtol=1e-2)

    def bf16_grad(proc):
        attn.to(torch.bfloat16).set_processor(proc)
        attn.zero_grad()
        with cudnn_fully_masked_row_bug():
            (attn(x.bfloat16(), attention_mask=mask)[valid].float() ** 2).sum().backward()
        return attn.to_q.weight.grad

    assert bf16_grad(SelfAttentionProcessor()).isfinite().all()
    assert not bf16_grad(AttnProcessor2_0()).isfinite().all()  # the emulation bites the masked form


def test_self_attention_processor_refuses_what_it_does_not_compute():
    attn = Attention(query_dim=32, heads=4, dim_head=8, residual_connection=True)
    attn.set_processor(SelfAttentionProcessor())
    with pytest.raises(ValueError, match="plain self-attention only.*AttnProcessor2_0"):
        attn(torch.randn(1, 4, 32))


@pytest.mark.parametrize("kind", ["dual-stream", "single-stream"])
def test_pad_free_joint_processor_is_the_wrapped_processor_with_its_key_mask(kind):
    """HunyuanVideo 13B's joint attention (text with its own projections, or text through the
    video ones) with diffusers' [B, 1, 1, N + L] key mask, and wrapped: the same video output and
    valid text rows for a padded prompt, a full one, and one with no valid token (kept masked);
    padding rows come back as zeros; SDPA gets a mask only for the empty prompt."""
    torch.manual_seed(0)
    extra = dict(added_kv_proj_dim=32, context_pre_only=False) if kind == "dual-stream" else dict(pre_only=True)
    attn = Attention(query_dim=32, cross_attention_dim=None, dim_head=8, heads=4, out_dim=32, bias=True,
                     processor=HunyuanVideoAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6, **extra)
    video, text = torch.randn(3, 6, 32), torch.randn(3, 5, 32)
    lengths = torch.tensor([2, 5, 0])
    valid_text = torch.arange(5)[None] < lengths[:, None]
    mask = torch.cat([torch.ones(3, 6, dtype=torch.bool), valid_text], dim=1)[:, None, None, :]
    ref_video, ref_text = attn(video, text, attention_mask=mask)
    attn.set_processor(PadFreeJointProcessor(attn.processor))
    with sdpa_masks() as masks:
        out_video, out_text = attn(video, text, attention_mask=mask)
    assert [m is None for m in masks] == [True, True, False]
    torch.testing.assert_close(out_video, ref_video, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_text[valid_text], ref_text[valid_text], atol=1e-6, rtol=0)
    assert not out_text[:2][~valid_text[:2]].any()
    torch.testing.assert_close(out_text[2], ref_text[2], atol=1e-6, rtol=0)
