"""Video LoRA fine-tuning: recipes, model families, cache, trainer, export, inference."""

from finetune import _quiet

_quiet.install()  # before diffusers, transformers or torchao load: their known harmless warnings stay back
