"""Block swap (``memory.blocks_to_swap: N``): the frozen weights of the last N transformer blocks
live in host memory and are copied to the accelerator just ahead of use, overlapped with compute.

Which blocks: the last N in execution order (the model's block lists in the order it registers
and runs them, :func:`transformer_blocks`). Backward starts where forward ends, so the last swapped
block stays on the card across the turn from forward to backward (no copy and no stall there),
while the first swapped block is prefetched as the transformer's forward begins, behind the
resident blocks. (musubi-tuner picks the last N as well, but swaps block contents both ways
through staging buffers; diffusers' group offloading prefetches in forward order only, so it would
fetch the wrong block during backward's recomputation, and it moves every parameter, LoRA too.)

At most two swapped blocks are on the card at once (the one computing and the next one, whose
copy runs on a side CUDA stream while the current block computes), with one exception: when every
block swaps and the loss runs the transformer more than once before backward (Kandinsky 5 with a
batch of prompts of different lengths), the first block, whose inputs need no gradient so nothing
signals the end of its backward, stays until backward ends, a third.
  forward          block i: wait for its copy, start copying block i+1, compute, evict block i
  backward         block i: (the gradient of its outputs is ready) wait for its copy, start
                   copying block i-1, recompute it (gradient checkpointing) and run its
                   backward, evict it once the gradient of its inputs is computed (of every
                   forward of it, when the loss ran the model more than once)
  end of backward  evict what is left
Frozen weights only travel host -> device: the host copy made at install is the master and never
changes, so evicting a block just drops its device copy (a 0-element placeholder takes its place).
Each swapped block's frozen tensors (fp8 weights as their data and scales) are packed into one
host buffer of exactly their size, page-locked on a GPU (:mod:`finetune.memory.pinned`; not the
caching host allocator, which rounds each buffer up to a power of two), so a block travels as one
copy into one device buffer whose views its parameters become. Trainable parameters (the LoRA
weights, ``requires_grad``) and buffers stay on the device all the time and keep their identity
(the optimizer holds them).

The hooks: a forward pre-hook and forward hook on each swapped block (they run again when
gradient checkpointing recomputes the block inside backward: recognised by the current autograd
graph task), and an identity autograd function around the block's inputs and outputs whose
backward says "this block's backward is about to start / is done". Without gradient
checkpointing autograd keeps the parameters themselves for backward, so reloading them before the
block's backward is all that is needed; with it, the recomputation reads them the same way.

On a CPU (the tests) the host and the device are both the CPU: copies are synchronous clones and
there is no stream, but every copy, wait and eviction step runs, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from finetune.errors import UserError
from finetune.memory.architecture import block_lists
from finetune.weights.fp8 import inner_tensors
from finetune.memory.pinned import Packed, pack


class BlockSwapError(UserError):
    """``memory.blocks_to_swap`` cannot be applied to this model (too many blocks, weights of a
    kind that cannot be streamed)."""


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` in execution order: every top-level ``nn.ModuleList``
    (:func:`~finetune.memory.architecture.block_lists`) in the order the model registers them
    (HunyuanVideo: dual-stream then single-stream blocks; Kandinsky 5: text then visual)."""
    return [block for name in block_lists(model) for block in getattr(model, name)]


# ---------------------------------------------------------------------------- copies


