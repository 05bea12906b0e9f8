"""Our Open-Sora 2.0 transformer against the official model code, number for number.

Builds the tiny ``OpenSora2Transformer3DModel`` of ``OpenSora2Family.build_tiny`` (2 double- and
2 single-stream blocks, 4 heads of 32, rotary axes 4/14/14, the release's layout otherwise) with
seeded random weights, writes them in the official layout (``save_official``: our key map), loads
that file strictly into the official ``MMDiTModel`` built with the same config, and runs both on
the same seeded inputs, text-to-video (all-zero condition) and image-to-video (first latent frame
given), as the official sampler calls its model (``opensora/utils/sampling.py``: ``prepare``,
``I2VDenoiser.denoise``). Baseline: the official model, in the same run.

    python bench/opensora2_official.py --official /tmp/opensora-official [--dtype float32 float64] [--blocks]

``--official`` is a checkout of github.com/hpcaitech/Open-Sora (``git clone``, or ``git archive
HEAD opensora | tar -x -C DIR`` from a mirror); its ``opensora/models/mmdit`` files are imported
from there, never copied, and need ``einops`` (``pip install einops``, or a ``pip install --target
DIR einops`` on PYTHONPATH). The official module imports packages made for its GPU training; these
are replaced by small stand-ins (:func:`import_official`), the maths ones written to the numbers
of the kernels they replace:

- ``flash_attn.flash_attn_func`` (q, k, v [B, L, H, D], no mask, scale 1/sqrt(D)): torch SDPA.
  The real kernel takes only bf16/fp16; float32 and float64 run here through SDPA alone.
- ``liger_kernel.ops.rope.LigerRopeFunction`` (liger-kernel 0.5.2, the official pin): q and k
  [B, H, L, D] cast to the dtype of cos/sin, rotated with the first halves of cos and sin
  [B, L, D] (batch row 0, as 0.5.2 reads them) pairing dims (d, d + D/2), stored back in q's dtype.
- ``liger_kernel.ops.rms_norm.LigerRMSNormFunction`` ("llama" casting): x to float32, times
  rsqrt(mean(x^2) + eps), back to x's dtype, times (offset + weight).
- ``colossalai.utils.get_current_device`` (activation offload only), ``mmengine.registry.Registry``
  (``register_module`` a no-op decorator), ``opensora.utils.ckpt`` (checkpoint loading, not used):
  never reached by the forward.

The official ``timestep_embedding`` is wrapped in ``torch.compile``; it runs eagerly here
(``torch.compiler.set_stance("force_eager")``), the same equations.

Prints the max absolute difference of the outputs, that divided by the largest official output
(relative), and the largest elementwise |ours - official| / |official| over outputs with
|official| > 1e-3 of the largest; with ``--blocks``, the same after every block (hooks). In
float64 three more rows take the official forward's float32 steps on our side too, one after the
other (:func:`attribution`), so what is left is the port's own difference; a control row runs the
official model with Flux's rotary pairing on the same weights, a different equation the comparison
must see.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.families.opensora2_model import (  # noqa: E402
    OpenSora2Transformer3DModel,
    first_frame_condition,
    save_official,
)

# The tiny transformer of OpenSora2Family.build_tiny.
TINY = dict(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128, num_heads=4, depth=2,
            depth_single_blocks=2, axes_dim=[4, 14, 14])
# MMDiTConfig fields (opensora/models/mmdit/model.py) that our config carries under the same names.
OFFICIAL_FIELDS = ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio", "num_heads", "depth",
                   "depth_single_blocks", "axes_dim", "theta", "qkv_bias", "guidance_embed", "cond_embed",
                   "fused_qkv", "use_liger_rope", "patch_size")


# --------------------------------------------------------------------------------------------
# stand-ins for the official module's GPU-only imports (the module docstring says what each is)
# --------------------------------------------------------------------------------------------
# The Liger kernels' float32 internals, kept (as the kernels run) or widened to the input dtype
# (only for the float64 attribution rows).
WIDE_KERNELS = {"on": False}


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, L, H, D] -> [B, L, H, D]: full softmax attention, scale 1/sqrt(D)."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class LigerRopeFunction:
    @staticmethod
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k [B, H, L, D]; cos, sin [B or 1, L, D] -> rotated (q, k) in their own dtypes."""
        half = q.shape[-1] // 2
        c, s = cos[0, None, :, :half], sin[0, None, :, :half]  # [1, 1, L, D/2]
        dtype = torch.promote_types(q.dtype, cos.dtype) if WIDE_KERNELS["on"] else cos.dtype

        def rot(x: torch.Tensor) -> torch.Tensor:
            a, b = x.to(dtype).split(half, dim=-1)
            return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)

        return rot(q), rot(k)


