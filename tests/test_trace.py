"""The planner's trace of a training step (finetune/memory/trace.py) against what it stands for:
its CUDA autocast table against CUDA autocast itself (run on fake CUDA tensors, which this CPU
build dispatches through the real autocast kernels), and its live-byte peak against the same
step measured on real tensors on the CPU (a full-width Wan 1.3B cut to a few blocks, at a reduced
token count)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from finetune import trainer
from finetune.families import get_family
from finetune.families._loading import random_module
from finetune.families.base import Components, FullSize, ModelSpec
from finetune.memory import trace as T

# ---------------------------------------------------------------------------- the autocast table


def _lin(a):
    return F.linear(a, torch.empty(8, 8, device=a.device, dtype=a.dtype))


# one call per listed op, on a [4, 8, 8] input; names as the table spells them
PROBES = {
    "linear": _lin, "matmul": lambda a: a @ a, "bmm": lambda a: torch.bmm(a, a),
    "baddbmm": lambda a: torch.baddbmm(a, a, a), "einsum": lambda a: torch.einsum("bij,bjk->bik", a, a),
    "conv1d": lambda a: F.conv1d(a, torch.empty(8, 8, 3, device=a.device, dtype=a.dtype)),
    "layer_norm": lambda a: F.layer_norm(a, (8,)), "group_norm": lambda a: F.group_norm(a, 2),
    "rms_norm": lambda a: F.rms_norm(a, (8,)), "exp": torch.exp, "log": torch.log, "log2": torch.log2,
    "log1p": torch.log1p, "expm1": torch.expm1, "pow": lambda a: a.pow(2), "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal, "softplus": F.softplus, "mse_loss": lambda a: F.mse_loss(a, a),
    "l1_loss": lambda a: F.l1_loss(a, a), "smooth_l1_loss": lambda a: F.smooth_l1_loss(a, a),
    "logsumexp": lambda a: a.logsumexp(-1), "interpolate": lambda a: F.interpolate(a, scale_factor=2.0),
    "cosine_similarity": lambda a: F.cosine_similarity(a, a), "square": torch.square,
    "acos": torch.acos, "asin": torch.asin, "cosh": torch.cosh, "sinh": torch.sinh, "tan": torch.tan,
    "erfinv": torch.erfinv, "cdist": lambda a: torch.cdist(a, a), "renorm": lambda a: a.renorm(2, 0, 1.0),
    "softmax": lambda a: a.softmax(-1), "log_softmax": lambda a: a.log_softmax(-1), "sum": torch.sum,
    "prod": lambda a: a.prod(-1), "cumsum": lambda a: a.cumsum(-1), "cumprod": lambda a: a.cumprod(-1),
    "norm": lambda a: a.norm(dim=-1), "linalg_vector_norm": lambda a: torch.linalg.vector_norm(a, dim=-1),
    "cat": lambda a: torch.cat([a, a]), "stack": lambda a: torch.stack([a, a]),
    "addcmul": lambda a: torch.addcmul(a, a, a), "addcdiv": lambda a: torch.addcdiv(a, a, a),
    "atan2": lambda a: torch.atan2(a, a),
}
# common ops CUDA autocast leaves alone: they run in their input's dtype
UNLISTED = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "mul": lambda a: a * a,
            "add": lambda a: a + a, "mean": lambda a: a.mean(-1), "var": lambda a: a.var(-1), "sqrt": torch.sqrt,
            "sin": torch.sin, "cos": torch.cos, "erf": torch.erf, "neg": torch.neg, "relu": F.relu}


def _cuda_autocast_dtype(fn, dtype: torch.dtype, second: torch.dtype | None = None):
    """The output dtype of ``fn`` on fake CUDA tensors of ``dtype`` under real CUDA autocast (bf16),
    switched on below torch.autocast's availability check; ``second``: the dtype of the second
    operand for mixed-input ops (the first stays ``dtype``)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_enabled("cuda", True)
        try:
            a = torch.empty(4, 8, 8, device="cuda", dtype=dtype)
            out = fn(a) if second is None else fn(a, torch.empty(4, 8, 8, device="cuda", dtype=second))
        finally:
            torch.set_autocast_enabled("cuda", False)
            torch.clear_autocast_cache()
    return out.dtype


