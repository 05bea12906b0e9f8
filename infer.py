"""Render a video with a base model and trained LoRA adapters.

    python infer.py --lora runs/my-style --prompt "a fox in the snow, mystyle" --out fox.mp4
    python infer.py --lora runs/my-style:0.8 --lora runs/other:0.5 --merge --save-merged merged/ --prompt "..."
    python infer.py --base runs/my-style --prompt "..." --out base.mp4      # the base model alone
    python infer.py --lora runs/my-i2v --image first_frame.png --prompt "..."  # image-to-video adapters
    python infer.py --lora runs/my-continue --video start.mp4 --prompt "..."   # video continuation adapters
    python infer.py --lora civitai_lora.safetensors:0.8 --family wan --frames 33 --height 480 --width 832 --prompt "..."

The base model and family are read from each run folder's video_lora.json, or from a LoRA file's
metadata; a LoRA file from another tool (ComfyUI, kohya/musubi or diffusers naming) needs --family.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.allocator import configure_cuda_allocator

configure_cuda_allocator()  # before anything imports torch: CUDA reads it once, when it starts

from finetune.cli import add_verbose_flag, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", default=[], metavar="DIR_OR_FILE[:SCALE]",
                   help="run folder or LoRA .safetensors file, repeatable")
    p.add_argument("--family", help="model family of LoRA files that do not record it (wan, ltx, ...)")
    p.add_argument("--base-model", help="Hub id or folder of the base model for such files; default: the family's")
    p.add_argument("--base", type=Path, help="run folder whose base model to use without its adapter")
    p.add_argument("--merge", action="store_true", help="fuse the adapters into the base weights")
    p.add_argument("--save-merged", type=Path, metavar="DIR", help="write the merged pipeline (implies --merge)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, help="first frame (i2v adapters; an error for others)")
    p.add_argument("--video", type=Path, help="video to continue from its last frames (continue adapters)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, help="default: the training recipe's")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights and computation; auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--out", type=Path, default=Path("out.mp4"))
    add_verbose_flag(p)
    args = p.parse_args(argv)

    import torch  # heavy imports after argument parsing

    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render_to_file
    from finetune.trainer import compute_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loras = [LoraRef.parse(s) for s in args.lora]
    family, info = load_base(loras, args.base, device, compute_dtype(args.dtype, device), family=args.family,
                             base_model=args.base_model)
    pipe = family.pipeline()
    apply_loras(family, loras, merge=args.merge or args.save_merged is not None)
    if args.save_merged:
        pipe.save_pretrained(str(args.save_merged))
        print(f"merged model: {args.save_merged}")
    render_args = RenderArgs(prompt=args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                             height=args.height, width=args.width, fps=args.fps, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, image=args.image,
                             video=args.video)
    out = render_to_file(family, pipe, complete_args(render_args, family, info), args.out)
    print(f"video: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
