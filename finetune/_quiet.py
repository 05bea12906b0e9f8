"""Third-party import noise that says nothing to a user of this tool."""

from __future__ import annotations

import logging


def quiet_torchao() -> None:
    """With torchao installed, transformers imports it whenever it loads a model. Its import warns
    about each CUDA kernel library it cannot open (all of them without CUDA) and registers enums
    that torch's pytree logs as deprecated; the weight-only fp8 storage used here needs none of
    those kernels. Hold both back, unless the user configured those loggers."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
