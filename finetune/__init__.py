"""Video LoRA fine-tuning: recipes, model families, cache, trainer, export, inference."""
