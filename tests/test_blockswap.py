"""Block swap (memory.blocks_to_swap) and activation offload (memory.activation_offload): the same
gradients, losses and adapters as without them, the prefetch schedule from recorded events, LoRA
parameters that never move, frozen weights that only travel host -> device, and bad input.

On a CPU the host and the device are both the CPU; the copy, wait and evict steps still run, so
equality and order are tested (the CUDA streams and pinning are not: no GPU on this machine).

Equality is exact (torch.equal): the copies are bit-exact, and the hooks change neither the
operations nor their order. The one exception is a model whose loss runs the transformer once
per clip before one backward (Kandinsky 5 with different prompt lengths): the gradients of the
two forwards meet in sums whose order the extra autograd nodes change, so it is compared to
float32 rounding instead.
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from finetune import trainer
from finetune.config import MemoryConfig
from finetune.families import get_family
from finetune.families.base import ModelSpec
from finetune.memory import runtime
from finetune.memory.blockswap import BlockSwapError, install_block_swap, transformer_blocks

# block layouts: one list (wan, ltx2), dual + single-stream lists (hunyuanvideo), two experts
# (wan22), text + visual lists with one forward per clip (kandinsky5)
FAMILIES = ["wan", "ltx2", "hunyuanvideo", "wan22", "kandinsky5"]
EXACT = {"wan", "ltx2", "hunyuanvideo", "wan22"}


def load(name: str, quantization: str = "none"):
    """Tiny model of ``name`` with a LoRA (non-zero B, as after some steps) on every expert."""
    cls = get_family(name)
    fam = cls.load(ModelSpec(pretrained=cls.default_model_id, tiny=True, quantization=quantization))
    for i, e in enumerate(fam.experts()):
        tr = getattr(fam.components, e.attr)
        torch.manual_seed(i)
        tr.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                                       target_modules=list(cls.default_lora_targets)))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        tr.train()
    return fam


def batch_of(fam):
    """(noisy input, timesteps, cond, target, mask) of two clips with prompts of different lengths."""
    cls = type(fam)
    size, frames = 2 * cls.spatial_factor, cls.frame_rule.floor(9)
    videos = torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = fam.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    cond = {**fam.encode_prompts(["a red square", "b"]), **fam.encode_conditioning(videos, latents)}
    sigmas = fam.shift_sigmas(torch.tensor([0.3, 0.8]), latents.shape)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    return fam.noisy_input_and_target(latents, noise, sigmas, cond), cond


def loss_and_grads(fam, tr, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    noised, cond = batch
    tr.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # as the trainer seeds each micro-batch (some models draw noise in forward)
    pred = fam.predict(tr, noised.noisy, noised.timesteps, cond, type(fam).default_fps)
    loss = trainer.masked_mse(pred, noised.target, noised.loss_mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}


def assert_same(a, b, exact: bool, what: str):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        if exact:
            assert torch.equal(grads_a[n], grads_b[n]), f"{what}: {n}"
        else:
            torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-8, msg=f"{what}: {n}")
    assert torch.equal(loss_a, loss_b) if exact else torch.allclose(loss_a, loss_b, rtol=1e-6), what


# --- (a), (b): gradients and loss equal with and without, checkpointing on and off ---
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_equal_with_block_swap_and_activation_offload(name, checkpointing):
    fam = load(name)
    batch = batch_of(fam)
    for e in fam.experts():  # each expert of a two-expert model
        tr = getattr(fam.components, e.attr)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        every = len(transformer_blocks(tr))
        reference = loss_and_grads(fam, tr, batch)
        for swap, offload in ((every, False), (1, False), (0, True), (every, True)):
            log = []
            installed = runtime.apply(MemoryConfig(blocks_to_swap=swap, activation_offload=offload), {e.attr: tr},
                                      "cpu", log=log)
            got = loss_and_grads(fam, tr, batch)
            installed.remove()
            what = f"{name} {e.attr} blocks_to_swap={swap} activation_offload={offload}"
            assert (swap == 0) or any(ev == "copy" for ev, _ in log), what  # it did stream
            assert (not offload) or any(ev == "offload" for ev, _ in log), what
            assert_same(reference, got, name in EXACT, what)
        assert torch.equal(loss_and_grads(fam, tr, batch)[0], reference[0])  # removed: the model as it was


def test_fp8_block_weights_stream_too():
    """fp8 weights are streamed through their inner tensors (the quantised data and scales)."""
    fam = load("wan", quantization="fp8")
    tr, batch = fam.components.transformer, batch_of(fam)
    tr.enable_gradient_checkpointing()
    reference = loss_and_grads(fam, tr, batch)
    log = []
    swap = install_block_swap(tr, 2, "cpu", log=log)
    got = loss_and_grads(fam, tr, batch)
    assert_same(reference, got, True, "fp8")
    inner = [s for slots in swap.slots for s in slots if s.attr != "data"]
    assert inner and all(getattr(s.owner, s.attr).numel() == 0 for s in inner)  # evicted after backward


# --- (d): the prefetch schedule ---
def check_schedule(log: list, swapped: list[int]) -> None:
    """Replays the events: a block computes (forward, recompute, backward) only while its weights
    are in; while block i computes forward, the next swapped block has been copied; while block i
    starts its backward, the previous one has; never more than two swapped blocks are in."""
    resident: set[int] = set()
    for event, k in log:
        if event == "copy":
            assert k not in resident, f"{k} copied twice"
            resident.add(k)
        elif event == "evict":
            resident.remove(k)
        else:
            assert k in resident, (event, k, log)
            step = {"compute": 1, "backward": -1}.get(event, 0)
            if step and k + step in swapped:
                assert k + step in resident, f"{event} {k}: {k + step} not prefetched"
        assert len(resident) <= 2, log
    assert not resident, "left on the device after backward"


def test_prefetch_order_from_recorded_events():
    fam = load("hunyuanvideo")  # blocks 0, 1 dual-stream; 2, 3 single-stream
    tr, batch = fam.components.transformer, batch_of(fam)
    tr.enable_gradient_checkpointing()
    log = []
    install_block_swap(tr, 3, "cpu", log=log)
    loss_and_grads(fam, tr, batch)
    assert log == [
        ("copy", 1),  # the transformer's forward starts: first swapped block, behind resident block 0
        ("copy", 2), ("compute", 1), ("evict", 1),  # block 2 copied while block 1 computes
        ("copy", 3), ("compute", 2), ("evict", 2),
        ("compute", 3),  # the last block stays for backward
        ("copy", 2), ("backward", 3), ("recompute", 3), ("evict", 3),  # block 2 copied while 3 runs backward
        ("copy", 1), ("backward", 2), ("recompute", 2), ("evict", 2),
        ("backward", 1), ("recompute", 1), ("evict", 1),
    ]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("name", ["wan", "hunyuanvideo", "kandinsky5"])
def test_schedule_holds_for_every_layout(name, checkpointing):
    fam = load(name)
    tr, batch = fam.components.transformer, batch_of(fam)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    n = len(transformer_blocks(tr))
    # Kandinsky 5 runs the transformer once per clip here, so its backward runs each block twice;
    # when every block swaps, the first one (whose inputs need no gradient, so nothing says when
    # its backward is over) stays until the end: a third block on the card (finetune/memory/blockswap.py)
    for swap in range(1, n + 1 if name != "kandinsky5" else n):
        log = []
        s = install_block_swap(tr, swap, "cpu", log=log)
        loss_and_grads(fam, tr, batch)
        s.remove()
        check_schedule(log, list(range(n - swap, n)))
        assert ("recompute" in {e for e, _ in log}) == checkpointing


def test_schedule_check_catches_a_late_copy():
    with pytest.raises(AssertionError, match="not prefetched"):
        check_schedule([("copy", 0), ("compute", 0), ("copy", 1), ("evict", 0), ("compute", 1), ("evict", 1)], [0, 1])


# --- (e): LoRA never moves; frozen weights only host -> device ---
def test_lora_stays_put_and_frozen_weights_are_never_copied_back():
    fam = load("wan")
    tr, batch = fam.components.transformer, batch_of(fam)
    tr.enable_gradient_checkpointing()
    lora = [p for p in tr.parameters() if p.requires_grad]
    where = [(id(p), p.data_ptr(), p.device) for p in lora]
    originals = {n: p.detach().clone() for n, p in tr.named_parameters() if not p.requires_grad}
    swap = install_block_swap(tr, 2, "cpu")
    masters = [s.host for slots in swap.slots for s in slots]

    def scribble(module, args, output):  # a copy back would carry this into the master
        with torch.no_grad():
            for p in module.parameters():
                if not p.requires_grad:
                    p.add_(1.0)

    hooks = [b.register_forward_hook(scribble) for b in swap.blocks]
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    for _ in range(2):
        loss_and_grads(fam, tr, batch)
        optimizer.step()
    for h in hooks:
        h.remove()
    assert [(id(p), p.data_ptr(), p.device) for p in tr.parameters() if p.requires_grad] == where
    assert all(p.grad is not None for p in lora)
    assert [s.host for slots in swap.slots for s in slots] == masters  # same master tensors
    swapped = {id(p) for b in swap.blocks for p in b.parameters() if not p.requires_grad}
    named = dict(tr.named_parameters())
    assert all(named[n].numel() == 0 for n in originals if id(named[n]) in swapped)  # evicted
    swap.remove()
    for n, p in tr.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, originals[n]), n  # the masters never changed


# --- inference: validation renders stream the same blocks ---
def test_render_with_block_swap_equals_render_without():
    fam = load("wan")
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = 2 * type(fam).spatial_factor

    def render():
        with torch.no_grad():
            return pipe(prompt="a red square", num_frames=5, height=size, width=size, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0), output_type="pt").frames

    fam.components.transformer.eval()
    reference = render()
    log = []
    install_block_swap(fam.components.transformer, 2, "cpu", log=log)
    assert torch.equal(render(), reference)
    assert sum(e == "compute" for e, _ in log) >= 2 * 2 and not any(e == "backward" for e, _ in log)
    check_schedule(log, [0, 1])


# --- (c): a real training run writes the same adapter ---
@pytest.mark.parametrize("name", ["wan", "wan22"])
def test_training_with_block_swap_and_activation_offload_writes_the_same_adapter(name, clips, tmp_path):
    # a validation render after step 2 runs through the swapped blocks in the middle of training
    steps = ("optim.steps=3", "checkpoint.every=0", "validation.prompts=[mystyle a square]", "validation.every=2",
             "validation.steps=2")
    plain = trainer.train(tiny_recipe(name, clips, tmp_path / "plain", *steps))
    recipe = tiny_recipe(name, clips, tmp_path / "swap", *steps, "memory.blocks_to_swap=1",
                         "memory.activation_offload=true")
    swapped = trainer.train(recipe)
    files = sorted(p.name for p in plain.run_dir.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in swapped.run_dir.glob("*.safetensors"))
    for f in files:
        a, b = load_file(str(plain.run_dir / f)), load_file(str(swapped.run_dir / f))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert plain.last_loss == swapped.last_loss
    assert sorted(p.name for p in (swapped.run_dir / "samples").iterdir()) == [  # + the base render, made once
        "base-0.mp4", "step-00000002-0.mp4", "step-00000003-0.mp4"]
    for e in swapped.family.experts():  # it did swap: the last block's frozen weights are in host memory only
        last = transformer_blocks(getattr(swapped.family.components, e.attr))[-1]
        assert all(p.numel() == 0 for p in last.parameters() if not p.requires_grad)
        assert any(p.numel() > 0 for p in last.parameters() if p.requires_grad)


# --- (f): bad input ---
def test_more_blocks_to_swap_than_the_model_has_is_a_named_error(clips, tmp_path):
    recipe = tiny_recipe("wan", clips, tmp_path / "run", "memory.blocks_to_swap=3")
    with pytest.raises(BlockSwapError, match=r"memory.blocks_to_swap=3: the transformer .* has 2 blocks "
                                             r"\(blocks: 2\); set memory.blocks_to_swap to at most 2"):
        trainer.train(recipe)


def test_with_checkpointing_the_offloaded_activations_are_the_block_inputs():
    fam = load("wan")
    tr, batch = fam.components.transformer, batch_of(fam)
    inputs = []

    def record(module, args):  # what each block's forward gets (checkpointing saves exactly that)
        if torch._C._current_graph_task_id() == -1:  # not backward's recomputation
            inputs.append(tuple(args[0].shape))

    for b in transformer_blocks(tr):
        b.register_forward_pre_hook(record)
    counts = {}
    for checkpointing in (False, True):
        if checkpointing:
            tr.enable_gradient_checkpointing()
        log = []
        installed = runtime.apply(MemoryConfig(activation_offload=True), {"transformer": tr}, "cpu", log=log)
        inputs.clear()
        loss_and_grads(fam, tr, batch)
        installed.remove()
        offloaded = [shape for e, shape in log if e == "offload"]
        assert sorted(offloaded) == sorted(shape for e, shape in log if e == "restore")  # each came back once
        counts[checkpointing] = len(offloaded)
        assert all(offloaded.count(s) >= inputs.count(s) for s in inputs)  # every block input waited on the host
    assert counts[True] * 5 < counts[False]  # checkpointing: the inputs, not everything a block saves


def test_fp8_run_with_block_swap_resumes_to_the_adapter_of_an_uninterrupted_run(clips, tmp_path):
    """Checkpoints hold only LoRA weights, so the swapped blocks' placeholders never reach them."""
    base = ("model.quantization=fp8", "checkpoint.every=1")
    swap = ("memory.blocks_to_swap=2", "memory.activation_offload=true")
    plain = trainer.train(tiny_recipe("wan", clips, tmp_path / "plain", *base, "optim.steps=3"))
    trainer.train(tiny_recipe("wan", clips, tmp_path / "run", *base, *swap, "optim.steps=2"))
    resumed = trainer.train(tiny_recipe("wan", clips, tmp_path / "run", *base, *swap, "optim.steps=3"),
                            resume="latest")
    assert resumed.start_step == 1  # the last step of a run is its adapter, not a checkpoint
    a, b = load_file(str(plain.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
