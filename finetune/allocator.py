"""The CUDA caching allocator setting of training and rendering runs.

``expandable_segments:True`` lets the allocator grow a segment in place instead of reserving a new
one of each odd size: with block swap's and activation offload's buffers of many sizes coming and
going, fixed segments fragment (the first 16 GiB GPU run failed a 320 MiB allocation with about
1.1 GiB reserved but unused). The allocator reads ``PYTORCH_CUDA_ALLOC_CONF`` once, when CUDA
starts, so the entry scripts call :func:`configure_cuda_allocator` before anything imports torch.
A user's own ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``, its device-generic name) is
kept as it is. No torch import here, on purpose.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT = "expandable_segments:True"


def configure_cuda_allocator(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` in ``environ`` unless the user
    set it or ``PYTORCH_ALLOC_CONF``; returns the setting in force (None: torch's defaults)."""
    if VARIABLE in environ or "PYTORCH_ALLOC_CONF" in environ:
        return environ.get(VARIABLE, environ.get("PYTORCH_ALLOC_CONF"))
    environ[VARIABLE] = DEFAULT
    return DEFAULT
