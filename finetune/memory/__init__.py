"""Fitting big models in little memory while training and planning: LoRA layers computing in the
activation dtype (:mod:`finetune.memory.lora`), block swap and activation offload through host
buffers of exactly their size (:mod:`finetune.memory.blockswap`, :mod:`finetune.memory.activations`,
:mod:`finetune.memory.pinned`, applied by :mod:`finetune.memory.runtime`), validation renders with
one model on the device at a time (:mod:`finetune.memory.render`), and the planner that predicts
peak memory per phase from the real architecture (:mod:`finetune.memory.planner`,
:mod:`finetune.memory.architecture`, :mod:`finetune.memory.trace`). It sits above the families,
whose facts the planner reads; what loading itself needs (fp8 weights, text-encoder placement, VAE
tiles, the float32 rules) lives below them in :mod:`finetune.weights`."""
