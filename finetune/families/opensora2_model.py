"""Open-Sora 2.0's transformer (hpcaitech/Open-Sora, Apache-2.0) as a diffusers model, and its
official checkpoint layout.

Written from the official code (``opensora/models/mmdit/model.py``, ``layers.py``, ``math.py``)
and the released configuration (``configs/diffusion/inference/256px.py``: ``model``). The official
model is Flux's MMDiT adapted to video, so the blocks here are diffusers' Flux building blocks
(``AdaLayerNormZero``, ``FluxAttention``, ``FeedForward``, ``AdaLayerNormZeroSingle``,
``CombinedTimestepTextProjEmbeddings``, ``AdaLayerNormContinuous``) and LoRA targets read as in
every Flux-style family. Nothing here downloads anything unless :meth:`from_official` is given a
hub id.

Architecture (latents [B, C, F, H, W], C = in_channels / patch_size^2; the 11B release: C = 16,
hidden 3072, 24 heads of 128, 19 double-stream and 38 single-stream blocks, text T5-XXL 4096 and
CLIP-L pooled 768):

- pack: 2x2 spatial patches -> image tokens [B, F*H/2*W/2, C*4], channels ordered (c, ph, pw),
  frame-major token order; ``x_embedder`` (official ``img_in``) to width D.
- image condition (``cond_embed``, the release has it): [B, 1 + C, F, H, W] (a mask channel, then
  the masked conditioning latents; all zero for text-to-video), packed the same way, through
  ``cond_embedder`` (``cond_in``) and added to the image tokens.
- vec = MLP(sinusoid(1000 t)) + MLP(CLIP pooled), t in [0, 1] rounded to the weight dtype first.
- text: T5 states through ``context_embedder`` (``txt_in``); all 512 tokens, padding included,
  with no attention mask (the official T5 and transformer use none), so no mask anywhere.
- 3D RoPE on (t, h, w) positions, theta 1e4, axes (16, 56, 56); text positions are (0, 0, 0).
  ``use_liger_rope`` (the release) rotates dimension pairs (d, d + head_dim/2), Liger/Llama
  style; without it, adjacent pairs (2d, 2d+1) as in Flux.
- double blocks: text and image streams, each its own AdaLN-Zero modulation, q/k/v (RMS q/k
  norm) and GELU-tanh MLP, one joint attention over [text, image].
- single blocks: one stream [text, image], AdaLN-Zero, q/k/v and MLP input in parallel, one
  output projection over [attention, MLP].
- output: AdaLN (shift, scale from vec) then a Linear to C*4, unpacked to [B, C, F, H, W].

The model predicts the flow velocity ``(1 - sigma_min) * noise - x0`` (official training,
``scripts/diffusion/train.py``); the sampler steps ``x <- x + (t_next - t) * v``.

Differences from the official module (none changes the maths):
- q, k, v and the single blocks' ``v_mlp`` (v and the MLP input, fused) are separate Linears
  (``to_v`` and ``proj_mlp``), so LoRA targets them as in diffusers' Flux; the key map below splits
  and re-fuses them exactly. ``fused_qkv=True`` (not the release) is refused.
- attention goes through ``diffusers.models.attention_dispatch.dispatch_attention_fn`` (SDPA by
  default; ``set_attention_backend`` picks flash etc.), the official code calls flash-attn.
- the QK RMS norm is torch's ``RMSNorm`` (multiplies by its weight before the cast back to bf16,
  the official Liger kernel after): the same in float32, last-bit differences in bf16.
- ``guidance_embed=True`` (the Flux-dev image model of the official t2i2v pipeline, not this
  release) is refused.
- the timestep sinusoid and the rotary rotation run in float32 as the official ones, but in
  float64 for a float64 model (the tests compare it with a float64 reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.utils import apply_lora_scale
from torch import nn

from finetune.lora_formats import KeyMap, Rule, fused, swapped_halves

# The released model's configuration (configs/diffusion/inference/256px.py, ``model``); the
# checkpoint file has no config of its own.
OPEN_SORA_V2_CONFIG: dict[str, Any] = dict(
    in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
    depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True, guidance_embed=False, cond_embed=True,
    fused_qkv=False, use_liger_rope=True, patch_size=2,
)


# --------------------------------------------------------------------------------------------
# rotary embedding and attention
# --------------------------------------------------------------------------------------------
class OpenSora2RotaryEmbed(nn.Module):
    """Per-token rotary (cos, sin) [S, head_dim/2] from positions [S, len(axes_dim)]; each axis i
    takes ``axes_dim[i]`` of the head dims, frequencies ``theta ** (-2j / axes_dim[i])``, computed
    as the official code does (float32 for the Liger layout, float64 for Flux's), in float64 for a
    float64 model. :func:`rotate` applies them."""

    def __init__(self, theta: float, axes_dim: list[int], rotate_half: bool):
        super().__init__()
        self.theta, self.axes_dim, self.rotate_half = theta, list(axes_dim), rotate_half

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        wide = dtype == torch.float64
        freq_dtype = torch.float64 if wide or not self.rotate_half else torch.float32
        if ids.device.type == "mps":
            freq_dtype = torch.float32
        angles = []
        for i, dim in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim)
            angles.append(ids[:, i].to(freq_dtype)[:, None] * omega[None])
        a = torch.cat(angles, dim=-1)
        out = torch.float64 if wide else torch.float32
        return a.cos().to(out), a.sin().to(out)


class TimestepSinusoid(nn.Module):
    """t [B] (already x1000) -> [B, dim]: cosines then sines of ``t * 10000 ** (-j / (dim/2))``,
    computed in float32 as the official ``timestep_embedding`` (diffusers' ``Timesteps`` with
    flip_sin_to_cos, the same numbers), in float64 for a float64 ``t``."""

    def __init__(self, dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.dim, self.max_period = dim, max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(t.dtype, torch.float32)
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], rotate_half: bool) -> torch.Tensor:
    """x [B, S, H, D] rotated by (cos, sin) [S, D/2] in float32 (or wider), back in x's dtype:
    dims (d, d + D/2) pair up for ``rotate_half`` (the release, Liger's kernel), else (2d, 2d+1)."""
    cos, sin = (t[None, :, None, :] for t in rotary)
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    if rotate_half:
        a, b = xf.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


class OpenSora2AttnProcessor:
    """Joint attention of a ``FluxAttention`` with the model's rotary layout: as diffusers'
    ``FluxAttnProcessor`` (q/k/v, RMS q/k norm, [text, image] order, ``dispatch_attention_fn``),
    with the rotation pairing of :class:`OpenSora2RotaryEmbed`. No attention mask: the official
    model attends every token (padded text included); a mask passed here raises ValueError."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, rotate_half: bool = True):
        self.rotate_half = rotate_half

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        """hidden_states [B, N, D] (single blocks: the joint [text, image] sequence);
        encoder_hidden_states [B, L, D] (double blocks) or None; image_rotary_emb (cos, sin)
        [L + N, head_dim/2] (:class:`OpenSora2RotaryEmbed`). Returns [B, N, D] (single) or
        (image [B, N, D], text [B, L, D])."""
        if attention_mask is not None:
            raise ValueError("opensora2: the official model attends every token; no attention mask is taken")
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q, k = rotate(q, image_rotary_emb, self.rotate_half), rotate(k, image_rotary_emb, self.rotate_half)
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        return attn.to_out[0](image.contiguous()), attn.to_add_out(text.contiguous())


# --------------------------------------------------------------------------------------------
# blocks: diffusers' Flux blocks with the release's biases, MLP width and rotary layout
# --------------------------------------------------------------------------------------------
class OpenSora2DoubleBlock(FluxTransformerBlock):
    """Official ``DoubleStreamBlock``: diffusers' ``FluxTransformerBlock`` (same equations) with
    q/k/v biases as ``qkv_bias``, an MLP of ``mlp_ratio`` and :class:`OpenSora2AttnProcessor`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, rotate_half: bool):
        super().__init__(dim, num_heads, dim // num_heads)
        self.attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim, dim_head=dim // num_heads, heads=num_heads,
                                  out_dim=dim, context_pre_only=False, bias=qkv_bias, added_proj_bias=qkv_bias,
                                  processor=OpenSora2AttnProcessor(rotate_half), eps=1e-6)
        if mlp_ratio != 4.0:
            self.ff = FeedForward(dim=dim, dim_out=dim, mult=mlp_ratio, activation_fn="gelu-approximate")
            self.ff_context = FeedForward(dim=dim, dim_out=dim, mult=mlp_ratio, activation_fn="gelu-approximate")


class OpenSora2SingleBlock(FluxSingleTransformerBlock):
    """Official ``SingleStreamBlock``: diffusers' ``FluxSingleTransformerBlock`` (same equations)
    with :class:`OpenSora2AttnProcessor`; q, k and v always have biases, as the official Linears."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rotate_half: bool):
        super().__init__(dim, num_heads, dim // num_heads, mlp_ratio=mlp_ratio)
        self.attn.set_processor(OpenSora2AttnProcessor(rotate_half))


# --------------------------------------------------------------------------------------------
# packing and conditioning helpers
# --------------------------------------------------------------------------------------------
def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [B, F * H/p * W/p, C * p * p], channels ordered (c, ph, pw) and
    tokens frame-major, as the official ``pack``."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * (h // patch) * (w // patch), c * patch * patch)


def unpack(x: torch.Tensor, grid: tuple[int, int, int], patch: int) -> torch.Tensor:
    """The inverse of :func:`pack`: [B, F*h*w, C*p*p] with grid (F, h, w) -> [B, C, F, h*p, w*p]."""
    f, h, w = grid
    b = x.shape[0]
    x = x.reshape(b, f, h, w, -1, patch, patch)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, -1, f, h * patch, w * patch)


def first_frame_condition(cond_latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The official i2v ("i2v_head") condition: cond_latents [B, C, k, h, w] (the first k latent
    frames, encoded on their own) -> [B, 1 + C, num_frames, h, w]: a mask channel that is 1 on
    those frames, then the latents there and zeros elsewhere."""
    b, c, k, h, w = cond_latents.shape
    out = cond_latents.new_zeros(b, 1 + c, num_frames, h, w)
    out[:, 0, :k] = 1
    out[:, 1:, :k] = cond_latents
    return out


def position_ids(grid: tuple[int, int, int], text_len: int, device: torch.device) -> torch.Tensor:
    """[text_len + F*h*w, 3] positions: (0, 0, 0) for text, (frame, row, column) per image token."""
    f, h, w = grid
    mesh = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in (f, h, w)), indexing="ij")
    image = torch.stack(mesh, dim=-1).reshape(-1, 3)
    return torch.cat([image.new_zeros(text_len, 3), image])


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class OpenSora2Transformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    """Open-Sora 2.0's MMDiT. Config fields are the official ``MMDiTConfig``'s (the release:
    :data:`OPEN_SORA_V2_CONFIG`), plus ``out_channels``, the latent channels of the prediction
    (``in_channels / patch_size**2``, derived).

    Args:
        in_channels: packed input channels (latent channels x patch_size^2; 64 for the Hunyuan VAE).
        vec_in_dim: CLIP pooled width (768). context_in_dim: T5 width (4096).
        hidden_size, num_heads: token width and heads (3072, 24). mlp_ratio: MLP width factor (4).
        depth, depth_single_blocks: double- and single-stream blocks (19, 38).
        axes_dim: rotary dims per (t, h, w) axis, summing to the head dim ([16, 56, 56]). theta: 1e4.
        qkv_bias: biases on the double blocks' q/k/v. cond_embed: the image-condition input.
        use_liger_rope: rotary pairing (module docstring). patch_size: spatial patch (2).
        guidance_embed, fused_qkv: must be False (module docstring).

    Raises ValueError for a config the official model would reject or this port does not take."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["OpenSora2DoubleBlock", "OpenSora2SingleBlock"]
    _repeated_blocks = ["OpenSora2DoubleBlock", "OpenSora2SingleBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "cond_embedder", "context_embedder", "time_text_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 64,
        vec_in_dim: int = 768,
        context_in_dim: int = 4096,
        hidden_size: int = 3072,
        mlp_ratio: float = 4.0,
        num_heads: int = 24,
        depth: int = 19,
        depth_single_blocks: int = 38,
        axes_dim: tuple[int, ...] = (16, 56, 56),
        theta: int = 10_000,
        qkv_bias: bool = True,
        guidance_embed: bool = False,
        cond_embed: bool = True,
        fused_qkv: bool = False,
        use_liger_rope: bool = True,
        patch_size: int = 2,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if hidden_size % num_heads:
            problems.append(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        elif sum(axes_dim) != hidden_size // num_heads or any(d % 2 for d in axes_dim):
            problems.append(f"axes_dim {list(axes_dim)} must be even and sum to the head dim "
                            f"{hidden_size // num_heads}")
        if in_channels % (patch_size * patch_size):
            problems.append(f"in_channels {in_channels} is not latent channels x patch_size^2 ({patch_size}^2)")
        latent = in_channels // (patch_size * patch_size)
        if out_channels not in (None, latent):
            problems.append(f"out_channels {out_channels} must be in_channels / patch_size^2 = {latent}")
        if guidance_embed:
            problems.append("guidance_embed=True is a guidance-distilled Flux image model, not Open-Sora 2.0")
        if fused_qkv:
            problems.append("fused_qkv=True is not the released layout (its q/k/v are separate); convert it first")
        if problems:
            raise ValueError(f"opensora2: {'; '.join(problems)}")
        self.register_to_config(out_channels=latent)

        self.pos_embed = OpenSora2RotaryEmbed(theta, list(axes_dim), rotate_half=use_liger_rope)
        self.x_embedder = nn.Linear(in_channels, hidden_size)
        self.cond_embedder = nn.Linear(in_channels + patch_size * patch_size, hidden_size) if cond_embed else None
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(hidden_size, vec_in_dim)
        self.time_text_embed.time_proj = TimestepSinusoid(256)  # diffusers' Timesteps stays float32 in float64
        self.context_embedder = nn.Linear(context_in_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList([
            OpenSora2DoubleBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, use_liger_rope) for _ in range(depth)
        ])
        self.single_transformer_blocks = nn.ModuleList([
            OpenSora2SingleBlock(hidden_size, num_heads, mlp_ratio, use_liger_rope) for _ in range(depth_single_blocks)
        ])
        self.norm_out = AdaLayerNormContinuous(hidden_size, hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(hidden_size, in_channels)
        self.gradient_checkpointing = False

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        condition: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow velocity of a latent video.

        Args:
            hidden_states: [B, C, F, H, W] noisy latents, H and W multiples of the patch.
            timestep: [B] (or a scalar) noise level t in [0, 1].
            encoder_hidden_states: T5 states [B, L, context_in_dim] (all tokens, no mask).
            pooled_projections: CLIP pooled output [B, vec_in_dim].
            condition: [B, 1 + C, F, H, W] mask and masked conditioning latents
                (:func:`first_frame_condition`), or None for none (text-to-video: zeros).
            attention_kwargs: a ``"scale"`` entry scales the LoRA, as in diffusers pipelines.

        Returns:
            sample [B, C, F, H, W] in the weight dtype.

        Raises:
            ValueError: a size the patch does not divide, a condition of the wrong shape, or a
            condition for a model without ``cond_embed``.
        """
        b, c, frames, height, width = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"opensora2: latent size {height}x{width} is not divisible by the patch {p}x{p}")
        grid = (frames, height // p, width // p)
        dtype = self.x_embedder.weight.dtype
        x = self.x_embedder(pack(hidden_states.to(dtype), p))
        if self.cond_embedder is not None:
            if condition is None:  # text-to-video: an all-zero condition, as the official sampler passes
                condition = hidden_states.new_zeros(b, 1 + c, frames, height, width)
            elif tuple(condition.shape) != (b, 1 + c, frames, height, width):
                raise ValueError(f"opensora2: condition has shape {list(condition.shape)}; expected "
                                 f"{[b, 1 + c, frames, height, width]} (mask channel, then the latents)")
            x = x + self.cond_embedder(pack(condition.to(dtype), p))
        elif condition is not None:
            raise ValueError("opensora2: this transformer has no cond_embed, so it takes no image condition")

        # The official model gets t in the weight dtype and scales it there.
        t = timestep.reshape(-1).expand(b).to(dtype) * 1000
        temb = self.time_text_embed(t, pooled_projections.to(dtype))
        text = self.context_embedder(encoder_hidden_states.to(dtype))
        rotary = self.pos_embed(position_ids(grid, text.shape[1], x.device), dtype)

        # Both kinds of block take (image, text, vec, rotary) and return (text, image).
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                text, x = self._gradient_checkpointing_func(block, x, text, temb, rotary)
            else:
                text, x = block(x, text, temb, rotary)

        out = unpack(self.proj_out(self.norm_out(x, temb)), grid, p)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    # --- official checkpoint layout ---
    @classmethod
    def from_official(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32, fp8: bool = False,
                      config: Mapping[str, Any] | None = None) -> OpenSora2Transformer3DModel:
        """The model from an official-layout safetensors file (``Open_Sora_v2.safetensors``: one
        file, official key names, no config), read tensor by tensor: built on the meta device from
        ``config`` (default: :func:`official_config` of the file), each official tensor renamed (split where
        we keep separate Linears), cast to ``torch_dtype`` and, for ``fp8``, the block Linears
        quantised to fp8 as they arrive (finetune/weights/fp8.py), so host memory never holds the
        whole checkpoint in full precision. Frozen, in eval mode.

        Raises ValueError for keys or shapes that do not fit (the high-compression Video DC-AE
        checkpoint, say), naming the first few; Fp8Unsupported for fp8 without block Linears."""
        from accelerate import init_empty_weights
        from safetensors import safe_open

        from finetune.weights.fp8 import fill, fp8_layer_names

        with init_empty_weights(include_buffers=False):
            model = cls.from_config(dict(config or official_config(path)))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad: list[str] = []

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    for ours, tensor in official_to_diffusers(key, f.get_tensor(key), model.config.hidden_size):
                        if ours in expected and tuple(tensor.shape) != expected[ours]:
                            bad.append(f"{key} {list(tensor.shape)} (model {list(expected[ours])})")
                            continue
                        yield ours, tensor

        targets = set(fp8_layer_names(model)) if fp8 else set()
        try:
            fill(model, tensors(), torch_dtype, targets, what=str(path))
        except ValueError:
            if not bad:
                raise
        if bad:  # the skipped tensors are also missing: name the cause, not the symptom
            raise ValueError(f"opensora2: {len(bad)} tensors of {path} do not fit the config (the release's unless "
                             f"given): {', '.join(bad[:3])}")
        model.register_to_config(_name_or_path=str(path))
        return model.eval().requires_grad_(False)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official names (``v_mlp`` re-fused, the final
        modulation's halves swapped back). Raises KeyError for a weight with no official name."""
        return diffusers_to_official(self.state_dict(), self.config.hidden_size)


def official_config(path: str | Path) -> dict[str, Any]:
    """The config of an official-layout transformer file, from its tensor names and shapes (the
    official file has no config): widths, block counts, MLP ratio, biases and the condition input;
    what the weights do not tell (theta, the rotary layout, the axes split: 1/8, 7/16, 7/16 of
    the head dim) is the release's. A fused or guidance-embedding layout comes back as such, for
    the model to refuse by name. Raises ValueError for a file that is no Open-Sora/Flux MMDiT."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise ValueError(f"opensora2: {path} is not an Open-Sora 2.0 transformer (no img_in / txt_in weights)")

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})

    hidden, in_channels = shapes["img_in.weight"]
    norms = [k for k in shapes if k.endswith("norm.query_norm.scale")]
    head_dim = shapes[norms[0]][0] if norms else hidden // OPEN_SORA_V2_CONFIG["num_heads"]
    single_v = shapes.get("single_blocks.0.v_mlp.weight")
    mlp = shapes["double_blocks.0.img_mlp.0.weight"][0] if "double_blocks.0.img_mlp.0.weight" in shapes else (
        single_v[0] - hidden if single_v else 4 * hidden)
    cond = shapes.get("cond_in.weight")
    patch = math.isqrt(cond[1] - in_channels) if cond else OPEN_SORA_V2_CONFIG["patch_size"]
    t_axis = head_dim // 8
    return {**OPEN_SORA_V2_CONFIG, "in_channels": in_channels, "hidden_size": hidden, "num_heads": hidden // head_dim,
            "context_in_dim": shapes["txt_in.weight"][1], "vec_in_dim": shapes["vector_in.in_layer.weight"][1],
            "depth": count("double_blocks"), "depth_single_blocks": count("single_blocks"), "mlp_ratio": mlp / hidden,
            "axes_dim": [t_axis, (head_dim - t_axis) // 2, (head_dim - t_axis) // 2], "cond_embed": cond is not None,
            "patch_size": patch, "qkv_bias": "double_blocks.0.img_attn.q_proj.bias" in shapes,
            "guidance_embed": "guidance_in.in_layer.weight" in shapes,
            "fused_qkv": "double_blocks.0.img_attn.qkv.weight" in shapes or "single_blocks.0.linear1.weight" in shapes}


def save_official(model: OpenSora2Transformer3DModel, path: str | Path) -> Path:
    """Write ``model`` as an official-layout safetensors file (the layout of the release's
    ``Open_Sora_v2.safetensors``: official names, no config). Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.to_official_state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------
# key map: the one place that knows the official names
# --------------------------------------------------------------------------------------------
_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_OD, _OS = "double_blocks.{i}", "single_blocks.{i}"

# Every Linear: ours <-> official (opensora/models/mmdit: DoubleStreamBlock, SingleStreamBlock,
# MMDiTModel with fused_qkv=False, as released). The single blocks' ``v_mlp`` holds v and the MLP
# input stacked (widths 1 : mlp_ratio, 4 in the release); the final adaLN stores shift before
# scale, diffusers' AdaLayerNormContinuous scale before shift.
KEY_MAP = KeyMap((
    *((f"{_D}.attn.{ours}", f"{_OD}.{stream}_attn.{official}")
      for stream, names in (("img", ("to_q", "to_k", "to_v", "to_out.0")),
                            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")))
      for ours, official in zip(names, ("q_proj", "k_proj", "v_proj", "proj"))),
    (f"{_D}.norm1.linear", f"{_OD}.img_mod.lin"),
    (f"{_D}.norm1_context.linear", f"{_OD}.txt_mod.lin"),
    (f"{_D}.ff.net.0.proj", f"{_OD}.img_mlp.0"),
    (f"{_D}.ff.net.2", f"{_OD}.img_mlp.2"),
    (f"{_D}.ff_context.net.0.proj", f"{_OD}.txt_mlp.0"),
    (f"{_D}.ff_context.net.2", f"{_OD}.txt_mlp.2"),
    (f"{_S}.attn.to_q", f"{_OS}.q_proj"),
    (f"{_S}.attn.to_k", f"{_OS}.k_proj"),
    fused([f"{_S}.attn.to_v", f"{_S}.proj_mlp"], f"{_OS}.v_mlp", sizes=(1, 4)),
    (f"{_S}.proj_out", f"{_OS}.linear2"),
    (f"{_S}.norm.linear", f"{_OS}.modulation.lin"),
    ("x_embedder", "img_in"),
    ("cond_embedder", "cond_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    swapped_halves("norm_out.linear", "final_layer.adaLN_modulation.1"),
    ("proj_out", "final_layer.linear"),
))

# The QK RMS norms (no Linear, so not in KEY_MAP): ours ``<m>.weight`` <-> official ``<o>.scale``.
NORM_MAP = KeyMap((
    (f"{_D}.attn.norm_q", f"{_OD}.img_attn.norm.query_norm"),
    (f"{_D}.attn.norm_k", f"{_OD}.img_attn.norm.key_norm"),
    (f"{_D}.attn.norm_added_q", f"{_OD}.txt_attn.norm.query_norm"),
    (f"{_D}.attn.norm_added_k", f"{_OD}.txt_attn.norm.key_norm"),
    (f"{_S}.attn.norm_q", f"{_OS}.norm.query_norm"),
    (f"{_S}.attn.norm_k", f"{_OS}.norm.key_norm"),
))


def _part_rows(rule: Rule, rows: int, hidden: int) -> list[int]:
    """Output rows of each part of a fused official Linear: the single blocks' ``v_mlp`` is
    v (hidden rows) then the MLP input (the rest), whatever the MLP ratio."""
    return [hidden, rows - hidden] if rule.fused else [rows]


def official_to_diffusers(key: str, tensor: torch.Tensor, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """One official tensor -> our tensor(s): renamed, ``v_mlp`` split into ``attn.to_v`` and
    ``proj_mlp`` (each its own storage), the final adaLN's halves swapped. Unknown keys come back
    unchanged, so the loader names them as unexpected."""
    module, _, param = key.rpartition(".")
    if param == "scale" and (norm := NORM_MAP.to_diffusers(module)) is not None:
        return [(f"{norm}.weight", tensor)]
    found = KEY_MAP.match(module) if param in ("weight", "bias") else None
    if found is None:
        return [(key, tensor)]
    rule = found.rule
    if rule.fused:
        parts = tensor.split(_part_rows(rule, tensor.shape[0], hidden), dim=0)
        return [(f"{n}.{param}", t.clone()) for n, t in zip(found.names, parts)]
    if rule.reordered:  # two halves stored the other way round
        first, second = tensor.chunk(2, dim=0)
        tensor = torch.cat([second, first], dim=0)
    return [(f"{found.names[0]}.{param}", tensor)]


def diffusers_to_official(state: Mapping[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """Our state dict -> the official one (fused parts concatenated in official order).
    Raises KeyError naming keys with no official name or fused tensors missing a part."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if param == "weight" and (norm := NORM_MAP.to_original(module)) is not None:
            out[f"{norm}.scale"] = tensor
            continue
        official = KEY_MAP.to_original(module) if param in ("weight", "bias") else None
        if official is None:
            unknown.append(key)
            continue
        rule = KEY_MAP.match(official).rule
        if rule.fused:
            parts.setdefault(f"{official}.{param}", {})[module] = tensor
        elif rule.reordered:
            first, second = tensor.chunk(2, dim=0)
            out[f"{official}.{param}"] = torch.cat([second, first], dim=0)
        else:
            out[f"{official}.{param}"] = tensor
    if unknown:
        raise KeyError(f"opensora2: {len(unknown)} weights have no official name: {', '.join(unknown[:5])}")
    for key, given in parts.items():
        names = KEY_MAP.match(key.rpartition(".")[0]).names
        if set(given) != set(names):
            raise KeyError(f"opensora2: fused official tensor {key} lacks {sorted(set(names) - set(given))}")
        out[key] = torch.cat([given[n] for n in names], dim=0)
    return out
