"""One LoRA training step of the Wan 2.1 transformer with random weights: seconds per step and
peak memory of gradient checkpointing, block swap (``memory.blocks_to_swap``, --swap blocks) and
activation offload (``memory.activation_offload``) against the baseline with none of them, in
the same run.

    python bench/train_step.py                      # full-size Wan 2.1 1.3B, 832x480x81, bf16 (GPU)
    python bench/train_step.py --size tiny          # the tiny test model on a CPU (sanity check)

Each configuration runs in its own process so peak memory is its own. The step is the trainer's
own code (add_lora, denoising_loss through the family protocol), on random latents and text
embeddings of the real shapes: [1, 16, 21, 60, 104] latents and [1, 512, 4096] umT5 states.
Prints a table: config, seconds per step (median of --steps after one warm-up), peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# WanTransformer3DModel config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


# name -> (gradient checkpointing, swap blocks, activation offload); the first is the baseline
CONFIGS = {"off": (False, False, False), "ckpt": (True, False, False), "ckpt+swap": (True, True, False),
           "ckpt+offload": (True, False, True), "ckpt+swap+offload": (True, True, True)}


def one_config(size: str, config: str, swap: int, frames: int, height: int, width: int, steps: int) -> dict:
    import torch

    from finetune.config import MemoryConfig, recipe_from_dict
    from finetune.memory import runtime
    from finetune.families import get_family
    from finetune.families.base import Components, ModelSpec
    from finetune.trainer import add_lora, denoising_loss, peak_memory_gb

    checkpointing, swapping, offload = CONFIGS[config]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cls = get_family("wan")
    torch.manual_seed(0)
    # built in host memory, as the trainer loads under block swap; runtime.apply moves it
    if size == "full":
        import diffusers

        transformer = diffusers.WanTransformer3DModel(**WAN_1_3B).to(dtype)
        text_len, text_dim = 512, WAN_1_3B["text_dim"]
    else:
        transformer = cls.build_tiny().transformer.to(dtype)
        text_len, text_dim = 64, transformer.config.text_dim
    family = cls(Components(transformer, None, None, None, None), ModelSpec(pretrained="random", dtype=dtype))
    recipe = recipe_from_dict({"model": {"family": "wan"}, "data": {"frames": frames, "height": height, "width": width},
                               "lora": {"rank": 32, "alpha": 32}})
    transformer.requires_grad_(False)
    params = add_lora(transformer, recipe)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    memory = MemoryConfig(blocks_to_swap=swap if swapping else 0, activation_offload=offload)
    runtime.apply(memory, {"transformer": transformer}, device)
    transformer.to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=device, dtype=dtype)
    batch = {"latents": latents, "prompt_embeds": torch.randn(1, text_len, text_dim, device=device, dtype=dtype)}
    times = []
    for _ in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = denoising_loss(family, transformer, batch, torch.rand(1, device=device), torch.randn_like(latents), 16.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(times[1:]), "peak_memory_gb": peak_memory_gb(device),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--swap", type=int, default=None, help="blocks to swap (default: 20 of 30 full-size, 1 of 2 tiny)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = p.parse_args()
    if args.size == "tiny" and (args.height, args.width, args.frames) == (480, 832, 81):
        args.frames, args.height, args.width = 9, 32, 32
    swap = args.swap if args.swap is not None else (20 if args.size == "full" else 1)
    if args.one is not None:
        print(json.dumps(one_config(args.size, args.one, swap, args.frames, args.height, args.width, args.steps)))
        return 0
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--size", args.size, "--frames", str(args.frames), "--height",
               str(args.height), "--width", str(args.width), "--steps", str(args.steps), "--swap", str(swap),
               "--one", config]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            rows.append((config, None, res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"))
        else:
            rows.append((config, json.loads(res.stdout.strip().splitlines()[-1]), ""))
    device = next((r[1]["device"] for r in rows if r[1]), "?")
    print(f"Wan 2.1 {args.size} transformer, LoRA r32, {args.frames}x{args.height}x{args.width}, device {device}; "
          f"swap = the last {swap} blocks")
    print(f"{'memory settings':<24}{'s/step':>10}{'peak GB':>10}{'vs baseline':>14}")
    base = rows[0][1]
    for name, r, err in rows:
        if r is None:
            print(f"{name:<24}{'failed: ' + err}")
            continue
        rel = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x time" if base else ""
        print(f"{name + (' (baseline)' if name == 'off' else ''):<24}{r['seconds_per_step']:>10.3f}"
              f"{r['peak_memory_gb']:>10.2f}{rel:>14}")
    print("peak memory: torch.cuda.max_memory_allocated on a GPU; whole-process max RSS on a CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
