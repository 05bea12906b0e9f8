"""Activation offload (``memory.activation_offload: true``): what the transformer's forward keeps
for backward waits in host memory (page-locked on a GPU) instead of on the card.

With gradient checkpointing (PyTorch's non-reentrant checkpoint, which every family's
``enable_gradient_checkpointing`` uses) a block keeps only its inputs: the checkpoint saves them
through the saved-tensor hooks that are active *around* it, before it installs its own hooks for
the block's inside. So our hooks, active for the whole transformer forward, receive exactly the
checkpointed block inputs (plus the few tensors saved outside the blocks: patch embedding, output
projection), and backward's recomputation of block i unpacks its inputs right before it runs.
Without checkpointing every tensor a block saves passes through them.

Parameters are never offloaded (frozen weights would otherwise travel device -> host every step;
block swap streams those, see :mod:`finetune.memory.blockswap`), nor are tensor subclasses
(quantised weights). Hand-written rather than ``torch.autograd.graph.save_on_cpu`` for that rule
(``save_on_cpu`` copies every saved tensor, parameters included), for the reused host buffers and
for the copies overlapped with compute:

  host memory  a :class:`~finetune.memory.pinned.HostRing` of buffers of exactly the sizes saved,
               allocated in the first step and reused every step after (not the caching host
               allocator, which rounds each to a power of two); a buffer is free again once
               autograd releases the saved tensor it holds.
  forward      device -> host on a side stream: it waits for the compute stream to have made the
               tensor, and ``record_stream`` keeps the tensor's device memory from being reused
               before the copy has read it, so the compute stream never waits for the copy. A copy
               into a reused buffer first waits (on the side stream) for the last copy out of it.
  backward     tensors are grouped by the block whose forward saved them (group k: what was saved
               after block k-1 finished and until block k finished, i.e. block k's checkpointed
               inputs and whatever block k saves; the last group: what the head saves). When a
               tensor of group k is first unpacked, it is restored (from its prefetched copy, or
               copied now on the compute stream) and then group k-1 is prefetched host -> device on
               a second side stream, one block ahead, overlapping block k's recomputation and
               backward; unpacking a prefetched tensor makes the compute stream wait for its copy.
On a CPU (the tests) the host and the device are both the CPU: copies are plain and synchronous,
run in the same places and order, and there are no streams or events. ``log``, if given,
receives ``("offload", shape)``, ``("prefetch", k)`` (block k's group; k = the block count for
what follows the last block) and ``("restore", shape)``. How far the copies overlap compute is
measurable only on a GPU (not measured here).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from finetune.memory.blockswap import _in_backward, transformer_blocks
from finetune.memory.pinned import HostRing, RingSlot, nbytes


class _Offloaded:
    """A saved tensor waiting in a ring buffer: ``host`` (a view of ``slot``'s buffer with the
    tensor's shape, dtype and strides), where it goes back to, its group (forward number, block
    index) and, once prefetched, its device copy and the event of that copy. Gives its buffer
    back to the ring when autograd releases it."""

    __slots__ = ("slot", "host", "device", "group", "prefetched", "restored", "__weakref__")

    def __init__(self, slot: RingSlot, host: torch.Tensor, device: torch.device, group: tuple[int, int]):
        self.slot, self.host, self.device, self.group = slot, host, device, group
        self.prefetched: tuple[torch.Tensor, Any] | None = None
        self.restored = False

    def __del__(self):
        self.slot.busy = False


def _device_empty(h: _Offloaded) -> torch.Tensor:
    """An uninitialised device tensor with ``h``'s shape, strides and dtype."""
    return torch.empty_strided(h.host.shape, h.host.stride(), dtype=h.host.dtype, device=h.device)


