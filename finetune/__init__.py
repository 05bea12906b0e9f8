"""Video LoRA fine-tuning: recipes, model families, cache, trainer, export, inference."""

from finetune._quiet import quiet_torchao

quiet_torchao()
