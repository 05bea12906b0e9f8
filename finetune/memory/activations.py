"""Activation offload (``memory.activation_offload: true``): what the transformer's forward keeps
for backward waits in host memory (pinned on a GPU) instead of on the card.

With gradient checkpointing (PyTorch's non-reentrant checkpoint, which every family's
``enable_gradient_checkpointing`` uses) a block keeps only its inputs: the checkpoint saves them
through the saved-tensor hooks that are active *around* it, before it installs its own hooks for
the block's inside. So our hooks, active for the whole transformer forward, receive exactly the
checkpointed block inputs (plus the few tensors saved outside the blocks: patch embedding, output
projection), and backward's recomputation of block i unpacks its inputs, copying them back, right
before it runs. Without checkpointing every tensor a block saves passes through them.

Parameters are never offloaded (frozen weights would otherwise travel device -> host every step;
block swap streams those, see :mod:`finetune.memory.blockswap`), nor are tensor subclasses
(quantised weights). Hand-written rather than ``torch.autograd.graph.save_on_cpu`` for that one
rule: ``save_on_cpu`` copies every saved tensor, parameters included.

Copies: device -> pinned host with ``non_blocking`` on the compute stream when packing, and back
with ``non_blocking`` when unpacking (stream-ordered, so no host synchronisation; not overlapped
with compute). On a CPU (the tests) both are plain clones, run in the same places. ``log``, if
given, receives ``("offload", shape)`` and ``("restore", shape)``.
"""

from __future__ import annotations

import torch


class ActivationOffload:
    """Saved-tensor hooks active during each forward of ``model`` (installed by
    :func:`install_activation_offload`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str, log: list | None = None):
        self.model = model
        self.pin = torch.device(device).type == "cuda"
        self.log = log
        self.handles: list = []
        self._active: list = []

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor or t.numel() == 0:
            return t
        # the same strides where they are dense (a transposed weight-like view stays transposed, so
        # backward runs the same kernels and rounds the same); contiguous for an expanded view
        host = torch.empty_like(t, device="cpu", pin_memory=self.pin and t.is_cuda)
        host.copy_(t, non_blocking=self.pin and t.is_cuda)
        if self.log is not None:
            self.log.append(("offload", tuple(t.shape)))
        return t.device, host

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        device, host = packed
        if self.log is not None:
            self.log.append(("restore", tuple(host.shape)))
        return host.to(device, copy=True, non_blocking=host.is_pinned())

    def _pre(self, module, args):
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._active.append(hooks)

    def _post(self, module, args, output):
        if self._active:  # always_call: also when the forward raised
            self._active.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def install_activation_offload(model: torch.nn.Module, device: torch.device | str,
                               log: list | None = None) -> ActivationOffload:
    """Offload what ``model``'s forward saves for backward (module docstring). Composes with
    :func:`~finetune.memory.blockswap.install_block_swap` (its parameters are left alone)."""
    off = ActivationOffload(model, device, log)
    off.handles.append(model.register_forward_pre_hook(off._pre))
    off.handles.append(model.register_forward_hook(off._post, always_call=True))
    return off
