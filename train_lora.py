"""Train a video LoRA from a recipe.

    accelerate launch train_lora.py --recipe recipes/wan/t2v-1.3b_24gb.yaml \
        data.manifest=my_clips/manifest.jsonl output.dir=runs/my-style [--resume latest]

Any ``section.key=value`` after the recipe overrides it. The recipe is validated before any
weights load; the resolved recipe is written to ``<output.dir>/recipe.yaml``.

    python train_lora.py --plan --recipe recipes/wan/i2v-14b_16gb.yaml [--vram 16]

prints the predicted peak memory per phase (no weights load, offline) and, for a card of
``--vram`` GiB (or ``memory.vram_gb``), the cheapest overrides that fit. ``memory.auto: true``
applies those overrides before training.
"""

from __future__ import annotations

import argparse
import sys

from finetune.allocator import configure_cuda_allocator

configure_cuda_allocator()  # before anything imports torch: CUDA reads it once, when it starts

from finetune.cli import add_verbose_flag, run_main  # noqa: E402
from finetune.config import load_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/wan/t2v-1.3b_24gb.yaml")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to continue from")
    parser.add_argument("--plan", action="store_true", help="print the memory plan and exit (no weights load)")
    parser.add_argument("--vram", default=None, help="card memory in GiB to plan for (default: memory.vram_gb)")
    parser.add_argument("--limit-vram", type=float, default=None, metavar="GIB",
                        help="use at most this much of the GPU, as a smaller card would (measuring a budget)")
    add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=5e-5")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan or recipe.memory.auto:
        from finetune.memory.planner import run_planner

        recipe = run_planner(recipe, args.recipe, args.vram, apply=not args.plan)
        if args.plan:
            return 0

    from finetune.memory.planner import check_blocks_to_swap, check_implemented
    from finetune.trainer import train  # heavy imports only after the recipe is known to be valid

    check_implemented(recipe)
    check_blocks_to_swap(recipe)  # from the full-size config on the meta device, before any weight loads

    result = train(recipe, resume=args.resume, limit_vram_gb=args.limit_vram)
    if result.adapter.is_file():
        print(f"adapter:     {result.adapter}")
        print(f"tensorboard: tensorboard --logdir {result.run_dir / 'logs'}")
        print(f"render:      python infer.py --lora {result.run_dir} --prompt \"...\" --out out.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
