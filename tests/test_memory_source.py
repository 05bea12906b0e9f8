"""Memory spent at the source (issue 17, item 1): LoRA layers that compute in the activation dtype,
fp8 linears that keep only their fp8 weight for backward, pinned host buffers of exactly the size
needed, the CUDA allocator setting, and the order of activation offload's overlapped copies.

What autograd keeps is counted with ``saved_tensors_hooks`` on the CPU under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (CPU autocast casts linears to bf16 as CUDA
autocast does). Page-locking, streams and how far copies overlap need a GPU: not tested here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from conftest import ROOT, tiny_recipe
from finetune.config import MemoryConfig
from finetune.families import get_family
from finetune.families.base import FullSize, ModelSpec
from finetune.memory.architecture import blocks_of
from finetune.memory import pinned, runtime
from finetune.memory.blockswap import install_block_swap, transformer_blocks
from finetune.weights.fp8 import Fp8Weight, quantize_fp8, quantize_linear
from finetune.memory.lora import train_in_fp32

# Relative L2 error of a fused fp8 layer stack against the unfused one: the merged weight is
# requantised (e4m3: 3 mantissa bits, per-row scales), the same rounding as loading in fp8,
# whose error on the tiny Wan is 0.4% (tests/test_fp8.py).
FP8_TOLERANCE = 0.02
BF16 = torch.bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Attention(torch.nn.Module):
    """q, k, v projections of one input, as in every attention block: x [B, L, 64] -> 3 x [B, L, 48]."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(64, 48) for _ in range(3))

    def forward(self, x):
        return self.to_q(x), self.to_k(x), self.to_v(x)


def attention(base: str, fp32_masters) -> Attention:
    """Frozen ``base`` ("bf16" or "fp8") q/k/v with a rank-4 LoRA each (non-zero B, as after some
    steps), LoRA weights made float32 by ``fp32_masters``."""
    torch.manual_seed(0)
    m = Attention().to(BF16)
    if base == "fp8":
        for lin in (m.to_q, m.to_k, m.to_v):
            quantize_linear(lin)
    m.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]), m)
    fp32_masters(m)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


def todays_masters(m: torch.nn.Module) -> None:
    """What trainer.add_lora did before: float32 LoRA weights, peft's input cast left on."""
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def step(m: Attention, x: torch.Tensor):
    """Forward under CPU autocast (bf16) and backward; returns what autograd saved, the outputs
    and the gradients (x and every LoRA weight)."""
    saved = []

    def keep(t):
        saved.append(t)
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=BF16):
        out = m(x)
    sum(o.float().square().sum() for o in out).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in m.named_parameters() if p.requires_grad}}
    return saved, [o.detach() for o in out], grads, x


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return type(a) is torch.Tensor and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------- LoRA dtype


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_lora_layers_save_the_input_once_and_nothing_in_fp32(base):
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2)).to(BF16)
    m = attention(base, train_in_fp32)
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)  # masters stay fp32
    saved, _, _, x_used = step(m, x)
    params = {id(p) for p in m.parameters()}
    activations = [t for t in saved if id(t) not in params and t.numel() >= x.numel()]
    # every activation-sized tensor autograd keeps is the input itself (its [128, 64] view), once per LoRA
    assert len(activations) == 3 and all(same_storage(t, x_used) for t in activations), \
        [(t.dtype, tuple(t.shape)) for t in activations]
    assert not [t for t in saved if t.dtype == torch.float32], "an fp32 tensor was saved for backward"

    # Today's path (peft's cast to the fp32 LoRA dtype) keeps a new bf16 copy per LoRA layer: the
    # count above is what tells them apart.
    old, _, _, x_old = step(attention(base, todays_masters), x)
    copies = [t for t in old if id(t) not in params and t.numel() >= x.numel() and not same_storage(t, x_old)]
    assert len(copies) == 3


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_lora_outputs_and_gradients_equal_todays_path(base):
    """The cast skipped is bf16 -> fp32 -> bf16, exact both ways, so the values are bit-identical
    (within bf16 tolerance is all the issue asks)."""
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2)).to(BF16)
    _, out_new, grads_new, _ = step(attention(base, train_in_fp32), x)
    _, out_old, grads_old, _ = step(attention(base, todays_masters), x)
    assert all(torch.equal(a, b) for a, b in zip(out_new, out_old))
    assert grads_new.keys() == grads_old.keys() and len(grads_new) == 7
    for k in grads_new:
        assert grads_new[k].dtype == grads_old[k].dtype and torch.equal(grads_new[k], grads_old[k]), k


