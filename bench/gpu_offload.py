"""GPU offload: what our group offload (trainer/offload.py) saves in peak VRAM and costs in step time, LoRA training.

The model is diffusers' Flux2Transformer2DModel at FLUX.2-dev's width (hidden 6144 = 48 heads x 128,
joint_attention_dim 15360, mlp_ratio 3; gpu_step.model_config) with fewer blocks (default 4 double + 8
single of dev's 8 + 48: 8.67 B parameters, 16.1 GiB in bf16, 14.6 GiB of it in the blocks), random bf16
weights, an all-layers LoRA (rank 16, fp32 weights, bf16 autocast), our block forward
(trainer.blocks.apply_block_forward) with every block checkpointed, AdamW over the LoRA parameters and an
MSE loss on a 1024x1024 image: 4096 image + 512 text tokens. Variants, each set up in the order
trainer.model.build_model uses:

  resident       weights built on the GPU and kept there; gradient checkpointing (offload needs it, so the
                 baseline has it too)
  block_stream   offload block_level, --blocks-per-group (1), use_stream: the weights built, then moved to
                 CPU memory (where the trainer loads an offloaded transformer), LoRA injected, then
                 trainer.offload.apply_group_offload: frozen block weights wait in pinned CPU memory and
                 stream in on a side CUDA stream with prefetch; LoRA weights and the layers outside the blocks
                 stay on the GPU
  block_sync     the same without the stream: synchronous copies, in from pageable CPU memory and back out
                 to newly allocated CPU memory every time a group is put back
  leaf_stream, leaf_sync   leaf_level (one group per module that owns frozen weights); not run by default

Variants run one after another, each with its own model (built from the same seed, so the same weights and
the same LoRA), so that only one model occupies the GPU when its peak is read; they are not interleaved.
Per variant: median step seconds after --warmup untimed steps, torch.cuda.max_memory_allocated over all of
its steps (reset after set-up, so the optimizer state created in the first step counts), the bytes of
parameters and buffers on the GPU after set-up, and ratios against resident; trainer.memory's estimate
for the same setting is printed beside it (the estimate adds the CUDA context and 10% for fragmentation,
which max_memory_allocated does not see). The first step's loss and LoRA gradient norm are compared across
variants with rtol 2e-2 (same weights, same LoRA, same inputs; bf16) and reported as first_step_check.ok.

Usage (from the repository root):  python bench/gpu_offload.py
  --dry-run             parameter counts, FLOPs and memory estimates only (no GPU, no weights)
  --device cpu --heads 1 --double 1 --single 1 --image-tokens 64 --text-tokens 16 --joint-attention-dim 96
      --steps 1 --warmup 0      the same code small, on CPU (a smoke check): the stream variants are refused
                                there by trainer.offload (CUDA streams only) and reported as skipped; offload to
                                the CPU with the CPU as onload device moves nothing, but every hook runs
--time-budget-s (200) bounds the whole run, build included; progress goes to stderr; the last stdout line is
one JSON object. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import model_config, peak_tflops  # bench/ is on sys.path above

VARIANTS: dict[str, tuple[str, bool] | None] = {
    "resident": None,
    "block_stream": ("block_level", True),
    "block_sync": ("block_level", False),
    "leaf_stream": ("leaf_level", True),
    "leaf_sync": ("leaf_level", False),
}
"""Variant name -> (group_offload_type, group_offload_use_stream), None for no offload."""
DEFAULT_VARIANTS = ("resident", "block_stream", "block_sync")
LOSS_RTOL = 2e-2
"""First-step loss and gradient norm agreement across variants (bf16 compute)."""
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {list(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--blocks-per-group", type=int, default=1, help="block_level group size (default 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant, fewer if the budget runs out")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default 1)")
    parser.add_argument("--image-tokens", type=int, default=4096, help="square number (default 4096: 1024x1024 px)")
    parser.add_argument("--text-tokens", type=int, default=512, help="default 512")
    parser.add_argument("--heads", type=int, default=48, help="heads of 128 (default 48: hidden 6144, FLUX.2-dev)")
    parser.add_argument("--double", type=int, default=4, help="double blocks (default 4)")
    parser.add_argument("--single", type=int, default=8, help="single blocks (default 8)")
    parser.add_argument("--joint-attention-dim", type=int, default=15360)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, alpha = rank (default 16)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a small smoke run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card, if not detected")
    parser.add_argument("--dry-run", action="store_true", help="counts, FLOPs and memory estimates only, then exit")
    parser.add_argument("--time-budget-s", type=float, default=200.0,
                        help="wall seconds for the whole run, build included; later variants get what earlier ones "
                             "leave, each at least its warm-up and one timed step (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if math.isqrt(args.image_tokens) ** 2 != args.image_tokens:
        parser.error(f"--image-tokens {args.image_tokens} must be a square number")
    if args.steps < 1 or args.warmup < 0 or args.blocks_per_group < 1:
        parser.error("--steps and --blocks-per-group must be >= 1 and --warmup >= 0")
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants {unknown or args.variants!r}: choose from {list(VARIANTS)}")
    return args


def log(message: str) -> None:
    print(f"[gpu_offload] {message}", file=sys.stderr, flush=True)


def offload_settings(variant: str, *, blocks_per_group: int):
    """config.OffloadConfig for a variant (None: resident)."""
    from trainer.config import OffloadConfig

    spec = VARIANTS[variant]
    if spec is None:
        return None
    offload_type, use_stream = spec
    return OffloadConfig(enabled=True, offload_type=offload_type, blocks_per_group=blocks_per_group,
                         use_stream=use_stream)


def estimate(args: argparse.Namespace, variant: str) -> dict:
    """trainer.memory's peak estimate for this variant (GiB), to set beside the measured peak."""
    from trainer.memory import estimate_peak_memory

    spec = VARIANTS[variant]
    result = estimate_peak_memory(
        model_config(args), mixed_precision="bf16", lora_rank=args.rank, lora_target="all",
        image_tokens=args.image_tokens, text_tokens=args.text_tokens, gradient_checkpointing=True,
        group_offload=spec is not None, group_offload_type=spec[0] if spec else "block_level",
        group_offload_blocks_per_group=args.blocks_per_group, group_offload_use_stream=bool(spec and spec[1]),
    )
    return result.breakdown()