class ActivationOffload:
    """Saved-tensor hooks active during each forward of ``model`` (installed by
    :func:`install_activation_offload`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str, log: list | None = None):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ring = HostRing(pin=self.cuda)
        self.d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self.h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self.log = log
        self.handles: list = []
        self.late_restores = 0  # restores that were not prefetched (copied when unpacked)
        self._active: list = []
        self._forward = 0
        self._block = 0
        self._groups: dict[tuple[int, int], list[weakref.ref]] = {}

    # --- forward ---
    def pack(self, t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor or t.numel() == 0
                or t.device.type != self.device.type):
            return t
        slot = self.ring.take(nbytes(t))
        # the same strides where they are dense (a transposed weight-like view stays transposed, so
        # backward runs the same kernels and rounds the same); contiguous for an expanded view
        stride = torch.empty_like(t, device="meta").stride()
        host = slot.buffer.data[:nbytes(t)].view(t.dtype).as_strided(t.shape, stride)
        if self.cuda:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # t is made on the compute stream
            if slot.read is not None:
                self.d2h.wait_event(slot.read)  # a reused buffer: its last copy out has finished
            with torch.cuda.stream(self.d2h):
                host.copy_(t, non_blocking=True)
                slot.written = torch.cuda.Event()
                slot.written.record(self.d2h)
            t.record_stream(self.d2h)  # its memory is not reused before the copy has read it
        else:
            host.copy_(t)
        if self.log is not None:
            self.log.append(("offload", tuple(t.shape)))
        out = _Offloaded(slot, host, t.device, (self._forward, self._block))
        self._groups.setdefault(out.group, []).append(weakref.ref(out))
        return out

    # --- backward ---
    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        t = self._restore(packed)
        forward, block = packed.group
        if block > 0:
            self._prefetch((forward, block - 1))
        return t

    def _restore(self, h: _Offloaded) -> torch.Tensor:
        if self.log is not None:
            self.log.append(("restore", tuple(h.host.shape)))
        h.restored = True
        if h.prefetched is not None:
            t, event = h.prefetched
            h.prefetched = None
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                t.record_stream(current)
            return t
        self.late_restores += 1
        t = _device_empty(h)
        if not self.cuda:
            return t.copy_(h.host)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(h.slot.written)
        t.copy_(h.host, non_blocking=True)
        h.slot.read = torch.cuda.Event()
        h.slot.read.record(current)
        return t

    def _prefetch(self, group: tuple[int, int]) -> None:
        """Start copying back every tensor of ``group`` not yet restored (once per group)."""
        live = [h for r in self._groups.pop(group, []) if (h := r()) is not None and not h.restored]
        if not live:
            return
        if self.log is not None:
            self.log.append(("prefetch", group[1]))
        if not self.cuda:
            for h in live:
                h.prefetched = (_device_empty(h).copy_(h.host), None)
            return
        copies = []
        with torch.cuda.stream(self.h2d):  # device memory from the side stream's pool; _restore marks its use
            for h in live:
                self.h2d.wait_event(h.slot.written)
                copies.append(_device_empty(h).copy_(h.host, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.h2d)
        for h, t in zip(live, copies):
            h.prefetched = (t, event)
            h.slot.read = event

    # --- hooks ---
    def _pre(self, module, args):
        if not _in_backward():
            self._forward += 1
            self._block = 0
            self._groups = {g: refs for g, refs in self._groups.items() if any(r() is not None for r in refs)}
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._active.append(hooks)

    def _post(self, module, args, output):
        if self._active:  # always_call: also when the forward raised
            self._active.pop().__exit__(None, None, None)

    def _block_done(self, module, args, output):
        if self._active and not _in_backward():
            self._block += 1

    def pinned_bytes(self) -> int:
        """Host bytes of the ring (page-locked on a GPU): the sum of its buffers' sizes."""
        return self.ring.nbytes()

    def remove(self) -> None:
        """Uninstall the hooks and free the ring's buffers."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.ring.release()


def install_activation_offload(model: torch.nn.Module, device: torch.device | str,
                               log: list | None = None) -> ActivationOffload:
    """Offload what ``model``'s forward saves for backward (module docstring). Composes with
    :func:`~finetune.memory.blockswap.install_block_swap` (its parameters are left alone)."""
    off = ActivationOffload(model, device, log)
    off.handles.append(model.register_forward_pre_hook(off._pre))
    off.handles.append(model.register_forward_hook(off._post, always_call=True))
    for block in transformer_blocks(model):
        off.handles.append(block.register_forward_hook(off._block_done))
    return off