@pytest.mark.parametrize("name", sorted(PROBES))
def test_the_autocast_table_is_cuda_autocasts(name):
    policy = T.autocast_policy(name)
    fn = PROBES[name]
    if policy == "lower":
        assert _cuda_autocast_dtype(fn, torch.float32) == torch.bfloat16
    elif policy in ("fp32", "fp32_out"):
        assert _cuda_autocast_dtype(fn, torch.bfloat16) == torch.float32
    elif policy == "promote":
        assert _cuda_autocast_dtype(fn, torch.bfloat16) == torch.bfloat16
        two = {"cat": lambda a, b: torch.cat([a, b]), "stack": lambda a, b: torch.stack([a, b]),
               "addcmul": lambda a, b: torch.addcmul(a, b, a), "addcdiv": lambda a, b: torch.addcdiv(a, b, a),
               "atan2": torch.atan2}[name]
        assert _cuda_autocast_dtype(two, torch.bfloat16, torch.float32) == torch.float32
    else:
        pytest.fail(f"{name} has a probe but no policy in the table")


@pytest.mark.parametrize("name", sorted(UNLISTED))
def test_ops_off_the_lists_keep_their_dtype_in_both(name):
    assert T.autocast_policy(name) is None
    assert _cuda_autocast_dtype(UNLISTED[name], torch.bfloat16) == torch.bfloat16
    assert _cuda_autocast_dtype(UNLISTED[name], torch.float32) == torch.float32


def test_every_listed_op_with_a_probe_agrees_and_the_core_ones_have_probes():
    core = {"linear", "matmul", "bmm", "baddbmm", "einsum", "layer_norm", "rms_norm", "group_norm", "softmax",
            "exp", "pow", "sum", "cat", "mse_loss"}
    assert core <= set(PROBES)
    listed = T.AUTOCAST_LOWER | T.AUTOCAST_FP32 | T.AUTOCAST_FP32_OUT | T.AUTOCAST_PROMOTE
    assert set(PROBES) <= listed


