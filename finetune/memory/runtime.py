"""The memory settings that act while training runs (``memory.blocks_to_swap``,
``memory.activation_offload``), applied to each trained transformer in one call from the trainer.

They stay installed after training: validation renders and anything that renders with the
returned model stream the same blocks (under ``torch.no_grad`` a swapped block is evicted right
after its forward) and save nothing for backward, so activation offload has nothing to do there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.config import MemoryConfig
from finetune.memory.activations import ActivationOffload, install_activation_offload
from finetune.memory.blockswap import BlockSwap, install_block_swap


@dataclass
class MemoryRuntime:
    """What :func:`apply` installed, per transformer attribute name."""

    swaps: dict[str, BlockSwap] = field(default_factory=dict)
    offloads: dict[str, ActivationOffload] = field(default_factory=dict)

    def pinned_bytes(self) -> int:
        """Host bytes held for the copies (page-locked on a GPU, plain memory on a CPU): every
        swapped block's packed buffer and every activation-offload ring, each exactly the size
        of what it holds (finetune/memory/pinned.py)."""
        return sum(h.pinned_bytes() for h in [*self.swaps.values(), *self.offloads.values()])

    def remove(self) -> None:
        """Uninstall everything (swapped weights come back to the device)."""
        for h in [*self.swaps.values(), *self.offloads.values()]:
            h.remove()
        self.swaps.clear()
        self.offloads.clear()


def transformer_device(memory: MemoryConfig, device: torch.device | str) -> torch.device:
    """Where the transformers load: host memory under block swap (the swapped blocks must never
    be on the card all at once; :func:`apply` and then accelerate move the rest), else ``device``."""
    return torch.device("cpu") if memory.blocks_to_swap else torch.device(device)


def apply(memory: MemoryConfig, transformers: dict[str, torch.nn.Module], device: torch.device | str,
          log: list | None = None) -> MemoryRuntime:
    """Install block swap and activation offload on each of ``transformers`` (attribute name ->
    model, LoRA already added) as ``memory`` says, then move them to ``device`` (the swapped
    blocks' weights stay in host memory). Raises BlockSwapError (too many blocks, weights that
    cannot stream)."""
    out = MemoryRuntime()
    for name, model in transformers.items():
        if memory.blocks_to_swap:
            out.swaps[name] = install_block_swap(model, memory.blocks_to_swap, device, what=name, log=log)
            model.to(device)
        if memory.activation_offload:
            out.offloads[name] = install_activation_offload(model, device, log=log)
    return out


def limit_vram(gb: float, device: torch.device | str) -> None:
    """Let this process's CUDA caching allocator use at most ``gb`` GiB of ``device`` (a smaller
    card on a larger one: what does not fit fails as out of memory). Raises UserError without a
    GPU or for more than the card has."""
    from finetune.errors import UserError

    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"--limit-vram {gb:g}: limits a CUDA GPU's memory, and this run has none")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gb * 2**30 > total:
        raise UserError(f"--limit-vram {gb:g}: the card has only {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gb * 2**30 / total, index)