class LigerRMSNormFunction:
    @staticmethod
    def apply(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, casting_mode: str = "llama",
              in_place: bool = True) -> torch.Tensor:
        """x [..., D], weight [D] -> [..., D] in x's dtype ("llama" casting only)."""
        if casting_mode != "llama":
            raise NotImplementedError(f"stub LigerRMSNormFunction: casting_mode {casting_mode!r}; only 'llama' is "
                                      "written (the one opensora/models/mmdit/layers.py uses)")
        xf = x if WIDE_KERNELS["on"] else x.to(torch.float32)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * (offset + weight)


class Registry:
    def __init__(self, *args, **kwargs):
        pass

    def register_module(self, *args, **kwargs):
        return lambda f: f


def load_checkpoint(*args, **kwargs):
    raise NotImplementedError("stub opensora.utils.ckpt.load_checkpoint: this bench loads weights itself")


def _module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    if path is not None:  # a package whose submodules load from the checkout, without its __init__
        m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    return m


def import_official(root: Path) -> types.ModuleType:
    """``opensora.models.mmdit.model`` (with ``layers`` and ``math``) from the checkout at
    ``root``, its GPU-only imports replaced by the stand-ins above. Raises FileNotFoundError for
    a root without the MMDiT files."""
    mmdit = root / "opensora" / "models" / "mmdit"
    if not (mmdit / "model.py").is_file():
        raise FileNotFoundError(f"--official {root}: no opensora/models/mmdit/model.py there; give a checkout of "
                                "github.com/hpcaitech/Open-Sora (git archive HEAD | tar -x -C DIR)")
    stubs = {
        "flash_attn": _module("flash_attn", flash_attn_func=flash_attn_func),
        "liger_kernel": _module("liger_kernel", Path("/nonexistent")),
        "liger_kernel.ops": _module("liger_kernel.ops", Path("/nonexistent")),
        "liger_kernel.ops.rope": _module("liger_kernel.ops.rope", LigerRopeFunction=LigerRopeFunction),
        "liger_kernel.ops.rms_norm": _module("liger_kernel.ops.rms_norm", LigerRMSNormFunction=LigerRMSNormFunction),
        "colossalai": _module("colossalai", Path("/nonexistent")),
        "colossalai.utils": _module("colossalai.utils", get_current_device=lambda: torch.device("cpu")),
        "mmengine": _module("mmengine", Path("/nonexistent")),
        "mmengine.registry": _module("mmengine.registry", Registry=Registry),
        # the official packages themselves, bare, so their __init__ files (every model family) stay unread
        "opensora": _module("opensora", root / "opensora"),
        "opensora.models": _module("opensora.models", root / "opensora" / "models"),
        "opensora.models.mmdit": _module("opensora.models.mmdit", mmdit),
        "opensora.utils": _module("opensora.utils", root / "opensora" / "utils"),
        "opensora.utils.ckpt": _module("opensora.utils.ckpt", load_checkpoint=load_checkpoint),
    }
    for name in [n for n in sys.modules if n == "opensora" or n.startswith("opensora.")]:
        del sys.modules[name]
    sys.modules.update(stubs)
    return importlib.import_module("opensora.models.mmdit.model")


# --------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that make every term count: Linear weights N(0, 1/fan_in), biases
    N(0, 0.1^2), RMS-norm weights 1 + N(0, 0.1^2) (the zero-initialised condition input and
    modulations of a fresh model would hide their own bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.ndim == 2:
            p.copy_(noise / p.shape[1] ** 0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1 + 0.1 * noise)


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T*H/p*W/p, C*p*p], the official sampler's layout (sampling.pack)."""
    from einops import rearrange

    return rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=p, pw=p)


def unpack(x: torch.Tensor, grid: tuple[int, int, int], p: int) -> torch.Tensor:
    from einops import rearrange

    t, h, w = grid
    return rearrange(x, "b (t h w) (c ph pw) -> b c t (h ph) (w pw)", t=t, h=h, w=w, ph=p, pw=p)