def test_the_emulation_casts_as_cuda_does_and_caches_weights_that_train():
    """Under CudaAutocast on the CPU: a linear of fp32 inputs runs in bf16, an rms_norm of bf16
    inputs in float32 (its float32 input copy is what backward keeps), softmax of bf16 gives
    float32; a LoRA-like fp32 weight that requires grad is cast once for two uses."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    casts = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        casts.append(self is w)
        return real_to(self, *args, **kwargs)

    with T.CudaAutocast():
        torch.Tensor.to = spy
        try:
            y = F.linear(x, w) + F.linear(x, w)
        finally:
            torch.Tensor.to = real_to
        n = F.rms_norm(y, (8,))
        s = y.softmax(-1)
    assert y.dtype == torch.bfloat16 and n.dtype == torch.float32 and s.dtype == torch.float32
    assert casts.count(True) == 1


# ---------------------------------------------------------------------------- live bytes vs the CPU

WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SIZE = (9, 128, 128)  # 3 latent frames of 8 x 8 patches: 192 video tokens, 512 text tokens


def measured_step_peak(fam, checkpoint: str, blocks: int, quantization: str) -> int:
    """The live-tensor peak of one real training step on the CPU: the full-width transformer with
    ``blocks`` blocks and random weights (the real loader), the trainer's LoRA, gradient
    checkpointing, emulated CUDA autocast, the family's predict and the trainer's loss, measured by
    LiveBytes on real tensors (parameters and LoRA gradients left out, as the planner counts them)."""
    from types import SimpleNamespace

    full = fam.full_size_configs("t2v")[checkpoint]["transformer"]
    model = random_module(FullSize(full.cls, {**full.config, "num_layers": blocks}), torch.bfloat16, quantization)
    lora = SimpleNamespace(init_from=None, rank=16, alpha=16, dropout=0.0)
    params = trainer.add_lora(model, SimpleNamespace(lora=lora, lora_targets=list(fam.default_lora_targets)))
    autocast = T.CudaAutocast()
    model.enable_gradient_checkpointing(gradient_checkpointing_func=T.checkpoint_under(autocast))
    model.train()
    family = fam(Components(model, None, None, None, None), ModelSpec(pretrained=checkpoint, task="t2v"))
    latent_shape, cond_shapes = fam.planning_inputs("t2v", *SIZE, fam.max_sequence_length)
    gen = torch.Generator().manual_seed(0)
    live = T.LiveBytes(exclude=[*model.parameters(), *model.buffers()])
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: live.forget(p.grad))
    with live:  # the batch is on the device too
        latents = torch.randn(latent_shape, generator=gen).to(torch.bfloat16)
        cond = {k: torch.randn(s, generator=gen).to(d) for k, (s, d) in cond_shapes.items()}
        with autocast:
            pred = family.predict(model, latents, torch.full((1,), 500.0), cond, 16.0)
        loss = trainer.masked_mse(pred, torch.zeros_like(pred), None)
        del pred
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    return live.peak


@pytest.mark.parametrize("quantization", ["none", "fp8"])
@pytest.mark.parametrize("blocks", [2, 4])
def test_the_traced_peak_is_the_measured_peak_of_a_cpu_step(blocks, quantization):
    """Within 5%: the trace at 2 blocks on meta tensors for 2, and extrapolated from it for 4."""
    fam = get_family("wan")
    measured = measured_step_peak(fam, WAN, blocks, quantization)
    settings = T.StepSettings(quantization=quantization, rank=16, alpha=16, targets=tuple(fam.default_lora_targets))
    predicted = T.step_peak(fam, WAN, "t2v", *SIZE, 16.0, settings, blocks={"num_layers": blocks}).peak
    assert abs(predicted - measured) <= 0.05 * measured, (predicted / 2**20, measured / 2**20)


def test_meta_and_fake_traces_count_alike():
    fam = get_family("wan")
    settings = T.StepSettings(quantization="fp8", rank=16, alpha=16, targets=tuple(fam.default_lora_targets))
    args = (fam, WAN, "t2v", 17, 256, 256, 16.0, settings, (("num_layers", 2),))
    meta, fake = T._trace(*args, fake=False), T._trace(*args, fake=True)
    assert (meta.peak, meta.kept, meta.flops) == (fake.peak, fake.kept, fake.flops)


def test_offloaded_activations_leave_the_card_for_host_memory():
    fam = get_family("wan")
    on, off = (T.StepSettings(rank=16, alpha=16, targets=tuple(fam.default_lora_targets), offload=o)
               for o in (True, False))
    peak_on, host_on, _, _ = T.step_peak(fam, WAN, "t2v", 33, 480, 832, 16.0, on)
    peak_off, host_off, _, _ = T.step_peak(fam, WAN, "t2v", 33, 480, 832, 16.0, off)
    tokens, dim, blocks = 9 * 30 * 52, 1536, 30
    assert host_off == 0 and host_on >= blocks * tokens * dim * 2  # every block's bf16 input
    assert peak_off - peak_on >= 0.8 * (blocks - 2) * tokens * dim * 2


def test_a_dense_attention_mask_is_counted_as_the_kernel_keeps_it():
    """A [1, 1, S, S] boolean mask becomes a bf16 bias kept for backward: 2 S^2 bytes more."""
    s, heads, d = 512, 2, 64

    def peak(masked: bool) -> int:
        q = torch.randn(1, heads, s, d, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(1, 1, s, s, dtype=torch.bool).tril() if masked else None
        live = T.LiveBytes(exclude=[q] + ([mask] if masked else []))
        with live, T.CudaAutocast():
            out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            out.float().sum().backward()
        return live.peak

    assert peak(True) - peak(False) >= 2 * s * s