@contextlib.contextmanager
def default_dtype(dtype):
    """Build the weights directly in the storage dtype (no fp32 copy of a 16 GiB model first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(args: argparse.Namespace, *, variant: str, device, dtype):
    """The transformer of one variant, in build_model's order. Returns (model, GroupOffload | None, checksum)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer import blocks
    from trainer.lora import apply_lora
    from trainer.offload import apply_group_offload

    settings = offload_settings(variant, blocks_per_group=args.blocks_per_group)
    # Random weights are drawn on the compute device (fast) from the same seed in every variant; the
    # trainer would read them from safetensors instead.
    torch.manual_seed(args.seed)
    with torch.device(device), default_dtype(dtype):
        model = Flux2Transformer2DModel(**model_config(args))
    model.requires_grad_(False)
    checksum = float(sum(p.sum(dtype=torch.float64) for p in (model.x_embedder.weight,
                                                              model.single_transformer_blocks[-1].attn.to_out.weight)))
    if settings is not None:
        model.to("cpu")  # build_model loads an offloaded transformer into CPU memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.manual_seed(args.seed)  # LoRA A from the same generator state in every variant (build_model does this)
    apply_lora(model, preset="all", rank=args.rank, alpha=args.rank)
    for param in model.parameters():
        if param.requires_grad:  # LoRA weights in fp32, as the trainer keeps them
            param.data = param.data.float()
    blocks.apply_block_forward(model, checkpoint_every=1)
    offload = apply_group_offload(model, settings=settings, device=device) if settings is not None else None
    model.train()
    return model, offload, checksum


def placement(model, *, device, offload) -> dict:
    """Bytes of parameters and buffers on the compute device after set-up, split frozen / LoRA."""
    frozen = lora = elsewhere = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type != device.type:
            elsewhere += size
        elif tensor.requires_grad:
            lora += size
        else:
            frozen += size
    figures = {"weights_on_device_gib": (frozen + lora) / GIB, "frozen_on_device_gib": frozen / GIB,
               "lora_on_device_gib": lora / GIB, "weights_elsewhere_gib": elsewhere / GIB}
    if offload is not None:
        offloaded = [t for g in offload.groups for t in [*g.parameters, *g.buffers]]
        figures.update(groups=len(offload.groups),
                       offloaded_gib=sum(t.numel() * t.element_size() for t in offloaded) / GIB,
                       offloaded_pinned=all(t.is_pinned() for t in offloaded) if device.type == "cuda" else None)
    return figures


