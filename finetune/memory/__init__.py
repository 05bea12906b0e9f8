"""Fitting big models in little memory: fp8 frozen weights quantised while loading
(:mod:`finetune.memory.fp8`), quantised or CPU-resident text encoders for caching
(:mod:`finetune.memory.encoders`), tiled VAE encoding and decoding (:mod:`finetune.memory.vae`),
validation renders with one model on the device at a time (:mod:`finetune.memory.render`), and
the planner that predicts peak memory per phase from the real architecture
(:mod:`finetune.memory.planner`). Families contribute facts only; the machinery lives here."""
