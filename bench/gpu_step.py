"""GPU step: LoRA training steps on a full-width FLUX.2 slice, with and without TREAD and checkpointing: time, MFU, VRAM.

The model is diffusers' Flux2Transformer2DModel at FLUX.2-dev's width (hidden 6144 = 48 heads x 128,
joint_attention_dim 15360, mlp_ratio 3) with fewer blocks (default 2 double + 4 single of dev's 8 + 48),
random bf16 weights built on the GPU, an all-layers LoRA (rank 16, fp32 weights, bf16 autocast as the
trainer runs it) and AdamW. A step is the trainer's forward (trainer.blocks.apply_block_forward), MSE
loss, backward and the optimizer step on a 1024x1024 image: 4096 image + 512 text tokens. Variants, timed
interleaved one step at a time after --warmup untimed rounds:

  off          no TREAD, no checkpointing
  tread        TREAD selection_ratio 0.5 over blocks 2..-2 (SimpleTuner's indices)
  ckpt         gradient checkpointing of every block
  tread_ckpt   both
  ckpt_half    checkpointing of every other block (gradient_checkpointing_interval 2)
  ckpt_attn    checkpointing of every block keeping attention outputs (gradient_checkpointing_save_attention:
               trainer/checkpointing.py); its HFU counts the whole recompute, an upper bound

--precisions adds the base precisions each variant runs at (trainer/lowp_compute.py): "no_change" (bf16 base,
the default), "fp8-torchao" (float8 matmuls of the block Linears, compute capability >= 8.9) and "int8-torchao"
(int8 weights x dynamic int8 activations). Each precision gets its own model built from the same seed (the same
weights and LoRA init), optimizer and inputs; a variant at a precision other than no_change is named
"<variant>@<precision>". Each also reports its loss at every step (loss_curve, warm-up included) and the relative
difference of its eval output from the bf16 model's (output_rel_diff_vs_bf16). MFU counts bf16-equivalent FLOPs
against the bf16 peak for every precision, so an fp8 or int8 step that is faster shows as a higher MFU.
--variants picks the modes (default the first four). The variants of one precision share its model and optimizer, so for
a loss curve per precision run one mode: --variants off --precisions no_change,fp8-torchao,int8-torchao --steps 50.
--flavour klein-4b / klein-9b builds the slice at FLUX.2 [klein]'s width (3072 / 4096, no guidance embedding) instead of
dev's. --compile adds a compiled twin of every run, "<run>+compile": its own model from the same seed whose block classes
are compiled with torch.compile (trainer/compile_blocks.py, backend --compile-backend, default inductor); its warm-up
steps include the compilation (compile_warmup_s), and each eager run reports compile_speedup (its median step time
over its twin's).

MFU = model FLOPs (bench/flux2_flops.py: linear + attention + LoRA, forward + backward, each forward once)
/ median step time / the card's dense bf16 peak (trainer.throughput.GPU_PEAKS, bench/GPU_THROUGHPUT.md;
--peak-tflops for others).
HFU also counts the forwards that checkpointing recomputes. Peak VRAM is torch.cuda.max_memory_allocated
over each variant's steps.

Usage (from the repository root):  python bench/gpu_step.py
  --dry-run             print the FLOP counts only (no GPU needed)
  --device cpu --heads 1 --image-tokens 64 --text-tokens 16   run the same code small, on CPU (a smoke check; fp8
                        runs torchao's emulation there)
The last stdout line is one JSON object. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


VARIANTS = ("off", "tread", "ckpt", "tread_ckpt", "ckpt_half", "ckpt_attn")
DEFAULT_VARIANTS = VARIANTS[:4]
PRECISIONS = ("no_change", "fp8-torchao", "int8-torchao")


def run_names(args: argparse.Namespace) -> list[tuple[str, str, str, bool]]:
    """(name, mode, precision, compiled) of every timed run: mode alone at no_change, mode@precision otherwise,
    then "+compile" for the compiled twins (--compile)."""
    names = [(mode if precision == "no_change" else f"{mode}@{precision}", mode, precision)
             for precision in args.precisions for mode in args.variants]
    return [(n + ("+compile" if compiled else ""), m, p, compiled)
            for compiled in ((False, True) if args.compile else (False,)) for n, m, p in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds of every variant first (default 2)")
    parser.add_argument("--image-tokens", type=int, default=4096, help="square number (default 4096: 1024x1024 px)")
    parser.add_argument("--text-tokens", type=int, default=512, help="default 512")
    parser.add_argument("--flavour", default="dev", choices=("dev", "klein-4b", "klein-9b"),
                        help="whose width the slice has (trainer/flavours.py): dev (hidden 6144, the default), "
                             "klein-9b (4096) or klein-4b (3072, no guidance embedding)")
    parser.add_argument("--heads", type=int, default=None, help="heads of 128 (default: the flavour's, dev 48)")
    parser.add_argument("--double", type=int, default=2, help="double blocks (default 2)")
    parser.add_argument("--single", type=int, default=4, help="single blocks (default 4)")
    parser.add_argument("--joint-attention-dim", type=int, default=None, help="default: the flavour's (dev 15360)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--ratio", type=float, default=0.5, help="TREAD selection_ratio (default 0.5)")
    parser.add_argument("--start", type=int, default=2, help="TREAD start_layer_idx (default 2)")
    parser.add_argument("--end", type=int, default=-2, help="TREAD end_layer_idx (default -2)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a small smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card, if not detected")
    parser.add_argument("--dry-run", action="store_true", help="print FLOP counts and exit (no GPU)")
    parser.add_argument("--time-budget-s", type=float, default=150.0,
                        help="stop starting timed rounds after this many seconds since the build began (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="also time a compiled twin of every run")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--precisions", default="no_change",
                        help=f"comma list of base precisions: {', '.join(PRECISIONS)} (default no_change)")
    args = parser.parse_args(argv)
    from trainer.flavours import SPECS

    spec = SPECS[args.flavour].transformer
    args.heads = args.heads or spec["num_attention_heads"]
    args.joint_attention_dim = args.joint_attention_dim or spec["joint_attention_dim"]
    args.guidance_embeds = spec["guidance_embeds"]
    args.variants = [v for v in args.variants.split(",") if v]
    args.precisions = [p for p in args.precisions.split(",") if p]
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants must be a comma list of {list(VARIANTS)}, got {args.variants}")
    if not args.precisions or set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions must be a comma list of {list(PRECISIONS)}, got {args.precisions}")
    if math.isqrt(args.image_tokens) ** 2 != args.image_tokens:
        parser.error(f"--image-tokens {args.image_tokens} must be a square number")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def log(message: str) -> None:
    print(f"[gpu_step] {message}", file=sys.stderr, flush=True)


def model_config(args: argparse.Namespace) -> dict:
    return dict(patch_size=1, in_channels=128, num_layers=args.double, num_single_layers=args.single,
                attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=args.joint_attention_dim,
                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                eps=1e-6, guidance_embeds=args.guidance_embeds)


def variant_flops(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from flux2_flops import Shape, step_flops

    from trainer import tread

    shape = Shape.from_config(model_config(args))
    routes = plan(args, num_blocks=shape.num_blocks)
    kept = tread.kept_count(args.image_tokens, selection_ratio=args.ratio)
    common = dict(image_tokens=args.image_tokens, text_tokens=args.text_tokens, lora_rank=args.rank)
    routed = tuple((r.start, r.end, kept) for r in routes)
    return {
        "off": step_flops(shape, **common),
        "tread": step_flops(shape, **common, routes=routed),
        "ckpt": step_flops(shape, **common, checkpoint_every=1),
        "tread_ckpt": step_flops(shape, **common, routes=routed, checkpoint_every=1),
        "ckpt_half": step_flops(shape, **common, checkpoint_every=2),
        "ckpt_attn": step_flops(shape, **common, checkpoint_every=1),  # HFU: attention is not recomputed, an upper bound
    }


def plan(args: argparse.Namespace, *, num_blocks: int):
    from trainer import tread
    from trainer.config import TreadConfig

    config = TreadConfig.from_dict({"routes": [
        {"selection_ratio": args.ratio, "start_layer_idx": args.start, "end_layer_idx": args.end}]})
    return tread.plan_routes(config, num_blocks=num_blocks)


def peak_tflops(name: str, override: float | None) -> float | None:
    """--peak-tflops, else the card's dense bf16 peak from trainer.throughput.GPU_PEAKS (bench/GPU_THROUGHPUT.md)."""
    if override is not None:
        return override
    from trainer.throughput import lookup_peak

    gpu = lookup_peak(name)
    return None if gpu is None else gpu.bf16_tflops


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    flops = variant_flops(args)
    if args.dry_run:
        result = {"bench": "gpu_step", "dry_run": True, "image_tokens": args.image_tokens,
                  "text_tokens": args.text_tokens, "hidden": args.heads * 128, "double_blocks": args.double,
                  "single_blocks": args.single, "lora_rank": args.rank,
                  "tflop_step": {v: {k: x / 1e12 for k, x in f.items()} for v, f in flops.items()}}
        print(json.dumps(result))
        return result

    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer import blocks, flux2
    from trainer.lora import apply_lora

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run, or --device cpu with small sizes for a smoke check")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    config = model_config(args)
    routes = plan(args, num_blocks=args.double + args.single)

    def build(precision: str, compiled: bool = False):
        """The slice at this base precision from the same seed: the same weights and LoRA init for every one."""
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = Flux2Transformer2DModel(**config)
        model.to(dtype).requires_grad_(False)
        if precision != "no_change":  # before LoRA, as trainer/model.py applies it
            from trainer.lowp_compute import apply_lowp_compute, check_environment

            if cuda:
                check_environment(precision, device=device)
            apply_lowp_compute(model, precision=precision, emulate=not cuda)
        apply_lora(model, preset="all", rank=args.rank, alpha=args.rank)
        for param in model.parameters():
            if param.requires_grad:  # LoRA weights in fp32, as the trainer keeps them
                param.data = param.data.float()
        model.train()
        blocks.apply_block_forward(model, routes=routes)
        if compiled:  # after the block forward (its routed processors), as trainer/model.py does
            from trainer.compile_blocks import apply_compile

            apply_compile(model, backend=args.compile_backend)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        log(f"{name}: built {precision}{' compiled' if compiled else ''} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters) in "
            f"{time.perf_counter() - started:.1f} s")
        return model, optimizer

    built = {precision: build(precision) for precision in args.precisions}
    if args.compile:
        built.update({f"{precision}+compile": build(precision, compiled=True) for precision in args.precisions})
    model = built[args.precisions[0]][0]

    side = math.isqrt(args.image_tokens)
    g = torch.Generator().manual_seed(args.seed)
    inputs = dict(
        hidden_states=torch.randn(1, args.image_tokens, 128, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, args.text_tokens, args.joint_attention_dim, generator=g).to(device, dtype),
        timestep=torch.rand(1, generator=g).to(device, dtype), guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if args.guidance_embeds else None,
        img_ids=flux2.image_position_ids(1, side, side).to(device),
        txt_ids=flux2.text_position_ids(1, args.text_tokens).to(device),
    )
    target = torch.randn(1, args.image_tokens, 128, generator=g).to(device)

    # Setup check (not timing): our forward equals diffusers' on this model (eval: no routing); each low-precision
    # model's output against the bf16 model's (the same weights).
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        ours = model(**inputs, return_dict=False)[0].float()
        stock = Flux2Transformer2DModel.forward(model, **inputs, return_dict=False)[0].float()
    max_diff, scale = float((ours - stock).abs().max()), float(stock.abs().max())
    output_rel_diff: dict[str, float] = {}
    if "no_change" in built and len(built) > 1:
        reference = ours if args.precisions[0] == "no_change" else None
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if reference is None:
                built["no_change"][0].eval()
                reference = built["no_change"][0](**inputs, return_dict=False)[0].float()
            for precision, (other, _) in built.items():
                if precision != "no_change" and not precision.endswith("+compile"):
                    other.eval()
                    out = other(**inputs, return_dict=False)[0].float()
                    output_rel_diff[precision] = float((out - reference).norm() / reference.norm())
                    log(f"{precision} output vs bf16: relative difference {output_rel_diff[precision]:.4f}")
        del reference
    for other, _ in built.values():
        other.train()
    del ours, stock
    log(f"our forward vs diffusers': max abs diff {max_diff:.3g} (output max abs {scale:.3g})")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(variant: str, index: int) -> tuple[float, float, int]:
        mode, precision, compiled = runs[variant]
        model, optimizer = built[precision + ("+compile" if compiled else "")]
        every = 2 if mode == "ckpt_half" else 1 if "ckpt" in mode else None
        blocks.apply_block_forward(model, routes=routes if "tread" in mode else (), checkpoint_every=every,
                                   save_attention=mode == "ckpt_attn")
        extra = {"tread_generators": [torch.Generator().manual_seed(index)]} if "tread" in mode else {}
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(**inputs, return_dict=False, **extra)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        sync()
        seconds = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        return seconds, float(loss.detach()), peak

    runs = {name_: (mode, precision, compiled) for name_, mode, precision, compiled in run_names(args)}
    order = list(runs)
    times: dict[str, list[float]] = {v: [] for v in order}
    peaks: dict[str, int] = {v: 0 for v in order}
    losses: dict[str, float] = {}
    curves: dict[str, list[float]] = {v: [] for v in order}
    warmup_s: dict[str, float] = {v: 0.0 for v in order}
    errors: dict[str, str] = {}
    for round_index in range(args.warmup + args.steps):
        if round_index > args.warmup and time.perf_counter() - started > args.time_budget_s:
            log(f"time budget {args.time_budget_s} s reached after {round_index - args.warmup} timed rounds")
            break
        shift = round_index % len(order)
        for variant in order[shift:] + order[:shift]:  # rotate the order every round
            if variant in errors:
                continue
            try:
                seconds, loss, peak = step(variant, round_index)
            except Exception as exc:  # one variant failing (out of memory) must not lose the others' figures
                errors[variant] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"{variant} failed: {errors[variant]}")
                built[runs[variant][1] + ("+compile" if runs[variant][2] else "")][1].zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            peaks[variant] = max(peaks[variant], peak)
            losses[variant] = loss
            curves[variant].append(loss)
            if round_index >= args.warmup:
                times[variant].append(seconds)
            else:
                warmup_s[variant] += seconds
        log(f"round {round_index + 1}/{args.warmup + args.steps} done")

    peak_tf = peak_tflops(name, args.peak_tflops)
    figures = {}
    for variant in order:
        mode = runs[variant][0]
        if not times[variant]:
            figures[variant] = {"error": errors.get(variant, "no timed step")}
            continue
        median = statistics.median(times[variant])
        model_tf = flops[mode]["model"] / median / 1e12
        hardware_tf = flops[mode]["hardware"] / median / 1e12
        figures[variant] = {
            "median_step_s": median, "step_s": times[variant],
            "precision": runs[variant][1], "model_tflop_per_step": flops[mode]["model"] / 1e12,
            "achieved_tflops": model_tf,
            "mfu": model_tf / peak_tf if peak_tf else None, "hfu": hardware_tf / peak_tf if peak_tf else None,
            "peak_vram_gib": peaks[variant] / 2**30, "last_loss": losses[variant],
            "loss_finite": math.isfinite(losses[variant]), "loss_curve": curves[variant],
            "compiled": runs[variant][2], "compile_warmup_s": warmup_s[variant] if runs[variant][2] else None,
        }
    result = {
        "bench": "gpu_step", "device": name, "peak_bf16_tflops": peak_tf, "torch": torch.__version__,
        "flavour": args.flavour, "hidden": args.heads * 128, "double_blocks": args.double, "single_blocks": args.single,
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "lora_rank": args.rank,
        "tread_route": {"selection_ratio": args.ratio, "start_layer_idx": args.start, "end_layer_idx": args.end,
                        "blocks": [[r.start, r.end] for r in routes]},
        "forward_vs_diffusers_max_abs_diff": max_diff, "output_max_abs": scale,
        "output_rel_diff_vs_bf16": output_rel_diff,
        "steps": args.steps, "warmup": args.warmup, "variants": figures,
        "tread_predicted_saving": 1 - flops["tread"]["model"] / flops["off"]["model"],
        "seconds_total": time.perf_counter() - started,
    }
    for variant in order:  # compile's gain: the compiled twin's median step against its eager run's
        twin = figures.get(variant + "+compile", {})
        if not runs[variant][2] and "median_step_s" in figures[variant] and "median_step_s" in twin:
            figures[variant]["compile_speedup"] = figures[variant]["median_step_s"] / twin["median_step_s"]
    if times.get("off") and times.get("tread"):
        off, on = figures["off"]["median_step_s"], figures["tread"]["median_step_s"]
        result.update(tread_speedup=off / on, tread_measured_saving=1 - on / off,
                      tread_measured_over_predicted=(1 - on / off) / result["tread_predicted_saving"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
