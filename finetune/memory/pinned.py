"""Host memory of exactly the size asked for, page-locked on a GPU machine, for the copies of
block swap (:mod:`finetune.memory.blockswap`) and activation offload
(:mod:`finetune.memory.activations`).

Why not ``pin_memory=True``: pinned tensors come from torch's caching host allocator, which rounds
every request up to a power of two and keeps it (29 swapped Wan 14B blocks took ~14.5 GiB of pinned
RAM instead of 9.5; every 320 MiB block input offloaded took 512 MiB). Here each buffer is plain
host memory from torch's CPU allocator, exactly as large as asked, page-locked with
``cudaHostRegister`` (``torch.cuda.cudart()``, as torch's own checkpoint stager does) and
unregistered when released. On a machine without CUDA (the tests) the same buffers are plain
memory and every other step runs the same.

  :func:`pack`      one buffer per swapped block: its frozen tensors copied in, each a view at an
                    offset aligned to :data:`ALIGN` bytes (a single host -> device copy per block)
  :class:`HostRing` reused buffers for offloaded activations: taken first-fit, allocated on first
                    use, grown only when a larger tensor comes, given back when the saved tensor
                    they hold is released (so step 2 reuses step 1's buffers, in the same order)
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

# Offset alignment of the tensors packed in one block buffer: dtype views need their element size,
# and GPU kernels (cuBLAS, vectorised loads) want 16 bytes or more; 256 costs < 256 B a tensor.
ALIGN = 256
PAGE = mmap.PAGESIZE


def _register(t: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0))
    if err != 0:
        raise RuntimeError(f"page-locking {t.numel() / 2**20:.1f} MiB of host memory for block swap / activation "
                           f"offload failed (cudaHostRegister: cudaError {err}); the machine may be short of RAM: "
                           f"lower memory.blocks_to_swap or set memory.activation_offload=false")


def _unregister(t: torch.Tensor) -> None:
    # ``t`` is passed (not just its address) so the memory cannot be freed while still registered.
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class HostBuffer:
    """``nbytes`` of host memory, ``data`` (uint8 [nbytes]); page-locked when ``pin`` (a CUDA
    machine) until :meth:`release` or until the buffer is garbage collected. A locked buffer
    starts on a page of its own and locks whole pages (under 4 KiB more than ``nbytes``):
    ``cudaHostRegister`` works on pages, and two registrations sharing a page would fail."""

    def __init__(self, nbytes: int, pin: bool):
        self.pinned = bool(pin and nbytes)
        self._finalizer = None
        if not self.pinned:
            self.data = torch.empty(nbytes, dtype=torch.uint8)
            return
        locked = -(-nbytes // PAGE) * PAGE
        base = torch.empty(locked + PAGE, dtype=torch.uint8)
        start = -base.data_ptr() % PAGE
        pages = base[start:start + locked]
        self.data = pages[:nbytes]
        _register(pages)
        self._finalizer = weakref.finalize(self, _unregister, pages)
        self._finalizer.atexit = False  # the CUDA context may already be gone at exit

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def release(self) -> None:
        """Unpin (the memory itself goes when no view of it is left)."""
        if self._finalizer is not None:
            self._finalizer()


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Packed:
    """Tensors packed into one :class:`HostBuffer`: ``hosts[i]`` is a view of ``buffer.data`` at
    ``offsets[i]`` with tensor i's shape and dtype (contiguous)."""

    buffer: HostBuffer
    offsets: list[int]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    hosts: list[torch.Tensor] = field(default_factory=list)

    def views(self, data: torch.Tensor) -> list[torch.Tensor]:
        """The packed tensors as views of ``data`` (uint8, this buffer's size, on any device: the
        buffer itself or its device copy)."""
        return [data[o:o + s.numel() * d.itemsize].view(d).view(s)
                for o, s, d in zip(self.offsets, self.shapes, self.dtypes)]


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets (multiples of :data:`ALIGN`) of ``tensors`` packed one after another, and the
    total bytes: the exact size of their buffer."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += aligned(nbytes(t))
    return offsets, total


def pack(tensors: list[torch.Tensor], pin: bool) -> Packed:
    """Copy ``tensors`` (any devices) into one new host buffer of exactly :func:`layout`'s size;
    returns it with the views."""
    offsets, total = layout(tensors)
    out = Packed(HostBuffer(total, pin), offsets, [t.shape for t in tensors], [t.dtype for t in tensors])
    out.hosts = out.views(out.buffer.data)
    for host, t in zip(out.hosts, tensors):
        host.copy_(t.detach())
    return out


# ---------------------------------------------------------------------------- the ring


@dataclass
class RingSlot:
    """One reusable host buffer of a :class:`HostRing`. ``written`` / ``read``: CUDA events of
    the last device -> host copy into it and of the last host -> device copy out of it (None on a
    CPU), which a new copy into it must follow."""

    buffer: HostBuffer
    busy: bool = False
    written: Any = None
    read: Any = None

    def settle(self) -> None:
        """Wait (on the host) for the copies in flight; before the memory is freed."""
        for event in (self.written, self.read):
            if event is not None:
                event.synchronize()


class HostRing:
    """Host buffers reused step after step (module docstring); ``pin``: page-locked (CUDA)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.slots: list[RingSlot] = []

    def take(self, n: int) -> RingSlot:
        """A free slot of at least ``n`` bytes, marked busy: the first free one that is large
        enough; else the largest free one, grown to ``n``; else a new one of ``n`` bytes."""
        free = [s for s in self.slots if not s.busy]
        slot = next((s for s in free if s.buffer.nbytes >= n), None)
        if slot is None and free:
            slot = max(free, key=lambda s: s.buffer.nbytes)
            slot.settle()
            slot.buffer.release()
            slot.buffer = HostBuffer(n, self.pin)
            slot.written = slot.read = None
        if slot is None:
            slot = RingSlot(HostBuffer(n, self.pin))
            self.slots.append(slot)
        slot.busy = True
        return slot

    def nbytes(self) -> int:
        """Host bytes the ring holds (pinned on a GPU machine): the sum of its buffers' sizes."""
        return sum(s.buffer.nbytes for s in self.slots)

    def release(self) -> None:
        """Free every buffer (after their copies finish)."""
        for s in self.slots:
            s.settle()
            s.buffer.release()
        self.slots.clear()
