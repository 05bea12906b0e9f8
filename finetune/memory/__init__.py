"""Fitting big models in little memory: fp8 frozen weights quantised while loading, whose linears
keep only the fp8 weight for backward (:mod:`finetune.memory.fp8`), LoRA layers computing in the
activation dtype (:mod:`finetune.memory.lora`), block swap and activation offload through host
buffers of exactly their size (:mod:`finetune.memory.blockswap`, :mod:`finetune.memory.activations`,
:mod:`finetune.memory.pinned`), quantised or CPU-resident text encoders for caching
(:mod:`finetune.memory.encoders`), tiled VAE encoding and decoding (:mod:`finetune.memory.vae`),
validation renders with one model on the device at a time (:mod:`finetune.memory.render`), and
the planner that predicts peak memory per phase from the real architecture
(:mod:`finetune.memory.planner`). Families contribute facts only; the machinery lives here."""
