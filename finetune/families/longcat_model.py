"""LongCat-Video's transformer (Meituan, MIT licence) as a diffusers model, and its official
checkpoint layout.

Written from the architecture of the official code (github.com/meituan-longcat/LongCat-Video,
``longcat_video/modules``); module names follow diffusers' Wan transformer so LoRA targets read
the same across families. Nothing here downloads anything unless ``from_pretrained`` /
:meth:`from_official` is given a hub repo id.

Loading: ``from_pretrained`` reads both our diffusers layout and the official one (the release's
``dit/`` folder, detected by its key names, loaded via :meth:`from_official`); the key map
(``_TOP_LEVEL_MAP`` / ``_BLOCK_MAP``) is the one place that knows official names, used both ways
(:func:`official_to_diffusers_state_dict`, :func:`diffusers_to_official_state_dict`) and for
LoRA files in the official format (:func:`peft_lora_to_official`, :func:`official_lora_to_peft`).

Architecture (one stream of video tokens; text enters only through cross-attention):

- patchify: Conv3d with kernel = stride = ``patch_size`` (1, 2, 2): [B, C, F, H, W] ->
  tokens [B, N, D], N = F * H/2 * W/2, frame-major.
- timestep: sinusoid (cos half first, max period 1e4) of t in [0, 1000], then
  Linear-SiLU-Linear to ``adaln_tembed_dim``; one embedding per latent frame, all in fp32.
- text: umT5 states [B, L, caption_channels] -> Linear-GELU(tanh)-Linear to D.
- ``depth`` blocks, each (AdaLN from the frame's timestep embedding, computed in fp32):
    x += gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)          (3D RoPE, RMS q/k norm)
    x += CrossAttn(LN_affine(x), text)                             (RMS q/k norm, no RoPE)
    x += gate2 * SwiGLU(LN(x) * (1 + scale2) + shift2)
  The six AdaLN vectors come from one Linear(SiLU(temb)); they differ per latent frame.
- output: LN(x) * (1 + scale) + shift, Linear to patch * out_channels, unpatchify, fp32.

Conditioning frames (I2V, video continuation): the first ``num_cond_latents`` latent frames are
clean and carry timestep 0 (the caller sets it, as the official pipeline does; see
:func:`frame_timesteps`). Their tokens attend only to each other, get no text cross-attention
(its output is exactly zero there), while the noisy frames' tokens attend to all tokens. So the
clean frames are encoded independently of the noisy ones, which is what makes the official
inference-time KV cache of the clean frames exact.

Prediction: the official pipeline negates the model output before ``FlowMatchEulerDiscrete
Scheduler.step`` (which expects noise - x0). So with x_t = (1 - s) * x0 + s * noise and
t = 1000 * s, the transformer predicts ``x0 - noise`` (the negative of diffusers' flow
velocity); the training target is ``latents - noise``.

Differences from the official model (all on purpose, none changes the dense maths):
- q/k/v of self-attention (fused ``qkv``) and k/v of cross-attention (fused ``kv_linear``)
  are separate Linears here, so LoRA can target them as in every diffusers model; the key map
  below splits and re-fuses them exactly. A LoRA on to_q/to_k/to_v is exactly the official
  LoRA format's "n_seperate" LoRA on ``qkv`` (one lora_down per part, stacked).
- attention goes through ``diffusers.models.attention_dispatch.dispatch_attention_fn`` (SDPA by
  default; ``set_attention_backend`` picks flash etc.); the config's ``enable_flashattn2/3``,
  ``enable_xformers`` flags are kept for config fidelity and ignored.
- block-sparse attention (``enable_bsa``, ``bsa_params``; the official code uses it only for
  the 720p refinement stage) is not implemented: attention is always dense, so a 720p
  refinement forward here is the dense model the sparse kernel approximates.
- the inference-only KV cache of clean frames and context parallel (``cp_split_hw``) are not
  implemented; the masked dense path here computes the same function.
- the fp32-computed layers (timestep MLP, AdaLN modulations, output projection) keep float32
  weights under a bf16 load (``_keep_in_fp32_modules``); the official model holds them in bf16
  and upcasts, which is the same numbers for the bf16 release.
- the official patch embedder pads H and W to a multiple of the patch; here such a size is an
  error (the studio's size rules never produce one).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

# LoRA targets (peft ``target_modules`` suffixes): self- and cross-attention q/k/v/out and the
# three SwiGLU projections, in every block. AdaLN modulation, embedders and the output layer
# stay frozen: they run in fp32 and hold few parameters.
LONGCAT_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj",
)

_NORM_EPS = 1e-6
_ROPE_BASE = 10000.0
_TIME_MAX_PERIOD = 10000.0


# --------------------------------------------------------------------------------------------
# small layers
# --------------------------------------------------------------------------------------------
class Fp32Linear(nn.Linear):
    """nn.Linear computed in float32 whatever the weight and input dtypes; output float32.

    The official model runs the timestep MLP, the AdaLN modulation and the output projection
    under fp32 autocast, so bf16 weights are upcast for these small, precision-critical layers.
    Being an nn.Linear subclass keeps hooks (offload, layerwise casting) and peft working."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class HeadRMSNorm(nn.Module):
    """RMS norm over the last (head) dim, normalised in fp32, cast back to the input dtype,
    then scaled by ``weight`` (in the official order, which matters in bf16)."""

    def __init__(self, dim: int, eps: float = _NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` applied in fp32 (weights upcast too); result in fp32."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = _TIME_MAX_PERIOD) -> torch.Tensor:
    """t: [M] (any scale; LongCat uses 0..1000) -> [M, dim] fp32, cosines first then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class LongCatTimestepEmbedder(nn.Module):
    """t [M] -> [M, adaln_tembed_dim] fp32: sinusoid, Linear, SiLU, Linear (all fp32)."""

    def __init__(self, frequency_embedding_size: int, embed_dim: int):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.linear_1 = Fp32Linear(frequency_embedding_size, embed_dim)
        self.linear_2 = Fp32Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_sinusoid(t, self.frequency_embedding_size))))


class LongCatTextEmbedder(nn.Module):
    """umT5 states [B, L, caption_channels] -> [B, L, D]: Linear, GELU (tanh), Linear."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(caption_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def swiglu_hidden_dim(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """Inner width of the SwiGLU: 2/3 of hidden_size * mlp_ratio, rounded up to a multiple of
    256 (11008 for the released 4096 x 4)."""
    inner = int(2 * int(hidden_size * mlp_ratio) / 3)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


class LongCatSwiGLU(nn.Module):
    """x [..., D] -> down(silu(gate(x)) * up(x)) [..., D]; no biases."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner_dim, bias=False)
        self.up_proj = nn.Linear(dim, inner_dim, bias=False)
        self.down_proj = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# 3D RoPE
# --------------------------------------------------------------------------------------------
def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(time, height, width) shares of ``head_dim``: height and width get 2*(head_dim//6)
    each, time the rest (44, 42, 42 for 128). Raises ValueError unless head_dim % 8 == 0."""
    if head_dim % 8:
        raise ValueError(f"longcat: attention head dim {head_dim} must be a multiple of 8 for its 3D RoPE")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d_angles(grid: tuple[int, int, int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Rotation angles [N, head_dim/2] (fp32) for a (frames, height, width) token grid in
    frame-major order; pair i of a head rotates by ``angles[n, i]``. Each axis uses base 1e4
    over its own share of the head dim, positions 0..n-1."""
    dims = rope_axis_dims(head_dim)
    per_axis = []
    for n, d in zip(grid, dims):
        inv_freq = 1.0 / (_ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        per_axis.append(torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv_freq[None])
    t, h, w = per_axis
    f, hh, ww = grid
    angles = torch.cat([
        t[:, None, None, :].expand(f, hh, ww, -1),
        h[None, :, None, :].expand(f, hh, ww, -1),
        w[None, None, :, :].expand(f, hh, ww, -1),
    ], dim=-1)
    return angles.reshape(f * hh * ww, head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, Dh]; cos, sin [N, Dh/2] -> x with adjacent pairs (2i, 2i+1) rotated, computed
    in fp32 and returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
class LongCatAttnProcessor:
    """Self-attention (with 3D RoPE and clean-frame isolation) or cross-attention (text) through
    ``dispatch_attention_fn``; tensors there are [B, S, heads, head_dim]."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return out.flatten(2, 3).type_as(q)

    def __call__(
        self,
        attn: LongCatAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_cond_tokens: int = 0,
    ) -> torch.Tensor:
        """hidden_states [B, N, D]; encoder_hidden_states [B, L, D] (cross) or None (self);
        attention_mask: bool [B, 1, 1, L] key mask for cross-attention or None; rotary_emb:
        (cos, sin) [N, head_dim/2] for self-attention; num_cond_tokens: leading clean tokens.
        Returns [B, N, D]."""
        heads = attn.heads
        if encoder_hidden_states is None:
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (heads, -1)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (heads, -1)))
            v = attn.to_v(hidden_states).unflatten(-1, (heads, -1))
            if rotary_emb is not None:
                q, k = apply_rope(q, *rotary_emb), apply_rope(k, *rotary_emb)
            if num_cond_tokens > 0:
                c = num_cond_tokens
                # Clean tokens see only clean tokens, so they never depend on the noisy frames.
                out = torch.cat([self._attend(q[:, :c], k[:, :c], v[:, :c], None),
                                 self._attend(q[:, c:], k, v, None)], dim=1)
            else:
                out = self._attend(q, k, v, None)
            return attn.to_out[0](out)

        # Cross-attention: clean tokens take no text (exact zeros, not even the output bias).
        c = num_cond_tokens
        x = hidden_states[:, c:] if c > 0 else hidden_states
        q = attn.norm_q(attn.to_q(x).unflatten(-1, (heads, -1)))
        k = attn.norm_k(attn.to_k(encoder_hidden_states).unflatten(-1, (heads, -1)))
        v = attn.to_v(encoder_hidden_states).unflatten(-1, (heads, -1))
        out = attn.to_out[0](self._attend(q, k, v, attention_mask))
        if c > 0:
            out = torch.cat([out.new_zeros(out.shape[0], c, out.shape[2]), out], dim=1)
        return out


class LongCatAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with per-head RMS norm on q and k; to_q/to_k/to_v/to_out.0 with
    biases, as in the official model (whose fused projections the key map splits)."""

    _default_processor_cls = LongCatAttnProcessor
    _available_processors = [LongCatAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, processor: LongCatAttnProcessor | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"longcat: hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = HeadRMSNorm(head_dim)
        self.norm_k = HeadRMSNorm(head_dim)
        self.set_processor(processor or self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, num_cond_tokens: int = 0,
                **kwargs: Any) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                              num_cond_tokens, **kwargs)


# --------------------------------------------------------------------------------------------
# block and model
# --------------------------------------------------------------------------------------------
class LongCatTransformerBlock(nn.Module):
    """One single-stream DiT block: AdaLN self-attention, cross-attention to text, AdaLN SwiGLU."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, adaln_tembed_dim: int):
        super().__init__()
        # shift, scale, gate for attention then shift, scale, gate for the FFN, per latent frame
        self.modulation = Fp32Linear(adaln_tembed_dim, 6 * hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size, eps=_NORM_EPS, elementwise_affine=False)
        self.attn1 = LongCatAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=_NORM_EPS, elementwise_affine=True)
        self.attn2 = LongCatAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=_NORM_EPS, elementwise_affine=False)
        self.ffn = LongCatSwiGLU(hidden_size, swiglu_hidden_dim(hidden_size, mlp_ratio))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_attention_mask: torch.Tensor | None,
        num_cond_tokens: int,
    ) -> torch.Tensor:
        """hidden_states [B, N, D] (model dtype), encoder_hidden_states [B, L, D], temb [B, F, Ct]
        fp32 (one row per latent frame; N = F * S) -> [B, N, D] in the input dtype."""
        dtype = hidden_states.dtype
        b, n, d = hidden_states.shape
        frames = temb.shape[1]
        mod = self.modulation(F.silu(temb)).unsqueeze(2)  # [B, F, 1, 6D] fp32
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)

        x = hidden_states.view(b, frames, -1, d)
        h = (_layer_norm_fp32(x, self.norm1) * (1 + scale1) + shift1).to(dtype).view(b, n, d)
        h = self.attn1(h, rotary_emb=rotary_emb, num_cond_tokens=num_cond_tokens)
        # Gated residuals add in fp32, then round once to the model dtype (as the official code).
        x = (x + gate1 * h.view(b, frames, -1, d)).to(dtype)

        x = x.view(b, n, d)
        x = x + self.attn2(_layer_norm_fp32(x, self.norm2).to(dtype), encoder_hidden_states=encoder_hidden_states,
                           attention_mask=encoder_attention_mask, num_cond_tokens=num_cond_tokens)

        x = x.view(b, frames, -1, d)
        h = (_layer_norm_fp32(x, self.norm3) * (1 + scale2) + shift2).to(dtype)
        x = (x + gate2 * self.ffn(h)).to(dtype)
        return x.view(b, n, d)


def frame_timesteps(timestep: torch.Tensor, num_frames: int, num_cond_latents: int = 0) -> torch.Tensor:
    """timestep [B] (0..1000) -> [B, num_frames] with the first ``num_cond_latents`` frames at 0,
    the way the official pipeline marks clean conditioning frames (I2V: 1, continuation: K).
    Raises ValueError if there are not more frames than conditioning frames."""
    if not 0 <= num_cond_latents < num_frames:
        raise ValueError(f"longcat: num_cond_latents={num_cond_latents} must be in [0, {num_frames}) "
                         f"for {num_frames} latent frames")
    out = timestep.reshape(-1, 1).expand(-1, num_frames).clone()
    out[:, :num_cond_latents] = 0
    return out


class LongCatVideoTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    """LongCat-Video's DiT. Config fields are those of the released ``dit/config.json``; the
    attention-backend, block-sparse and context-parallel fields are accepted and ignored (see
    the module docstring).

    Args:
        in_channels / out_channels: latent channels (16, the Wan 2.1 VAE).
        hidden_size: token width D (4096). depth: number of blocks (48).
        num_heads: attention heads (32; head dim must be a multiple of 8).
        caption_channels: text-encoder width (4096, umT5-XXL).
        mlp_ratio: SwiGLU width factor before the 2/3 rule (4 -> 11008).
        adaln_tembed_dim: timestep-embedding width feeding every AdaLN (512).
        frequency_embedding_size: sinusoid width of the timestep (256).
        patch_size: (t, h, w) patch; t must be 1.
        text_tokens_zero_pad: if True and a mask is given, padded text tokens are zeroed after
            the text embedder and all tokens are attended (the released config sets it); if
            False, padded tokens are masked out of cross-attention.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatTransformerBlock"]
    _repeated_blocks = ["LongCatTransformerBlock"]
    # fp32-computed layers and norms keep full-precision weights under layerwise fp8 casting.
    # Layers the official model computes in fp32 (weights upcast): kept in fp32 under a bf16
    # torch_dtype, which is exact for a bf16 checkpoint, and never quantised by bitsandbytes.
    _keep_in_fp32_modules = ["time_embedder", "modulation", "out_modulation", "proj_out"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "time_embedder", "text_embedder", "modulation", "norm",
                                        "proj_out"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        enable_flashattn3: bool = False,
        enable_flashattn2: bool = False,
        enable_xformers: bool = False,
        enable_bsa: bool = False,
        bsa_params: dict | None = None,
        cp_split_hw: list[int] | None = None,
        text_tokens_zero_pad: bool = False,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if patch_size[0] != 1:
            raise ValueError(f"longcat: patch_size={list(patch_size)} must not patch time (first entry 1)")
        rope_axis_dims(hidden_size // num_heads)  # fail early on a head dim the RoPE cannot split
        self.patch_embedding = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_embedder = LongCatTimestepEmbedder(frequency_embedding_size, adaln_tembed_dim)
        self.text_embedder = LongCatTextEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList([
            LongCatTransformerBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth)
        ])
        self.norm_out = nn.LayerNorm(hidden_size, eps=_NORM_EPS, elementwise_affine=False)
        self.out_modulation = Fp32Linear(adaln_tembed_dim, 2 * hidden_size)
        self.proj_out = Fp32Linear(hidden_size, math.prod(patch_size) * out_channels)
        self.gradient_checkpointing = False

    # --- forward pieces ---
    def _text_states(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, L, C] or official [B, 1, L, C], mask [B, L] or [B, 1, 1, L] or None) ->
        (embedded text [B, L, D], bool key mask [B, 1, 1, L] or None)."""
        if encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        text = self.text_embedder(encoder_hidden_states.to(dtype))
        if encoder_attention_mask is None:
            return text, None
        mask = encoder_attention_mask.reshape(text.shape[0], -1)
        if mask.shape[1] != text.shape[1]:
            raise ValueError(f"longcat: encoder_attention_mask covers {mask.shape[1]} tokens but the text has "
                             f"{text.shape[1]}")
        if self.config.text_tokens_zero_pad:
            # Padded tokens become zero vectors that are still attended (the released behaviour).
            return text * mask[:, :, None].to(text.dtype), None
        return text, mask.bool()[:, None, None, :]

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, pt*ph*pw*C] -> [B, C, F*pt, H*ph, W*pw]."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict ``x0 - noise`` for a (partly) noisy latent video.

        Args:
            hidden_states: [B, C_in, F, H, W] latents; H, W multiples of the patch size.
            timestep: [B] or [B, F], in 0..1000 (1000 * sigma). A [B] timestep applies to every
                frame; conditioning frames must carry 0 (see :func:`frame_timesteps`).
            encoder_hidden_states: umT5 states [B, L, caption_channels] (or [B, 1, L, C]).
            encoder_attention_mask: [B, L] (or [B, 1, 1, L]) 1 for real tokens, or None.
            num_cond_latents: leading latent frames that are clean conditioning (0 for T2V,
                1 for I2V, K for continuation); see the module docstring for what changes.
            return_dict: return a ``Transformer2DModelOutput`` rather than a 1-tuple.
            attention_kwargs: as in diffusers pipelines; a ``"scale"`` entry scales the LoRA.

        Returns:
            sample [B, C_out, F, H, W] in float32, the official output precision.

        Raises:
            ValueError: spatial size not divisible by the patch, bad timestep shape or
            num_cond_latents out of range.
        """
        b, _, frames, height, width = hidden_states.shape
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"longcat: latent size {height}x{width} is not divisible by the patch {ph}x{pw}")
        if not 0 <= num_cond_latents < frames:
            raise ValueError(f"longcat: num_cond_latents={num_cond_latents} must be in [0, {frames}) for "
                             f"{frames} latent frames")
        grid = (frames, height // ph, width // pw)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(-1, frames)
        if tuple(timestep.shape) != (b, frames):
            raise ValueError(f"longcat: timestep has shape {list(timestep.shape)}; expected [{b}] or [{b}, {frames}]")

        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(hidden_states.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        # The official model rounds timesteps to the weight dtype before embedding them.
        temb = self.time_embedder(timestep.to(dtype).flatten()).view(b, frames, -1)  # [B, F, Ct] fp32
        text, text_mask = self._text_states(encoder_hidden_states, encoder_attention_mask, dtype)
        head_dim = self.config.hidden_size // self.config.num_heads
        angles = rope_3d_angles(grid, head_dim, device=x.device)
        rotary_emb = (angles.cos(), angles.sin())
        num_cond_tokens = num_cond_latents * grid[1] * grid[2]

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, temb, rotary_emb, text_mask, num_cond_tokens)
            else:
                x = block(x, text, temb, rotary_emb, text_mask, num_cond_tokens)

        shift, scale = self.out_modulation(F.silu(temb)).unsqueeze(2).chunk(2, dim=-1)  # [B, F, 1, D]
        x = x.view(b, frames, -1, x.shape[-1])
        x = (_layer_norm_fp32(x, self.norm_out) * (1 + scale) + shift).to(dtype)
        out = self._unpatchify(self.proj_out(x.flatten(1, 2)), grid).float()
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    # --- official checkpoint layout ---
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LongCatVideoTransformer3DModel:
        """diffusers' ``from_pretrained``, which also reads the official layout (the released
        repo's ``dit/`` folder, whose keys are the official module names): that is detected from
        the checkpoint's key names and loaded through :meth:`from_official`. Only ``subfolder``,
        ``torch_dtype`` and ``revision`` apply to the official layout; anything else (a
        quantization_config, say) raises ValueError there: convert once with
        ``from_official(...).save_pretrained(dir)`` and load ``dir``."""
        subfolder, revision = kwargs.get("subfolder"), kwargs.get("revision")
        if not _is_official_layout(pretrained_model_name_or_path, subfolder, revision):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        extra = sorted(set(kwargs) - {"subfolder", "torch_dtype", "revision"})
        if extra:
            raise ValueError(f"longcat: {pretrained_model_name_or_path} is in the official layout, which loads "
                             f"without {', '.join(extra)}; convert it once with "
                             "LongCatVideoTransformer3DModel.from_official(...).save_pretrained(dir) and load dir")
        return cls.from_official(pretrained_model_name_or_path, subfolder=subfolder,
                                 torch_dtype=kwargs.get("torch_dtype"), revision=revision)

    @classmethod
    def from_official(
        cls,
        path_or_repo: str | Path,
        subfolder: str | None = "dit",
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> LongCatVideoTransformer3DModel:
        """Load the released transformer from the official layout: ``<root>/<subfolder>/``
        with ``config.json`` and safetensors (one file, or shards with a
        ``*.safetensors.index.json``), keys named as the official model's modules.

        ``path_or_repo`` is a local folder or a hub repo id (``meituan-longcat/LongCat-Video``;
        only ``<subfolder>/*`` is downloaded). Weights keep their stored dtype unless
        ``torch_dtype`` is given (the fp32-computed layers then stay float32, as with
        ``from_pretrained``). The model is built on the meta device, so no random init.

        Raises FileNotFoundError if the folder has no config or weights, KeyError if a key does
        not map (naming the first few), ValueError on a shape mismatch."""
        from accelerate import init_empty_weights

        folder = _resolve_official_folder(path_or_repo, subfolder, revision)
        config = cls.load_config(str(folder))
        with init_empty_weights():
            model = cls.from_config(config)
        state = {}
        for shard in _official_weight_files(folder):
            for key, tensor in official_to_diffusers_state_dict(_load_safetensors(shard)).items():
                # Cast shard by shard: never two full copies of a 13.6B model in memory.
                state[key] = tensor if torch_dtype is None else tensor.to(cls._load_dtype(key, torch_dtype))
        _check_shapes(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    @classmethod
    def _load_dtype(cls, key: str, torch_dtype: torch.dtype) -> torch.dtype:
        """torch_dtype, or float32 for the fp32-computed layers (as from_pretrained does)."""
        return torch.float32 if set(key.split(".")) & set(cls._keep_in_fp32_modules) else torch_dtype

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official names (fused qkv / kv_linear re-assembled)."""
        return diffusers_to_official_state_dict(self.state_dict())


# --------------------------------------------------------------------------------------------
# key map: the one place that knows the official names
# --------------------------------------------------------------------------------------------
# Official module -> our module(s); _BLOCK_MAP names are relative to "blocks.<i>.". Several
# targets mean the official Linear is fused: its weight and bias are our targets' stacked along
# the output dim, in this order. Parameters are ".weight" / ".bias" of these modules.
_TOP_LEVEL_MAP: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("patch_embedding",),
    "t_embedder.mlp.0": ("time_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_embedder.linear_2",),
    "y_embedder.y_proj.0": ("text_embedder.linear_1",),
    "y_embedder.y_proj.2": ("text_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("out_modulation",),
    "final_layer.linear": ("proj_out",),
}
_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("modulation",),
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.q_norm": ("attn1.norm_q",),
    "attn.k_norm": ("attn1.norm_k",),
    "attn.proj": ("attn1.to_out.0",),
    "pre_crs_attn_norm": ("norm2",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.q_norm": ("attn2.norm_q",),
    "cross_attn.k_norm": ("attn2.norm_k",),
    "cross_attn.proj": ("attn2.to_out.0",),
    "ffn.w1": ("ffn.gate_proj",),
    "ffn.w3": ("ffn.up_proj",),
    "ffn.w2": ("ffn.down_proj",),
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def official_module_targets(official_module: str) -> tuple[str, ...] | None:
    """Official module name (``blocks.3.attn.qkv``) -> our module names, in fused order
    (``blocks.3.attn1.to_q``, ``...to_k``, ``...to_v``), or None if it is not a known module."""
    m = _BLOCK_RE.match(official_module)
    if m:
        targets = _BLOCK_MAP.get(m.group(2))
        return None if targets is None else tuple(f"blocks.{m.group(1)}.{t}" for t in targets)
    return _TOP_LEVEL_MAP.get(official_module)


def official_module_for(module: str) -> tuple[str, int, int] | None:
    """Our module name -> (official module, part index, number of fused parts), e.g.
    ``blocks.3.attn1.to_k`` -> (``blocks.3.attn.qkv``, 1, 3); None for an unknown module.
    This is what a LoRA exporter needs to write official (ComfyUI/original) names."""
    m = _BLOCK_RE.match(module)
    table, prefix, rest = (_BLOCK_MAP, f"blocks.{m.group(1)}.", m.group(2)) if m else (_TOP_LEVEL_MAP, "", module)
    for official, targets in table.items():
        if rest in targets:
            return prefix + official, targets.index(rest), len(targets)
    return None


def _known_params(state: Mapping[str, torch.Tensor], lookup: Callable[[str], Any]
                  ) -> tuple[list[tuple[Any, str, torch.Tensor]], list[str]]:
    """Split ``state`` into (``lookup(module)``, "weight" or "bias", tensor) for each key whose module
    ``lookup`` knows (not None) and whose parameter is a weight or bias, and the other keys."""
    known, unknown = [], []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        found = lookup(module)
        if found is None or param not in ("weight", "bias"):
            unknown.append(key)
        else:
            known.append((found, param, tensor))
    return known, unknown


def official_to_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-layout tensors -> ours; fused tensors are split evenly along dim 0.
    Raises KeyError naming the first few official keys that map to nothing."""
    known, unknown = _known_params(state, official_module_targets)
    if unknown:
        raise KeyError(f"longcat: {len(unknown)} checkpoint keys are not LongCat-Video transformer weights: "
                       f"{', '.join(unknown[:5])}")
    out: dict[str, torch.Tensor] = {}
    for targets, param, tensor in known:
        parts = tensor.chunk(len(targets), dim=0)
        for target, part in zip(targets, parts):
            # Own storage per part, so each parameter can be saved, offloaded or freed on its own
            # (safetensors' save_file rejects tensors sharing storage).
            out[f"{target}.{param}"] = part.clone() if len(parts) > 1 else part
    return out


def diffusers_to_official_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> official layout, fused parts concatenated in official order.
    Raises KeyError for keys with no official name or a fused module with a part missing."""
    known, unknown = _known_params(state, official_module_for)
    if unknown:
        raise KeyError(f"longcat: {len(unknown)} keys have no official name: {', '.join(unknown[:5])}")
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for (official, index, count), param, tensor in known:
        parts.setdefault(f"{official}.{param}", {})[index] = tensor
        counts[f"{official}.{param}"] = count
    incomplete = [k for k, p in parts.items() if len(p) != counts[k]]
    if incomplete:
        raise KeyError(f"longcat: {len(incomplete)} fused official tensors lack a part: {', '.join(incomplete[:5])}")
    return {k: torch.cat([p[i] for i in range(counts[k])], dim=0) for k, p in parts.items()}


def _check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first few weights whose shape does not fit the config."""
    expected = model.state_dict()
    bad = [f"{k} {list(v.shape)} (model {list(expected[k].shape)})" for k, v in state.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"longcat: {len(bad)} checkpoint tensors do not fit config.json: {', '.join(bad[:3])}")


def _resolve_official_folder(path_or_repo: str | Path, subfolder: str | None, revision: str | None) -> Path:
    local = Path(path_or_repo)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        local = Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=[pattern]))
    folder = local / subfolder if subfolder else local
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"longcat: no config.json in {folder} (expected the official layout "
                                f"<root>/{subfolder or ''}/config.json + safetensors)")
    return folder


# A key only the official layout has (ours is "patch_embedding.weight").
_OFFICIAL_MARKER_KEY = "x_embedder.proj.weight"


def _is_official_layout(path_or_repo: str | Path, subfolder: str | None, revision: str | None) -> bool:
    """Whether the checkpoint names its weights the official way. Reads only the shard index or
    safetensors headers (a local folder), or the shard index (a hub repo; the release is
    sharded). False when there is nothing to read, so diffusers reports what is missing."""
    local = Path(path_or_repo)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            return False
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return _OFFICIAL_MARKER_KEY in json.loads(indexes[0].read_text())["weight_map"]
        from safetensors import safe_open

        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                if _OFFICIAL_MARKER_KEY in f.keys():
                    return True
        return False
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        index = hf_hub_download(str(path_or_repo), "diffusion_pytorch_model.safetensors.index.json",
                                subfolder=subfolder, revision=revision)
    except EntryNotFoundError:
        return False
    return _OFFICIAL_MARKER_KEY in json.loads(Path(index).read_text())["weight_map"]


def _official_weight_files(folder: Path) -> list[Path]:
    """Safetensors files of the checkpoint in ``folder``: the shards named by an index, else
    every ``*.safetensors``. Raises FileNotFoundError if there are none."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"longcat: no .safetensors weights in {folder}")
    return files


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_official(model: LongCatVideoTransformer3DModel, folder: str | Path,
                  max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` in the official layout (config.json + safetensors, sharded with an index
    when ``max_shard_bytes`` is given). Returns the folder. Used by tests and for exports."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config.update(_class_name="LongCatVideoTransformer3DModel", patch_size=list(model.config.patch_size))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.to_official_state_dict().items()}
    if max_shard_bytes is None:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    shards = _shard(state, max_shard_bytes)
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _shard(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


# --------------------------------------------------------------------------------------------
# LoRA in the official format (longcat_video/modules/lora_utils.py)
# --------------------------------------------------------------------------------------------
# Official LoRA files name a module "lora" + SEP + path with "." -> SEP, and hold
# "<name>.lora_down.weight" [n*r, in], "<name>.lora_up.weight" [out, r] (or, for a fused
# Linear split into n parts, "<name>.lora_up.blocks.{j}.weight" [out/n, r] paired with down rows
# j*r..(j+1)*r) and "<name>.alpha_scale" (scalar); the update is up(down(x)) * alpha_scale.
# A peft LoRA on our to_q/to_k/to_v is therefore exactly an n=3 LoRA on the official qkv.
OFFICIAL_LORA_SEP = "___lorahyphen___"
_PEFT_PREFIX = "transformer."


def official_lora_name(official_module: str) -> str:
    """``blocks.0.attn.qkv`` -> ``lora___lorahyphen___blocks___lorahyphen___0___...qkv``."""
    return "lora" + OFFICIAL_LORA_SEP + official_module.replace(".", OFFICIAL_LORA_SEP)


def peft_lora_to_official(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft adapter state dict (``<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r],
    optionally prefixed ``transformer.``) with LoRA scale ``scale`` (lora_alpha / r) -> the
    official LoRA format. Parts of a fused module the adapter does not cover get zero factors.
    Raises KeyError for a module with no official name, ValueError for unequal ranks in a fused
    module."""
    factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    count: dict[str, int] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        found = official_module_for(module.removeprefix(_PEFT_PREFIX))
        if found is None:
            raise KeyError(f"longcat: LoRA module {module!r} has no official name")
        official, part, parts = found
        factors.setdefault(official, {})[part] = (state[key], state[f"{module}.lora_B.weight"])
        count[official] = parts
    out: dict[str, torch.Tensor] = {}
    for official, given in factors.items():
        ranks = {a.shape[0] for a, _ in given.values()}
        if len(ranks) != 1:
            raise ValueError(f"longcat: LoRA parts of {official} have ranks {sorted(ranks)}; the official format "
                             "needs one rank per fused module")
        a0, b0 = next(iter(given.values()))
        downs, ups = [], []
        for j in range(count[official]):
            a, b = given.get(j, (torch.zeros_like(a0), torch.zeros_like(b0)))
            downs.append(a)
            ups.append(b)
        name = official_lora_name(official)
        out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0)
        if len(ups) == 1:
            out[f"{name}.lora_up.weight"] = ups[0]
        else:
            out.update({f"{name}.lora_up.blocks.{j}.weight": b for j, b in enumerate(ups)})
        out[f"{name}.alpha_scale"] = torch.tensor(float(scale))
    return out


def official_lora_to_peft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-format LoRA -> peft keys (``<module>.lora_A.weight`` / ``lora_B.weight``) with
    ``alpha_scale`` folded into lora_B, so load it with lora_alpha == r (scale 1).
    Raises KeyError for a LoRA on a module this model does not have."""
    out: dict[str, torch.Tensor] = {}
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        official = name.removeprefix("lora" + OFFICIAL_LORA_SEP).replace(OFFICIAL_LORA_SEP, ".")
        targets = official_module_targets(official)
        if targets is None:
            raise KeyError(f"longcat: official LoRA {name!r} targets {official!r}, not a transformer Linear")
        scale = state[f"{name}.alpha_scale"].float().item() if f"{name}.alpha_scale" in state else 1.0
        if len(targets) == 1:
            ups = [state[f"{name}.lora_up.weight"]]
        else:
            ups = [state[f"{name}.lora_up.blocks.{j}.weight"] for j in range(len(targets))]
        for target, a, b in zip(targets, down.chunk(len(targets), dim=0), ups):
            out[f"{target}.lora_A.weight"] = a
            out[f"{target}.lora_B.weight"] = b * scale
    return out