def inputs(args, channels: int, cfg: dict, i2v: bool) -> dict[str, torch.Tensor]:
    """Seeded float64 inputs: latents [B, C, F, H, W], t [B], T5 states [B, L, ctx],
    CLIP pooled [B, vec]; the condition [B, 1 + C, F, H, W] for ours (``first_frame_condition``
    for i2v, all zero for t2v) and, built apart, for the official model: mask then masked latents,
    as ``prepare_inference_condition`` makes them ("i2v_head": the first frame; "t2v": zeros)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    b, f, h, w = args.batch, args.frames, args.height, args.width
    x = {
        "latents": torch.randn(b, channels, f, h, w, generator=g, dtype=torch.float64),
        "t": torch.rand(b, generator=g, dtype=torch.float64),
        "txt": torch.randn(b, args.text_len, cfg["context_in_dim"], generator=g, dtype=torch.float64),
        "y_vec": torch.randn(b, cfg["vec_in_dim"], generator=g, dtype=torch.float64),
    }
    first = torch.randn(b, channels, 1, h, w, generator=g, dtype=torch.float64)
    x["cond"] = first_frame_condition(first, f) if i2v else None
    masks = torch.zeros(b, 1, f, h, w, dtype=torch.float64)
    masked = torch.zeros(b, channels, f, h, w, dtype=torch.float64)
    if i2v:
        masks[:, :, 0], masked[:, :, 0] = 1, first[:, :, 0]
    x["official_cond"] = torch.cat([masks, masked], dim=1)
    return x


def official_call(model, x: dict[str, torch.Tensor], dtype: torch.dtype, p: int) -> torch.Tensor:
    """The official forward as ``I2VDenoiser.denoise`` calls it (ids as ``prepare`` makes them,
    every input in the model dtype), unpacked to [B, C, F, H, W]."""
    b, _, f, h, w = x["latents"].shape
    grid = (f, h // p, w // p)
    mesh = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    img_ids = torch.stack(mesh, dim=-1).reshape(1, -1, 3).expand(b, -1, -1)
    txt_ids = torch.zeros(b, x["txt"].shape[1], 3)
    out = model(img=pack(x["latents"], p).to(dtype), img_ids=img_ids.to(dtype), txt=x["txt"].to(dtype),
                txt_ids=txt_ids.to(dtype), timesteps=x["t"].to(dtype), y_vec=x["y_vec"].to(dtype),
                cond=pack(x["official_cond"], p).to(dtype), guidance=None)
    return unpack(out, grid, p)


def ours_call(model, x: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    cond = x["cond"]
    return model(hidden_states=x["latents"].to(dtype), timestep=x["t"].to(dtype),
                 encoder_hidden_states=x["txt"].to(dtype), pooled_projections=x["y_vec"].to(dtype),
                 condition=None if cond is None else cond.to(dtype)).sample


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def differences(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |ours - ref|, that / max |ref|, max elementwise |ours - ref| / |ref| where
    |ref| > 1e-3 max |ref|), in float64."""
    ours, ref = ours.double(), ref.double()
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    big = ref.abs() > 1e-3 * scale
    return diff.max().item(), diff.max().item() / scale, (diff[big] / ref.abs()[big]).max().item()


def block_outputs(ours, official) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
    """Forward hooks that keep each block's output as [B, L + N, D] ([text, image]) under one
    name per block, ours and official; returns (ours, official, handles)."""
    got_ours: dict[str, torch.Tensor] = {}
    got_official: dict[str, torch.Tensor] = {}

    def keep(store, name, order):
        def hook(module, args, out):
            store[name] = out if torch.is_tensor(out) else torch.cat([out[i] for i in order], dim=1)
        return hook

    handles = []
    for i, blk in enumerate(ours.transformer_blocks):  # returns (text, image)
        handles.append(blk.register_forward_hook(keep(got_ours, f"double {i}", (0, 1))))
    for i, blk in enumerate(official.double_blocks):  # returns (img, txt)
        handles.append(blk.register_forward_hook(keep(got_official, f"double {i}", (1, 0))))
    for i, blk in enumerate(ours.single_transformer_blocks):  # returns (text, image)
        handles.append(blk.register_forward_hook(keep(got_ours, f"single {i}", (0, 1))))
    for i, blk in enumerate(official.single_blocks):  # returns the joint [txt, img]
        handles.append(blk.register_forward_hook(keep(got_official, f"single {i}", ())))
    return got_ours, got_official, handles


def float32_frequencies(module, args, out):
    """Hook on our rotary embedding: (cos, sin) from frequencies rounded to float32 first, as the
    official ``liger_rope`` makes them (its angles and cos/sin are then in the ids' dtype)."""
    ids = args[0]
    angles = [ids[:, i, None].to(out[0].dtype) * (1.0 / module.theta ** (torch.arange(0, d, 2) / d)).to(out[0].dtype)
              for i, d in enumerate(module.axes_dim)]  # arange / d is float32, as official
    a = torch.cat(angles, dim=-1)
    return a.cos(), a.sin()