def make_inputs(args: argparse.Namespace, *, device, dtype) -> tuple[dict, object]:
    import torch

    from trainer import flux2

    side = math.isqrt(args.image_tokens)
    g = torch.Generator().manual_seed(args.seed)
    inputs = {
        "hidden_states": torch.randn(1, args.image_tokens, 128, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.joint_attention_dim,
                                             generator=g).to(device, dtype),
        "timestep": torch.rand(1, generator=g).to(device, dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
        "img_ids": flux2.image_position_ids(1, side, side).to(device),
        "txt_ids": flux2.text_position_ids(1, args.text_tokens).to(device),
    }
    target = torch.randn(1, args.image_tokens, 128, generator=g).to(device)
    return inputs, target


def run_variant(args: argparse.Namespace, variant: str, *, device, dtype, inputs: dict, target,
                deadline: float, run_deadline: float) -> dict:
    """Set up one variant, run its steps until --steps or its deadline, and return its figures."""
    import torch

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    begin = time.perf_counter()
    if cuda:
        sync()
        before = torch.cuda.memory_allocated(device)
    model, offload, checksum = build(args, variant=variant, device=device, dtype=dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    figures: dict = {"weights_checksum": checksum, **placement(model, device=device, offload=offload)}
    if cuda:
        sync()
        figures["allocated_after_setup_gib"] = (torch.cuda.memory_allocated(device) - before) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    figures["setup_s"] = time.perf_counter() - begin
    log(f"{variant}: set up in {figures['setup_s']:.1f} s, weights on {device.type} "
        f"{figures['weights_on_device_gib']:.2f} GiB, elsewhere {figures['weights_elsewhere_gib']:.2f} GiB")

    times: list[float] = []
    warmup_times: list[float] = []
    losses: list[float] = []
    onloads_timed = 0
    seconds = 0.0
    for index in range(args.warmup + args.steps):
        timed = index >= args.warmup
        # The first step always runs (the cross-variant check needs its loss). A later one starts only if a
        # step as long as the last one ends within this variant's share; the first timed step may use the
        # rest of the whole budget, so every variant gets a timed step unless the run would overrun.
        limit = run_deadline if timed and not times else min(deadline, run_deadline)
        if index and time.perf_counter() + seconds > limit:
            log(f"{variant}: time budget reached after {len(warmup_times)} warm-up and {len(times)} timed steps")
            break
        onloads = offload.schedule.onloads if offload is not None else 0
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        sync()
        seconds = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if index == 0:  # outside the timed span; grads stay until the next zero_grad
            norms = torch.stack([p.grad.detach().float().norm() for p in lora_params if p.grad is not None])
            figures["first_loss"] = losses[0]
            figures["first_lora_grad_norm"] = float(norms.norm()) if len(norms) else 0.0
        del pred, loss
        if timed:
            times.append(seconds)
            if offload is not None:
                onloads_timed += offload.schedule.onloads - onloads
        else:
            warmup_times.append(seconds)
        log(f"{variant}: step {index + 1}/{args.warmup + args.steps} {'timed' if timed else 'warm-up'} "
            f"{seconds:.3f} s, loss {losses[-1]:.5f}")

    if not times:
        # Not even one timed step fitted the budget: the warm-up steps are the only times there are (they
        # include first-step costs such as AdamW state allocation); flagged in the JSON, never silent.
        log(f"{variant}: no timed step fitted the budget; median_step_s is from the warm-up steps")
    median = statistics.median(times or warmup_times)
    figures.update(median_step_s=median, step_s=times, warmup_step_s=warmup_times, median_from_warmup=not times,
                   losses=losses, last_loss=losses[-1], loss_finite=all(math.isfinite(x) for x in losses))
    if cuda:
        figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        figures["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    if offload is not None and times:
        per_step = onloads_timed / len(times)
        # Each group moves in once in forward and once in the recomputing forward of backward: about
        # 2 x offloaded bytes per step (groups may differ in size, so this is the mean, not exact).
        transfer = figures["offloaded_gib"] * per_step / figures["groups"]
        figures.update(onloads_per_step=per_step, peak_groups_on_device=offload.schedule.peak_onloaded,
                       est_transfer_gib_per_step=transfer, est_transfer_gib_per_s=transfer / median)
    del optimizer, lora_params, model, offload
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    figures["variant_s"] = time.perf_counter() - begin
    return figures


def refusal(args: argparse.Namespace, variant: str, *, device) -> str | None:
    """The config's own refusal of this variant on this device (streams on a CPU), or None."""
    settings = offload_settings(variant, blocks_per_group=args.blocks_per_group)
    if settings is None:
        return None
    try:
        settings.check_compatible(gradient_checkpointing=True, distributed="none", world_size=1, device=device)
    except ValueError as exc:
        return str(exc)
    return None


def compare_first_steps(figures: dict) -> dict:
    """First-step loss and LoRA gradient norm of every variant against the first that ran (resident)."""
    ran = [v for v, f in figures.items() if "first_loss" in f]
    if not ran:
        return {"reference": None, "rtol": LOSS_RTOL, "ok": None}
    ref = figures[ran[0]]
    check: dict = {"reference": ran[0], "rtol": LOSS_RTOL, "variants": {}}
    for variant in ran:
        f = figures[variant]
        loss_diff = abs(f["first_loss"] - ref["first_loss"]) / max(abs(ref["first_loss"]), 1e-12)
        grad_diff = abs(f["first_lora_grad_norm"] - ref["first_lora_grad_norm"]) / max(
            abs(ref["first_lora_grad_norm"]), 1e-12)
        check["variants"][variant] = {
            "first_loss": f["first_loss"], "first_lora_grad_norm": f["first_lora_grad_norm"],
            "loss_rel_diff": loss_diff, "grad_norm_rel_diff": grad_diff,
            "same_weights": f["weights_checksum"] == ref["weights_checksum"],
        }
    check["ok"] = all(c["loss_rel_diff"] <= LOSS_RTOL and c["grad_norm_rel_diff"] <= LOSS_RTOL and c["same_weights"]
                      for c in check["variants"].values())
    return check


def add_ratios(figures: dict) -> None:
    base = figures.get("resident")
    if not base or "median_step_s" not in base:
        return
    for f in figures.values():
        if "median_step_s" not in f:
            continue
        f["step_time_vs_resident"] = f["median_step_s"] / base["median_step_s"]
        if base["weights_on_device_gib"]:
            f["weights_on_device_vs_resident"] = f["weights_on_device_gib"] / base["weights_on_device_gib"]
        if base.get("peak_allocated_gib"):
            f["peak_vs_resident"] = f["peak_allocated_gib"] / base["peak_allocated_gib"]


def dry_run(args: argparse.Namespace) -> dict:
    from flux2_flops import Shape, step_flops

    from trainer.memory import count_transformer

    counts = count_transformer(model_config(args), lora_rank=args.rank, lora_target="all")
    flops = step_flops(Shape.from_config(model_config(args)), image_tokens=args.image_tokens,
                       text_tokens=args.text_tokens, lora_rank=args.rank, checkpoint_every=1)
    block_bytes = (counts.block_linear + counts.block_other) * 2
    result = {
        "bench": "gpu_offload", "dry_run": True, "hidden": counts.hidden, "double_blocks": args.double,
        "single_blocks": args.single, "image_tokens": args.image_tokens, "text_tokens": args.text_tokens,
        "lora_rank": args.rank, "parameters": counts.total, "lora_parameters": counts.lora_params,
        "weights_bf16_gib": counts.total * 2 / GIB, "block_weights_bf16_gib": block_bytes / GIB,
        "outside_blocks_bf16_gib": counts.outside * 2 / GIB, "largest_block_bf16_gib": counts.largest_block * 2 / GIB,
        "tflop_step": {k: v / 1e12 for k, v in flops.items()},
        "estimates_gib": {v: estimate(args, v) for v in args.variants},
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)

    import diffusers
    import torch
    from flux2_flops import Shape, step_flops

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run, or --device cpu with small sizes for a smoke check")
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU smoke run: fp32, no autocast (as gpu_step)
    flops = step_flops(Shape.from_config(model_config(args)), image_tokens=args.image_tokens,
                       text_tokens=args.text_tokens, lora_rank=args.rank, checkpoint_every=1)
    inputs, target = make_inputs(args, device=device, dtype=dtype)
    run_deadline = started + args.time_budget_s
    log(f"{name}: variants {list(args.variants)}, budget {args.time_budget_s:.0f} s")

    figures: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    to_run = []
    for variant in args.variants:
        reason = refusal(args, variant, device=device)
        if reason is not None:
            skipped[variant] = f"refused by config.OffloadConfig.check_compatible on {device.type}: {reason}"
            log(f"{variant}: skipped ({skipped[variant]})")
        else:
            to_run.append(variant)
    for position, variant in enumerate(to_run):
        now = time.perf_counter()
        if now > run_deadline:
            skipped[variant] = "time budget spent before it started"
            log(f"{variant}: skipped (time budget)")
            continue
        # Later variants get an equal share of what is left (a fast resident run leaves more to the slow ones).
        deadline = now + (run_deadline - now) / (len(to_run) - position)
        try:
            figures[variant] = run_variant(args, variant, device=device, dtype=dtype, inputs=inputs, target=target,
                                           deadline=deadline, run_deadline=run_deadline)
        except Exception as exc:  # noqa: BLE001 - one variant failing (out of memory) must not lose the others
            figures[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"{variant} failed: {figures[variant]['error']}")
        if "error" in figures[variant]:
            # Out here, not in the except clause: its traceback holds the failed variant's model until it ends.
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            continue
        try:
            figures[variant]["estimate_gib"] = estimate(args, variant)
        except Exception as exc:  # noqa: BLE001 - the estimate is context, not the measurement
            figures[variant]["estimate_gib"] = {"error": f"{type(exc).__name__}: {exc}"}
        f = figures[variant]
        f["achieved_tflops"] = flops["model"] / f["median_step_s"] / 1e12
        peak = f"{f['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in f else "n/a on cpu"
        log(f"{variant}: median step {f['median_step_s']:.3f} s over {len(f['step_s'])} timed, peak allocated "
            f"{peak}, first loss {f['first_loss']:.6f}")

    add_ratios(figures)
    check = compare_first_steps(figures)
    for variant, c in check.get("variants", {}).items():
        log(f"first step {variant}: loss {c['first_loss']:.6f} (rel diff {c['loss_rel_diff']:.2e}), LoRA grad "
            f"norm {c['first_lora_grad_norm']:.6g} (rel diff {c['grad_norm_rel_diff']:.2e}), "
            f"same weights {c['same_weights']}")
    log(f"first-step agreement within rtol {LOSS_RTOL}: {check['ok']}")
    for variant, f in figures.items():
        if "median_step_s" in f:
            peak = (f"{f['peak_allocated_gib']:.2f} GiB (x{f.get('peak_vs_resident', float('nan')):.2f})"
                    if "peak_allocated_gib" in f else "n/a on cpu")
            ratio = f.get("step_time_vs_resident", float("nan"))
            log(f"summary {variant}: step {f['median_step_s']:.3f} s (x{ratio:.2f}), "
                f"peak allocated {peak}, weights on {device.type} {f['weights_on_device_gib']:.3f} GiB "
                f"(x{f.get('weights_on_device_vs_resident', float('nan')):.2f})")
    peak_tf = peak_tflops(name, args.peak_tflops)
    result = {
        "bench": "gpu_offload", "device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "hidden": args.heads * 128, "double_blocks": args.double, "single_blocks": args.single,
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "lora_rank": args.rank,
        "blocks_per_group": args.blocks_per_group, "compute_dtype": str(dtype).removeprefix("torch."),
        "model_tflop_per_step": flops["model"] / 1e12, "hardware_tflop_per_step": flops["hardware"] / 1e12,
        "peak_bf16_tflops": peak_tf, "steps": args.steps, "warmup": args.warmup,
        "time_budget_s": args.time_budget_s, "variants": figures, "skipped": skipped, "first_step_check": check,
        "seconds_total": time.perf_counter() - started,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
