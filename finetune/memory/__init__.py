"""Fitting big models in little memory: fp8 frozen weights quantised while loading
(:mod:`finetune.memory.fp8`) and quantised or CPU-resident text encoders for caching
(:mod:`finetune.memory.encoders`). Families contribute facts only; the machinery lives here."""

import logging

# With torchao installed, transformers imports it whenever it loads a model; its import warns
# about each CUDA kernel library it cannot open (all of them on a machine without CUDA). The
# weight-only storage used here needs none of them, so say so once by holding those back, unless
# the user configured torchao's logger.
if logging.getLogger("torchao").level == logging.NOTSET:
    logging.getLogger("torchao").setLevel(logging.ERROR)
