"""How frozen weights are stored and placed as a model loads, below the families that load them:
fp8 block weights quantised while loading (:mod:`finetune.weights.fp8`), the dtype each parameter
keeps (:mod:`finetune.weights.dtypes`), text encoders quantised or kept on the CPU for caching
(:mod:`finetune.weights.encoders`) and tiled VAE encoding and decoding (:mod:`finetune.weights.vae`).

The layers import downwards only: ``finetune.families`` imports this package, and
``finetune.memory`` (runtime offload and the planner) imports both; nothing here imports either
(tests/test_layers.py)."""
