"""TREAD speed: LoRA training step time with and without TREAD on a mid-size FLUX.2, against the FLOP prediction.

The model is diffusers' Flux2Transformer2DModel with FLUX.2's block structure at reduced width (default
hidden 768 = 6 heads x 128, 2 double + 6 single blocks, joint_attention_dim 2.5 x hidden as on FLUX.2-dev),
random weights, built in-process, with an all-layers LoRA (rank 16) and AdamW. Both variants run the
trainer's own forward (trainer.blocks.apply_block_forward) on the same model and the same batch; only the
routes differ. A step is forward, MSE loss, backward and the optimizer step. After --warmup untimed
rounds, single steps of the two variants are timed interleaved (the order alternates every round), so the
noise of a shared machine hits both alike.

  measured_saving   1 - median(step with TREAD) / median(step without), in process CPU time on CPU (other
                    processes on a shared CPU inflate wall time; measured_saving_wall is reported too), in
                    wall time (synchronised) on CUDA
  predicted_saving  1 - FLOPs(with) / FLOPs(without), bench/flux2_flops.py (attention + linear FLOPs of the
                    routed and full blocks, text tokens included)
  ratio             measured_saving / predicted_saving (target >= 0.85)

Usage (from the repository root):
  python bench/tread_speed.py [--steps 3] [--warmup 1] [--image-tokens 1024] [--text-tokens 512]
                              [--ratio 0.5 --start 2 --end -2] [--threads N] [--device cpu|cuda]
Progress goes to stderr; the last stdout line is one JSON object. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
TARGET_RATIO = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of both variants first (default 1)")
    parser.add_argument("--image-tokens", type=int, default=1024, help="square number: 1024 = 512x512 px (default)")
    parser.add_argument("--text-tokens", type=int, default=512, help="text tokens (default 512, FLUX.2's maximum)")
    parser.add_argument("--heads", type=int, default=6, help="attention heads of 128 (default 6: hidden 768)")
    parser.add_argument("--double", type=int, default=2, help="double blocks (default 2)")
    parser.add_argument("--single", type=int, default=6, help="single blocks (default 6)")
    parser.add_argument("--ratio", type=float, default=0.5, help="TREAD selection_ratio: fraction routed around")
    parser.add_argument("--start", type=int, default=2, help="TREAD start_layer_idx (default 2)")
    parser.add_argument("--end", type=int, default=-2, help="TREAD end_layer_idx (default -2)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                        help="torch intra-op threads on CPU (default: $OMP_NUM_THREADS or 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    side = math.isqrt(args.image_tokens)
    if side * side != args.image_tokens:
        parser.error(f"--image-tokens {args.image_tokens} must be a square number (e.g. 1024 for 32x32 tokens)")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --batch and --threads must be >= 1 and --warmup >= 0")
    return args


def log(message: str) -> None:
    print(f"[tread_speed] {message}", file=sys.stderr, flush=True)


def model_config(*, heads: int, double: int, single: int) -> dict:
    hidden = heads * 128
    return dict(patch_size=1, in_channels=128, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=heads, joint_attention_dim=int(2.5 * hidden), timestep_guidance_channels=256,
                mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from diffusers import Flux2Transformer2DModel
    from flux2_flops import Shape, step_flops

    from trainer import blocks, flux2, tread
    from trainer.config import TreadConfig
    from trainer.lora import apply_lora

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = model_config(heads=args.heads, double=args.double, single=args.single)
    model = Flux2Transformer2DModel(**config).to(device)
    apply_lora(model, preset="all", rank=args.rank, alpha=args.rank)
    model.train()
    shape = Shape.from_config(config)
    routes = tread.plan_routes(TreadConfig.from_dict({"routes": [
        {"selection_ratio": args.ratio, "start_layer_idx": args.start, "end_layer_idx": args.end}]}),
        num_blocks=shape.num_blocks)
    # Both variants use the routed processors on the route's blocks: only the token count differs.
    blocks.apply_block_forward(model, routes=routes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    side, b = math.isqrt(args.image_tokens), args.batch
    g = torch.Generator().manual_seed(args.seed)
    inputs = dict(
        hidden_states=torch.randn(b, args.image_tokens, 128, generator=g).to(device),
        encoder_hidden_states=torch.randn(b, args.text_tokens, config["joint_attention_dim"], generator=g).to(device),
        timestep=torch.rand(b, generator=g).to(device), guidance=torch.full((b,), 3.5, device=device),
        img_ids=flux2.image_position_ids(b, side, side).to(device),
        txt_ids=flux2.text_position_ids(b, args.text_tokens).to(device),
    )
    target = torch.randn(b, args.image_tokens, 128, generator=g).to(device)

    def step(variant: str, index: int) -> float:
        blocks.apply_block_forward(model, routes=routes if variant == "tread" else ())
        extra = {}
        if variant == "tread":
            extra = {"tread_generators": [torch.Generator().manual_seed(1000 * index + i) for i in range(b)]}
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, started_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        pred = model(**inputs, return_dict=False, **extra)[0]
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, time.process_time() - started_cpu

    wall: dict[str, list[float]] = {"off": [], "tread": []}
    cpu: dict[str, list[float]] = {"off": [], "tread": []}
    for round_index in range(args.warmup + args.steps):
        order = ("off", "tread") if round_index % 2 == 0 else ("tread", "off")
        for variant in order:
            seconds, cpu_seconds = step(variant, round_index)
            if round_index >= args.warmup:
                wall[variant].append(seconds)
                cpu[variant].append(cpu_seconds)
        if round_index >= args.warmup:
            log(f"round {round_index + 1}/{args.warmup + args.steps}: "
                + ", ".join(f"{v} {wall[v][-1]:.2f}s wall {cpu[v][-1]:.2f}s cpu" for v in order))

    kept = tread.kept_count(args.image_tokens, selection_ratio=args.ratio)
    flops_off = step_flops(shape, image_tokens=args.image_tokens, text_tokens=args.text_tokens, lora_rank=args.rank,
                           batch=b)["model"]
    flops_tread = step_flops(shape, image_tokens=args.image_tokens, text_tokens=args.text_tokens, lora_rank=args.rank,
                             batch=b, routes=tuple((r.start, r.end, kept) for r in routes))["model"]
    predicted = 1.0 - flops_tread / flops_off
    # On a CPU shared with other processes, wall time also counts time the scheduler gave to them; the process's
    # CPU time counts only this step's work, so it is the primary figure there (both are reported).
    times = cpu if device.type == "cpu" else wall
    off, on = statistics.median(times["off"]), statistics.median(times["tread"])
    measured = 1.0 - on / off
    wall_saving = 1.0 - statistics.median(wall["tread"]) / statistics.median(wall["off"])
    result = {
        "bench": "tread_speed", "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "threads": args.threads if device.type == "cpu" else None, "torch": torch.__version__,
        "hidden": shape.hidden, "double_blocks": shape.num_double, "single_blocks": shape.num_single,
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "batch": b, "lora_rank": args.rank,
        "route": {"selection_ratio": args.ratio, "start_layer_idx": args.start, "end_layer_idx": args.end,
                  "blocks": [[r.start, r.end] for r in routes], "kept_image_tokens": kept},
        "steps": args.steps, "timer": "process_time" if device.type == "cpu" else "perf_counter",
        "wall_s_off": wall["off"], "wall_s_tread": wall["tread"], "cpu_s_off": cpu["off"], "cpu_s_tread": cpu["tread"],
        "median_s_off": off, "median_s_tread": on, "measured_saving_wall": wall_saving,
        "gflop_step_off": flops_off / 1e9, "gflop_step_tread": flops_tread / 1e9,
        "measured_saving": measured, "predicted_saving": predicted, "ratio": measured / predicted,
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