def attribution(ours, official, x, p: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """float64 only: the outputs again as, one after the other, each float32 step inside the
    official float64 forward is taken on our side too (or widened there): the 1000 t sinusoid
    (official ``timestep_embedding`` casts to float32), the Liger kernels' float32 internals, the
    float32 rotary frequencies. What is left after all three is the port's own difference."""
    rows = []
    hooks = [ours.time_text_embed.time_proj.register_forward_hook(
        lambda m, a, o: type(m).forward(m, a[0].float()).to(o.dtype))]  # forward(): no hook recursion
    try:
        with torch.no_grad():
            ref = official_call(official, x, torch.float64, p)
            rows.append(("+f32 t-emb", ours_call(ours, x, torch.float64), ref))
            WIDE_KERNELS["on"] = True
            ref = official_call(official, x, torch.float64, p)
            rows.append(("+f64 liger", ours_call(ours, x, torch.float64), ref))
            hooks.append(ours.pos_embed.register_forward_hook(float32_frequencies))
            rows.append(("+f32 freqs", ours_call(ours, x, torch.float64), ref))
    finally:
        WIDE_KERNELS["on"] = False
        for h in hooks:
            h.remove()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="checkout of github.com/hpcaitech/Open-Sora")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=8, help="latent rows (a multiple of the patch, 2)")
    p.add_argument("--width", type=int, default=6, help="latent columns (a multiple of the patch, 2)")
    p.add_argument("--text-len", type=int, default=16, help="T5 tokens")
    p.add_argument("--blocks", action="store_true", help="also compare every block's output (hooks)")
    args = p.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(float64) of a ModelMixin warns about fp32 modules it has none of
    torch.compiler.set_stance("force_eager")  # the official timestep_embedding is torch.compile'd
    official_mod = import_official(args.official.resolve())
    # float32 weights (the official module is built in float32), so both hold the same numbers in every dtype
    ours = OpenSora2Transformer3DModel(**TINY).eval()
    randomise(ours, args.seed)
    cfg = {k: ours.config[k] for k in OFFICIAL_FIELDS}
    cfg["axes_dim"] = list(cfg["axes_dim"])

    def build_official(**change):
        return official_mod.MMDiTModel(official_mod.MMDiTConfig(from_pretrained=None, cache_dir=None,
                                                                **{**cfg, **change})).eval()

    official = build_official()
    # control: the same weights in the official model with Flux's rotary pairing, which the
    # release does not use; a comparison that sees the model's equations must tell them apart
    control = build_official(use_liger_rope=False)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import load_file

        state = load_file(str(save_official(ours, Path(tmp) / "tiny_official.safetensors")))
    official.load_state_dict(state, strict=True)  # every official weight, and nothing else
    control.load_state_dict(state, strict=True)

    print("$ python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"tiny config: {cfg}")
    print(f"inputs: batch {args.batch}, latents {ours.config.out_channels}x{args.frames}x{args.height}x{args.width}, "
          f"{args.text_len} text tokens, seed {args.seed}; baseline: the official MMDiTModel")
    print(f"{'dtype':9} {'task':4} {'where':10} {'max |d|':>10} {'rel max':>10} {'elem rel':>10} "
          f"{'max |official|':>14}")
    channels, patch = ours.config.out_channels, ours.config.patch_size
    for name in args.dtype:
        dtype = getattr(torch, name)
        for m in (ours, official, control):
            m.to(dtype)
        for task in ("t2v", "i2v"):
            i2v = task == "i2v"
            x = inputs(args, channels, cfg, i2v=i2v)
            got_ours, got_official, handles = block_outputs(ours, official) if args.blocks else ({}, {}, [])
            with torch.no_grad():
                a = ours_call(ours, x, dtype)
                b = official_call(official, x, dtype, patch)
            for h in handles:
                h.remove()
            rows = [(k, got_ours[k], got_official[k]) for k in got_official] + [("output", a, b)]
            if dtype == torch.float64:
                rows += attribution(ours, official, x, patch)
            if task == "t2v":
                with torch.no_grad():
                    rows.append(("control", official_call(control, x, dtype, patch), b))
            for where, u, v in rows:
                d = differences(u, v)
                print(f"{name:9} {task:4} {where:10} {d[0]:10.3e} {d[1]:10.3e} {d[2]:10.3e} "
                      f"{v.double().abs().max().item():14.4g}")
    print("rel max: max |d| / max |official|; elem rel: max |d| / |official| where |official| > 1e-3 max |official|. "
          "float64 rows +...: the official float64 forward's float32 steps taken on our side too, cumulatively "
          "(+f32 t-emb: the 1000 t sinusoid; +f64 liger: the Liger stand-ins without their float32 casts; "
          "+f32 freqs: rotary frequencies rounded to float32). control: the official model with Flux's rotary "
          "pairing against the release's, same weights.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