def test_outside_autocast_lora_still_casts_a_bf16_input_to_its_fp32_weights():
    m = attention("bf16", train_in_fp32)
    x = torch.randn(2, 16, 64).to(BF16)
    q, _, _ = m(x)  # no autocast: without peft's cast this would be a bf16 x fp32 matmul error
    assert q.dtype == BF16


# ---------------------------------------------------------------------------- fp8 linears


def test_fp8_dequantisation_in_bf16_equals_float32_rounded_once():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)) * 0.05
    fp8 = Fp8Weight.from_float(w)
    exact = (fp8.qdata.float() * fp8.scale).to(BF16)
    assert torch.equal(fp8.dequantize(BF16), exact)
    assert torch.equal(fp8.dequantize(torch.float32), fp8.qdata.float() * fp8.scale)
    assert fp8.qdata.dtype == torch.float8_e4m3fn and fp8.scale.shape == (96, 1) and fp8.scale.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: half an ulp is at most 2^-4 of the value, and below the normal
    # range (2^-6 x scale) the step is 2^-9 x scale
    err = (fp8.dequantize() - w).abs()
    assert err.max() > 0 and bool((err <= w.abs() * 2**-4 + fp8.scale * 2**-10).all())


def test_fp8_linear_with_lora_has_the_gradients_of_its_bf16_dequantised_layer():
    """Same layer, weight once as fp8 and once as the plain bf16 tensor it dequantises to:
    identical outputs and gradients of the input and of the LoRA weights."""
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2)).to(BF16)
    fp8 = attention("fp8", train_in_fp32)
    plain = copy.deepcopy(fp8)
    for name in ("to_q", "to_k", "to_v"):
        base = getattr(plain, name).base_layer
        base.weight = torch.nn.Parameter(base.weight.dequantize(BF16), requires_grad=False)
        assert type(base.weight) is torch.nn.Parameter
    _, out_a, grads_a, _ = step(fp8, x)
    _, out_b, grads_b, _ = step(plain, x)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_fp8_linear_saves_no_dequantised_weight():
    x = torch.randn(2, 64, 64).to(BF16)
    m = attention("fp8", train_in_fp32)
    saved, _, _, _ = step(m, x)
    weights = [t for t in saved if tuple(t.shape) in ((48, 64), (64, 48))]
    bases = [getattr(m, n).base_layer.weight for n in ("to_q", "to_k", "to_v")]
    assert len(weights) == 3 and all(any(t is w for w in bases) for t in weights), \
        [(type(t).__name__, t.dtype) for t in weights]


def tiny_wan(quantization: str = "none"):
    return get_family("wan").load(ModelSpec("tiny", tiny=True, quantization=quantization))


def predict(fam) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=gen)
    text = {"prompt_embeds": torch.randn(1, fam.text_len, 32, generator=gen)}
    with torch.no_grad():
        return fam.predict(fam.components.transformer, latents, torch.tensor([500.0]), text, 16)