class Transfer:
    """Host -> device copies of packed blocks (:func:`finetune.memory.pinned.pack`: one host
    buffer of exactly the block's size, page-locked on a GPU, so one copy per block). CUDA: the
    copy on a side stream, an event per block that the compute stream waits on, and
    ``record_stream`` so the allocator does not hand a block's memory to the next copy while the
    compute stream still reads it. Elsewhere (a CPU): the same calls as plain synchronous copies.
    ``log``, if given, receives ``("copy", key)``."""

    def __init__(self, device: torch.device | str, log: list | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.log = log

    def pack(self, tensors: list[torch.Tensor]) -> Packed:
        """The host master copy of ``tensors``, packed into one buffer. Done once, at install."""
        return pack(tensors, pin=self.cuda)

    def copy_in(self, packed: Packed, key: Any = None) -> tuple[torch.Tensor, Any]:
        """Start copying ``packed``'s buffer to the device; returns the device buffer (uint8,
        ``packed.views`` makes the tensors of it) and what :meth:`wait` needs (a CUDA event, or None)."""
        if self.log is not None:
            self.log.append(("copy", key))
        if not self.cuda:
            return packed.buffer.data.clone(), None
        # No wait for the compute stream: the buffer comes from the side stream's own pool, and
        # ``wait`` marks it used by the compute stream, so its memory is not reused early.
        with torch.cuda.stream(self.stream):
            data = packed.buffer.data.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return data, event

    def wait(self, data: torch.Tensor, event: Any) -> None:
        """Make the compute stream wait for the copy of ``data``."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        data.record_stream(current)

    def synchronize(self) -> None:
        """Wait (on the host) for every copy started; before host buffers are freed."""
        if self.stream is not None:
            self.stream.synchronize()

    def placeholder(self, t: torch.Tensor) -> torch.Tensor:
        """What an evicted tensor holds: 0 elements of its dtype on the device."""
        return torch.empty(0, dtype=t.dtype, device=self.device)


# ---------------------------------------------------------------------------- slots


@dataclass
class _Slot:
    """One frozen tensor that streams: ``owner.<attr>`` (``param.data``, or an inner tensor of a
    quantised weight, e.g. an Fp8Weight's ``qdata``) and its host master (a view into its block's
    packed buffer)."""

    owner: torch.Tensor
    attr: str
    host: torch.Tensor

    def set(self, value: torch.Tensor) -> None:
        setattr(self.owner, self.attr, value)


def _frozen(block: torch.nn.Module, where: str) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(owner, attribute, tensor) of every frozen tensor of ``block`` that streams: ``param.data``
    of plain parameters, the inner tensors of quantised ones. Raises BlockSwapError for weights
    that are neither (bitsandbytes)."""
    found = []
    for name, p in block.named_parameters():
        if p.requires_grad:
            continue  # LoRA: stays on the device, untouched
        inner = inner_tensors(p)
        if inner is None:
            found.append((p, "data", p.data))
        elif inner:
            found += [(p, n, getattr(p, n)) for n in inner]
        else:
            raise BlockSwapError(f"memory.blocks_to_swap: {where}.{name} is a {type(p).__name__}, which block swap "
                                 f"cannot stream (model.quantization int8/nf4); use model.quantization=fp8 or none, "
                                 f"or set memory.blocks_to_swap=0")
    return found


def _slots(block: torch.nn.Module, transfer: Transfer, where: str) -> tuple[list[_Slot], Packed]:
    """Host masters of the frozen tensors of ``block`` (:func:`_frozen`), packed into one buffer;
    their device data become placeholders."""
    found = _frozen(block, where)
    packed = transfer.pack([t for _, _, t in found])
    out = [_Slot(owner, attr, host) for (owner, attr, _), host in zip(found, packed.hosts)]
    for s, (_, _, t) in zip(out, found):  # placeholders where the weights are now; they move with the model
        s.set(torch.empty(0, dtype=t.dtype, device=t.device))
    return out, packed


@dataclass
class _Loaded:
    data: torch.Tensor  # the block's packed buffer on the device
    event: Any
    ready: bool = False


class _Trigger(torch.autograd.Function):
    """Identity on ``tensors`` whose backward calls ``callback`` first (outputs are detached
    aliases, not views, so the block may modify them in place)."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], *tensors: torch.Tensor):
        ctx.callback = callback
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _with_trigger(value: Any, callback: Callable[[], None]) -> Any:
    """``value`` (tensors in any nesting of tuples, lists and dicts) with one :class:`_Trigger`
    around all the tensors in it that require grad; unchanged if none does."""
    leaves, spec = tree_flatten(value)
    where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not where:
        return value
    for i, t in zip(where, _Trigger.apply(callback, *[leaves[i] for i in where])):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


# ---------------------------------------------------------------------------- the swapper


@dataclass
class BlockSwap:
    """Block swap installed on one transformer (:func:`install_block_swap`). ``log`` records
    ``(event, block index)`` with event one of copy, compute, recompute, backward, evict (block
    indices count every block of the model, resident ones included)."""

    model: torch.nn.Module
    indices: list[int]  # model block index of each swapped block, in execution order
    blocks: list[torch.nn.Module]
    slots: list[list[_Slot]]
    packs: list[Packed]  # each swapped block's frozen tensors, packed into one host buffer
    transfer: Transfer
    log: list | None = None
    loaded: dict[int, _Loaded] = field(default_factory=dict)  # position in ``blocks`` -> device copy
    handles: list = field(default_factory=list)
    # backwards of block k begun and not yet finished (two when the loss ran the model twice)
    pending: dict[int, int] = field(default_factory=dict)
    _graph_tasks: set = field(default_factory=set)

    def _record(self, event: str, k: int) -> None:
        if self.log is not None:
            self.log.append((event, self.indices[k]))

    # --- residency ---
    def fetch(self, k: int) -> None:
        """Start copying swapped block ``k`` in (nothing if it is in or under way, or out of range)."""
        if 0 <= k < len(self.blocks) and k not in self.loaded:
            data, event = self.transfer.copy_in(self.packs[k], self.indices[k])
            self.loaded[k] = _Loaded(data, event)

    def ready(self, k: int) -> None:
        """Block ``k``'s weights on the device, its copy finished for the compute stream."""
        self.fetch(k)
        entry = self.loaded[k]
        if not entry.ready:
            self.transfer.wait(entry.data, entry.event)
            for slot, t in zip(self.slots[k], self.packs[k].views(entry.data)):
                slot.set(t)
            entry.ready = True

    def evict(self, k: int) -> None:
        """Drop block ``k``'s device copy (no copy back: the host master never changes)."""
        if self.loaded.pop(k, None) is None:
            return
        for slot in self.slots[k]:
            slot.set(self.transfer.placeholder(slot.host))
        self._record("evict", k)

    def evict_all(self) -> None:
        for k in sorted(self.loaded):
            self.evict(k)

    # --- hooks ---
    def _model_pre(self, module, args):
        if not _in_backward():
            self.evict_all()  # a previous step's leftovers (a forward with no backward)
            self.fetch(0)  # behind the resident blocks

    def _model_post(self, module, args, output):
        if not torch.is_grad_enabled():
            self.evict_all()  # inference: nothing stays for a backward

    def _block_pre(self, k: int, module, args, kwargs):
        self.ready(k)
        if _in_backward():  # gradient checkpointing recomputes the block
            self._record("recompute", k)
            return None
        self.fetch(k + 1)
        self._record("compute", k)
        if not torch.is_grad_enabled():
            return None
        return _with_trigger((tuple(args), kwargs), lambda: self._after_backward(k))

    def _block_post(self, k: int, module, args, kwargs, output):
        if _in_backward():
            return None  # recomputation: backward still needs the weights
        if torch.is_grad_enabled():
            output = _with_trigger(output, lambda: self._before_backward(k))
            if k == len(self.blocks) - 1:
                return output  # backward starts with this block
        self.evict(k)
        return output

    def _before_backward(self, k: int) -> None:
        task = torch._C._current_graph_task_id()
        if task not in self._graph_tasks:
            self._graph_tasks.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_of_backward(task))
        self.pending[k] = self.pending.get(k, 0) + 1
        self.ready(k)
        self.fetch(k - 1)
        self._record("backward", k)

    def _after_backward(self, k: int) -> None:
        """The gradient of block ``k``'s inputs is computed: that backward of it is finished."""
        self.pending[k] = self.pending.get(k, 0) - 1
        if self.pending[k] <= 0:
            self.evict(k)

    def _end_of_backward(self, task: int) -> None:
        self._graph_tasks.discard(task)
        self.pending.clear()
        self.evict_all()

    def remove(self) -> None:
        """Undo the install: every swapped block's weights back on the device from the masters
        (a full copy of the model on the card again), hooks removed."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if getattr(self.model, "_block_swap", None) is self:
            del self.model._block_swap
        self.evict_all()
        for slots in self.slots:
            for s in slots:
                s.set(s.host.to(self.transfer.device, copy=True))
        self.transfer.synchronize()
        for p in self.packs:
            p.buffer.release()

    def pinned_bytes(self) -> int:
        """Host bytes of the swapped blocks' packed buffers (page-locked on a GPU): the sum of
        their tensors' sizes, each rounded up to ALIGN bytes."""
        return sum(p.buffer.nbytes for p in self.packs)


