"""Fitting big models in little memory: fp8 frozen weights quantised while loading
(:mod:`finetune.memory.fp8`) and quantised or CPU-resident text encoders for caching
(:mod:`finetune.memory.encoders`). Families contribute facts only; the machinery lives here."""