@pytest.mark.parametrize("safe", [False, True], ids=["fuse", "safe-fuse"])
def test_fp8_lora_fuses_and_unfuses_within_fp8_tolerance_without_a_peft_warning(safe):
    fam = tiny_wan("fp8")
    tr = fam.components.transformer
    base = predict(fam)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert not [w for w in caught if "Torchao" in str(w.message) or "merge" in str(w.message)], \
        [str(w.message) for w in caught]
    layer = tr.blocks[0].attn1.to_q
    assert type(layer) is peft.tuners.lora.Linear and isinstance(layer.base_layer.weight, Fp8Weight)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    unfused = predict(fam)
    assert rel_err(unfused, base) > 0.05  # the adapter matters, so fusing it is seen
    tr.fuse_lora(safe_fusing=safe)
    assert isinstance(layer.base_layer.weight, Fp8Weight) and layer.merged
    fused = predict(fam)
    print(f"fused vs unfused {rel_err(fused, unfused):.4f}")
    assert rel_err(fused, unfused) < FP8_TOLERANCE
    tr.unfuse_lora()
    assert not layer.merged
    tr.disable_adapters()
    back = predict(fam)
    print(f"unfused base vs base {rel_err(back, base):.4f}")
    assert rel_err(back, base) < FP8_TOLERANCE


# ---------------------------------------------------------------------------- tracing (the planner)


def meta_wan(recipe_args=()) -> torch.nn.Module:
    """The tiny Wan transformer built on the meta device, block linears fp8, the trainer's LoRA."""
    from finetune import trainer

    tiny = get_family("wan").build_tiny().transformer
    with torch.device("meta"):
        model = type(tiny).from_config(tiny.config)
    model.requires_grad_(False)
    quantize_fp8(model)
    recipe = tiny_recipe("wan", ROOT / "unused.jsonl", ROOT / "unused", "lora.rank=4", *recipe_args)
    trainer.add_lora(model, recipe)
    return model