def install_block_swap(model: torch.nn.Module, n: int, device: torch.device | str, what: str = "transformer",
                       log: list | None = None) -> BlockSwap:
    """Swap the last ``n`` blocks of ``model`` (module docstring); call it after the LoRA is
    added (trainable parameters stay put) and before or after the model moves to ``device``.
    Raises BlockSwapError if ``n`` exceeds the model's block count or a swapped weight cannot be
    streamed."""
    blocks = transformer_blocks(model)
    if n > len(blocks):
        lists = ", ".join(f"{k}: {v}" for k, v in block_lists(model).items())
        raise BlockSwapError(f"memory.blocks_to_swap={n}: the {what} ({type(model).__name__}) has {len(blocks)} "
                             f"blocks ({lists}); set memory.blocks_to_swap to at most {len(blocks)}")
    transfer = Transfer(device, log)
    first = len(blocks) - n
    swapped = blocks[first:]
    names = {id(b): f"{ln}.{i}" for ln in block_lists(model) for i, b in enumerate(getattr(model, ln))}
    slots, packs = zip(*[_slots(b, transfer, names[id(b)]) for b in swapped]) if swapped else ((), ())
    swap = BlockSwap(model, list(range(first, len(blocks))), swapped, list(slots), list(packs), transfer, log)
    model._block_swap = swap  # the model manages its own placement (finetune/memory/render.py leaves it be)
    swap.handles.append(model.register_forward_pre_hook(swap._model_pre))
    swap.handles.append(model.register_forward_hook(swap._model_post))
    for k, block in enumerate(swapped):
        swap.handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, k=k: swap._block_pre(k, m, a, kw), with_kwargs=True))
        swap.handles.append(block.register_forward_hook(
            lambda m, a, kw, out, k=k: swap._block_post(k, m, a, kw, out), with_kwargs=True))
    return swap