def test_an_fp8_lora_model_trains_on_fake_tensors_under_autocast():
    """What the planner does: build on meta, fp8 + LoRA, ``to_empty`` inside FakeTensorMode, then
    forward and backward under CPU autocast at bf16, with gradient checkpointing."""
    model = meta_wan()
    model.enable_gradient_checkpointing()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
    w = model.blocks[0].attn1.to_q.base_layer.weight
    assert isinstance(w, Fp8Weight) and isinstance(w.qdata, FakeTensor) and w.qdata.dtype == torch.float8_e4m3fn
    saved = []
    with mode, torch.autocast("cpu", dtype=BF16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        hidden = torch.zeros(1, 16, 3, 8, 8, requires_grad=True)
        out = model(hidden_states=hidden, timestep=torch.tensor([500.0]),
                    encoder_hidden_states=torch.zeros(1, 8, 32), return_dict=False)[0]
        out.float().square().mean().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(isinstance(p.grad, FakeTensor) and p.grad.shape == p.shape for p in lora)
    assert all(p.dtype == torch.float32 for p in lora)
    assert out.dtype == BF16 and saved


def test_fake_conversion_of_a_real_fp8_weight():
    lin = torch.nn.Linear(64, 48)
    quantize_linear(lin)
    mode = FakeTensorMode()
    fake = mode.from_tensor(lin.weight)
    assert isinstance(fake, Fp8Weight) and isinstance(fake.qdata, FakeTensor) and fake.shape == (48, 64)
    with mode:
        y = F.linear(torch.zeros(2, 64, requires_grad=True), fake)
    assert isinstance(y, FakeTensor) and y.shape == (2, 48)


# ---------------------------------------------------------------------------- pinned host memory


def test_each_swapped_block_is_one_packed_buffer_of_aligned_views():
    fam = tiny_wan("fp8")
    tr = fam.components.transformer
    tr.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    originals = {n: (p.qdata.clone(), p.scale.clone()) if isinstance(p, Fp8Weight) else p.detach().clone()
                 for n, p in tr.named_parameters() if not p.requires_grad}
    # the planner's host line for the same config, dtype and fp8, from shapes alone
    planned = blocks_of(FullSize(type(tr), dict(tr.config)), torch.float32, "fp8").swapped(2)[0]
    swap = install_block_swap(tr, 2, "cpu")
    total = 0
    for slots, packed in zip(swap.slots, swap.packs):
        buf = packed.buffer.data
        assert buf.dtype == torch.uint8 and buf.numel() == packed.buffer.nbytes
        ends = []
        for s, offset in zip(slots, packed.offsets):
            assert offset % pinned.ALIGN == 0
            assert s.host.untyped_storage().data_ptr() == buf.data_ptr()  # a view of the block's one buffer
            assert s.host.data_ptr() == buf.data_ptr() + offset
            ends.append(offset + s.host.numel() * s.host.element_size())
        assert all(e <= o for e, o in zip(ends, packed.offsets[1:]))  # no overlap
        assert buf.numel() == pinned.aligned(ends[-1]) == sum(pinned.aligned(s.host.numel() * s.host.element_size())
                                                              for s in slots)
        assert {s.attr for s in slots} >= {"qdata", "scale", "data"}
        total += buf.numel()
    assert swap.pinned_bytes() == total == planned
    swap.remove()
    for n, p in tr.named_parameters():  # bit-exact round trip through the packed buffers
        if not p.requires_grad:
            want = originals[n]
            if isinstance(p, Fp8Weight):
                assert torch.equal(p.qdata.view(torch.uint8), want[0].view(torch.uint8)), n
                assert torch.equal(p.scale, want[1]), n
            else:
                assert torch.equal(p, want), n


def test_ring_takes_first_fit_grows_only_for_a_larger_tensor_and_holds_the_sum_of_sizes():
    ring = pinned.HostRing(pin=False)
    a, b = ring.take(1000), ring.take(300)
    assert ring.nbytes() == 1300  # not 1024 + 512
    a.busy = b.busy = False
    assert ring.take(1000) is a and ring.take(300) is b  # the same buffers, in the same order
    b.busy = False
    assert ring.take(200) is b and ring.nbytes() == 1300  # a smaller tensor fits in a free buffer
    a.busy = b.busy = False
    grown = ring.take(2000)
    assert grown is a and a.buffer.nbytes == 2000 and ring.nbytes() == 2300  # the largest free one, grown
    assert ring.take(5) is b
    assert ring.take(7).buffer.nbytes == 7 and ring.nbytes() == 2307  # none free: a new one


def test_page_locked_buffers_lock_whole_pages_of_their_own_and_unlock_when_released(monkeypatch):
    """cudaHostRegister emulated (no GPU here): what would be registered and unregistered."""
    locked: dict[int, int] = {}

    def register(t):
        start, end = t.data_ptr(), t.data_ptr() + t.numel()
        assert start % pinned.PAGE == 0 and t.numel() % pinned.PAGE == 0
        assert all(end <= s or start >= s + n for s, n in locked.items()), "two registrations share a page"
        locked[start] = t.numel()

    monkeypatch.setattr(pinned, "_register", register)
    monkeypatch.setattr(pinned, "_unregister", lambda t: locked.pop(t.data_ptr()))
    buffers = [pinned.HostBuffer(n, pin=True) for n in (96, 1000, 5000, 96, 3 * pinned.PAGE)]
    assert [b.nbytes for b in buffers] == [96, 1000, 5000, 96, 3 * pinned.PAGE]
    assert sorted(locked.values()) == sorted([pinned.PAGE] * 3 + [2 * pinned.PAGE, 3 * pinned.PAGE])
    assert all(b.data.data_ptr() in locked for b in buffers)
    buffers[0].release()
    buffers[0].release()  # once only
    assert len(locked) == 4
    del buffers[1]  # garbage: unlocked too
    assert len(locked) == 3
    ring = pinned.HostRing(pin=True)
    ring.take(100)
    ring.release()
    assert len(locked) == 3 and not ring.slots


def offload_step(fam, tr, batch, sizes):
    from test_blockswap import loss_and_grads

    sizes.clear()
    return loss_and_grads(fam, tr, batch)


def test_activation_offload_reuses_its_buffers_every_step(monkeypatch):
    from test_blockswap import batch_of, load

    fam = load("wan")
    tr, batch = fam.components.transformer, batch_of(fam)
    tr.enable_gradient_checkpointing()
    installed = runtime.apply(MemoryConfig(activation_offload=True), {"transformer": tr}, "cpu")
    off = installed.offloads["transformer"]
    sizes = []
    real_take = off.ring.take
    monkeypatch.setattr(off.ring, "take", lambda n: sizes.append(n) or real_take(n))
    offload_step(fam, tr, batch, sizes)
    first = list(sizes)
    buffers = [s.buffer.data.data_ptr() for s in off.ring.slots]
    assert len(first) == len(buffers) > 3 and all(not s.busy for s in off.ring.slots)
    assert off.pinned_bytes() == installed.pinned_bytes() == sum(first)
    assert sum(first) < sum(1 << (n - 1).bit_length() for n in first)  # what powers of two would have held
    for _ in range(2):
        offload_step(fam, tr, batch, sizes)
        assert sizes == first
        assert [s.buffer.data.data_ptr() for s in off.ring.slots] == buffers  # the same buffers, no new ones
        assert off.pinned_bytes() == sum(first)
    installed.remove()


# ---------------------------------------------------------------------------- overlapped copies


def test_activation_offload_prefetches_each_block_one_block_ahead_in_backward():
    """Checkpointed HunyuanVideo (4 blocks) with offload and every block swapped, one event log:
    backward restores block k+1's inputs, starts copying block k's (prefetch k) and only then
    recomputes block k+1; only what the head saved after the last block is copied on the spot."""
    from test_blockswap import batch_of, load, loss_and_grads

    fam = load("hunyuanvideo")
    tr, batch = fam.components.transformer, batch_of(fam)
    tr.enable_gradient_checkpointing()
    n = len(transformer_blocks(tr))
    log = []
    installed = runtime.apply(MemoryConfig(blocks_to_swap=n, activation_offload=True), {"transformer": tr}, "cpu",
                              log=log)
    transformer_blocks(tr)[-1].register_forward_hook(lambda *a: log.append(("forward done", n - 1)))
    loss_and_grads(fam, tr, batch)
    off = installed.offloads["transformer"]
    head_saved = sum(1 for e, _ in log[log.index(("forward done", n - 1)):] if e == "offload")
    backward = log[log.index(("forward done", n - 1)) + 1:]
    at = {e: i for i, e in enumerate(backward) if e[0] in ("prefetch", "recompute")}
    assert sorted(k for e, k in at if e == "prefetch") == list(range(n))
    for k in range(n):
        assert at[("prefetch", k)] < at[("recompute", k)]
        if k + 1 < n:  # issued as block k+1's inputs come back, before block k+1 recomputes
            assert at[("prefetch", k)] < at[("recompute", k + 1)]
            assert backward[at[("prefetch", k)] - 1][0] == "restore"
        if k + 2 < n:  # one block ahead, not more
            assert at[("recompute", k + 2)] < at[("prefetch", k)]
    assert off.late_restores == head_saved > 0  # every block input came back from its prefetch
    offloaded = [s for e, s in log if e == "offload"]
    assert sorted(offloaded) == sorted(s for e, s in log if e == "restore")
    installed.remove()


# ---------------------------------------------------------------------------- the CUDA allocator


PROBE = """
import os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        return None
sys.meta_path.insert(0, Probe())
import %s
import torch
print(seen.get("torch"), os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), sep="|")
"""


@pytest.mark.parametrize("script", ["train_lora", "infer"])
def test_entry_points_set_expandable_segments_before_torch_is_imported(script):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    res = subprocess.run([sys.executable, "-c", PROBE % script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "expandable_segments:True|expandable_segments:True"


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_allocator_setting_is_kept(var):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env[var] = "max_split_size_mb:128"
    res = subprocess.run([sys.executable, "-c", PROBE % "train_lora"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    want = "max_split_size_mb:128" if var == "PYTORCH_CUDA_ALLOC_CONF" else "None"
    assert res.stdout.strip().splitlines()[-1] == f"{want}|{want}"

