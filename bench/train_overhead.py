"""Trainer overhead: our train_step against a bare diffusers + peft loop on the same model and batch.

One process builds both models from the same files with the same LoRA (same targets, rank, alpha, seed),
checks that they compute the same thing, then times single optimizer steps of three variants,
interleaved (the order rotates every round) so that the noise of a shared machine hits all alike:

  ours_step  trainer.loop.train_step on an in-memory batch (prepare_batch, flow_matching_loss, backward,
             clip, AdamW), the same batch tensors the bare loop gets: data loading is in neither figure;
  bare_step  what a diffusers example writes inline: randn noise, sigmoid-normal sigmas with shift 3,
             x_t, pack, transformer(...), MSE against noise - x0, backward, clip, AdamW;
  ours_loop  the per-step body of trainer.loop.train without checkpoint/validation: load_batch from the
             on-disk cache, train_step, LambdaLR.step, EventWriter.emit("step"); its load_batch share is
             reported on its own.

Usage (from the repository root):
  python bench/train_overhead.py [--steps 40] [--warmup 5] [--image-size 64] [--batch 1] [--model DIR]
Progress goes to stderr; the last stdout line is one JSON object with the figures. Nothing here asserts
on time: it is a measurement, not a test. OMP_NUM_THREADS defaults to 1 (--threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per variant (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds of every variant first (default 5)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="square image side in px, multiple of 16 (default 64)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--model", type=Path, default=None,
                        help="FLUX.2 diffusers folder (default: make_tiny in a temp dir)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                        help="torch intra-op threads (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--lora-target", default="all", help="LoRA preset (default all)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16); alpha = rank")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout in both loops (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=2.0,
                        help="gradient clipping in both loops, 0 = off (default 2.0, the trainer's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --batch and --threads must be >= 1 and --warmup >= 0")
    if args.image_size < 16 or args.image_size % 16:
        parser.error(f"--image-size {args.image_size} must be a multiple of 16 (16 px per latent token)")
    return args


def log(message: str) -> None:
    print(f"[train_overhead] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ setup


def build_bench_dataset(model_dir: Path, *, root: Path, image_size: int, count: int) -> Path:
    """Synthetic coloured squares (one bucket), cached through our build_dataset; returns the manifest path."""
    import random

    from PIL import Image, ImageDraw

    from trainer.build import build_dataset
    from trainer.model_files import inspect_model_folder

    rng = random.Random(0)
    images = root / "images"
    images.mkdir(parents=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40)]
    for i in range(count):
        image = Image.new("RGB", (image_size, image_size), (240, 240, 240))
        x, y = rng.randint(0, image_size // 2), rng.randint(0, image_size // 2)
        ImageDraw.Draw(image).rectangle([x, y, x + image_size // 2 - 1, y + image_size // 2 - 1],
                                        fill=colours[i % len(colours)])
        image.save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a coloured square number {i} on a white background", encoding="utf-8")
    return build_dataset(image_dir=images, model=inspect_model_folder(model_dir), out_dir=root / "built",
                         resolution=image_size, text_precision="fp32")


def build_ours(model_dir: Path, *, target: str, rank: int, dropout: float, seed: int, max_grad_norm: float):
    """Our model and optimizer, built exactly as trainer.loop.train builds them (single process, fp32)."""
    import torch

    from trainer.config import LoraConfig, MemoryConfig, OptimizerConfig, ParallelismConfig
    from trainer.loop import build_optimizer
    from trainer.model import build_model
    from trainer.model_files import inspect_model_folder
    from trainer.parallelize import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    lora = LoraConfig(rank=rank, alpha=float(rank), dropout=dropout, init="default", target=target)
    model = build_model(inspect_model_folder(model_dir), lora=lora,
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False),
                        parallelism=ParallelismConfig(distributed="none"), seed=seed, env=env)
    optim = OptimizerConfig(max_grad_norm=max_grad_norm)
    return model, build_optimizer(model, optim=optim), env


def build_bare(model_dir: Path, *, target: str, rank: int, dropout: float, seed: int):
    """The bare loop's model: from_pretrained, add_adapter(LoraConfig), AdamW over what requires grad."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from trainer.lora import lora_target_modules

    transformer = Flux2Transformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.float32,
                                                          use_safetensors=True)
    transformer.requires_grad_(False)
    # Same global seed right before injection as build_model uses: both start from the same LoRA A.
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights=True,
                                       target_modules=lora_target_modules(transformer, preset=target)))
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    return transformer, optimizer, params


def check_same_model(ours, bare, *, batch) -> dict[str, Any]:
    """Setup check (not timing): identical LoRA state and identical forward output on one prepared batch."""
    import torch

    from trainer.lora import lora_state_dict
    from trainer.config import ObjectiveConfig
    from trainer.objective import prepare_batch, sample_generators

    a, b = lora_state_dict(ours.inner), lora_state_dict(bare)
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError("bench setup: our LoRA and the bare loop's LoRA differ; the comparison would be unfair")
    size = batch.latents.shape[0]
    prepared = prepare_batch(latents=batch.latents, prompt_embeds=batch.prompt_embeds, empty_embeds=None,
                             spec=ObjectiveConfig(), generators=sample_generators(seed=0, step=0, first_index=0,
                                                                                 count=size))
    inputs = {"hidden_states": prepared.hidden_states, "encoder_hidden_states": prepared.encoder_hidden_states,
              "timestep": prepared.timestep, "img_ids": prepared.img_ids, "txt_ids": prepared.txt_ids,
              "guidance": prepared.guidance, "return_dict": False}
    with torch.no_grad():
        torch.testing.assert_close(ours.module(**inputs)[0], bare(**inputs)[0], rtol=1e-5, atol=1e-6)
    return {"lora_tensors": len(a), "trainable_params": sum(v.numel() for v in a.values())}


# ------------------------------------------------------------------------------------------------ steps


def bare_step(transformer, optimizer, params: list, *, latents, prompt_embeds, max_grad_norm: float,
              shift: float = 3.0, guidance_scale: float = 1.0) -> float:
    """One step written inline, as a diffusers training example does it."""
    import torch
    import torch.nn.functional as F
    from diffusers import Flux2Pipeline

    optimizer.zero_grad(set_to_none=True)
    x0 = latents
    noise = torch.randn_like(x0)
    sigmas = torch.sigmoid(torch.randn(x0.shape[0]))
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    pred = transformer(
        hidden_states=Flux2Pipeline._pack_latents(noisy),
        encoder_hidden_states=prompt_embeds,
        timestep=sigmas,
        img_ids=Flux2Pipeline._prepare_latent_ids(x0),
        txt_ids=Flux2Pipeline._prepare_text_ids(prompt_embeds),
        guidance=torch.full((x0.shape[0],), guidance_scale),
        return_dict=False,
    )[0]
    loss = F.mse_loss(pred.float(), Flux2Pipeline._pack_latents(noise - x0).float())
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss.item()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_s": statistics.median(values), "p25_s": q[0], "p75_s": q[2], "min_s": min(values)}


def run(args: argparse.Namespace, *, work: Path) -> dict[str, Any]:
    import diffusers
    import peft
    import torch

    from trainer.events import EventWriter
    from trainer.loop import lr_lambda, train_step
    from trainer.manifest import load_batch, load_manifest
    from trainer.config import ObjectiveConfig
    from trainer.sampler import BucketBatchSampler
    from trainer.tiny import make_tiny

    torch.set_num_threads(args.threads)
    setup_started = time.perf_counter()
    model_dir = args.model or make_tiny(out_dir=work / "model", seed=args.seed)
    # Two full batches of one bucket, so load_batch always reads `batch` distinct cache entries.
    manifest = load_manifest(build_bench_dataset(model_dir, root=work / "data", image_size=args.image_size,
                                                 count=max(2, 2 * args.batch)))
    sampler = BucketBatchSampler(manifest, batch_size=args.batch, seed=args.seed)
    batches = sampler.iter_batches()
    fixed = load_batch(manifest, next(batches).indices, dtype=torch.float32)
    ours, optimizer, env = build_ours(model_dir, target=args.lora_target, rank=args.rank,
                                      dropout=args.lora_dropout, seed=args.seed, max_grad_norm=args.max_grad_norm)
    bare_model, bare_optimizer, bare_params = build_bare(model_dir, target=args.lora_target, rank=args.rank,
                                                         dropout=args.lora_dropout, seed=args.seed)
    same = check_same_model(ours, bare_model, batch=fixed)
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(scheduler="constant", warmup_steps=0,
                                                                        total_steps=2 * total))
    events = EventWriter(work / "out")
    objective = ObjectiveConfig()
    log(f"setup {time.perf_counter() - setup_started:.1f}s; {same['trainable_params']} LoRA params in "
        f"{same['lora_tensors']} tensors; timing {args.warmup} + {args.steps} rounds")

    step_no = [0]  # ours_step and ours_loop share one model, optimizer and step counter
    losses: dict[str, list[float]] = {"ours_step": [], "bare_step": [], "ours_loop": []}
    load_times: list[float] = []

    def ours_train(batch) -> float:
        loss = train_step(ours, optimizer, micro_batches=[batch], objective=objective, empty_embeds=None,
                             seed=args.seed, step=step_no[0], env=env, max_grad_norm=args.max_grad_norm,
                             nan_policy="stop")[0]
        step_no[0] += 1
        return loss

    def ours_step() -> None:
        losses["ours_step"].append(ours_train(fixed))

    def bare_round() -> None:
        losses["bare_step"].append(bare_step(bare_model, bare_optimizer, bare_params, latents=fixed.latents,
                                             prompt_embeds=fixed.prompt_embeds, max_grad_norm=args.max_grad_norm))

    def ours_loop() -> None:
        started = time.perf_counter()
        batch = load_batch(manifest, next(batches).indices, dtype=torch.float32)
        load_times.append(time.perf_counter() - started)
        loss = ours_train(batch)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - started
        events.emit("step", step=step_no[0], loss=loss, lr=lr, applied=True, seconds_per_step=seconds,
                    samples_per_second=args.batch / seconds, max_train_steps=2 * total, eta_seconds=0.0)
        losses["ours_loop"].append(loss)

    variants = {"ours_step": ours_step, "bare_step": bare_round, "ours_loop": ours_loop}
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(total):
        # Rotate the order each round: every variant runs equally often first, second and last.
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(variants[name])
            if round_no >= args.warmup:
                times[name].append(seconds)
    events.close()
    load_times = load_times[args.warmup:]

    ours_s, bare_s, loop_s = (statistics.median(times[n]) for n in names)
    paired = [o / b for o, b in zip(times["ours_step"], times["bare_step"])]
    latent_shape = tuple(fixed.latents.shape)
    return {
        "bench": "train_overhead",
        "ratio_step": ours_s / bare_s,
        "ratio_step_paired_median": statistics.median(paired),
        "ratio_loop": loop_s / bare_s,
        "target_ratio": TARGET_RATIO,
        "ours_step": summary(times["ours_step"]),
        "bare_step": summary(times["bare_step"]),
        "ours_loop": summary(times["ours_loop"]),
        "ours_load_batch_median_s": statistics.median(load_times),
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "image_size": args.image_size,
        "image_tokens": latent_shape[2] * latent_shape[3],
        "text_tokens": int(fixed.prompt_embeds.shape[1]),
        "lora": {"target": args.lora_target, "rank": args.rank, "alpha": args.rank, "dropout": args.lora_dropout,
                 **same},
        "max_grad_norm": args.max_grad_norm,
        "model": str(args.model) if args.model else f"make_tiny(seed={args.seed})",
        "first_losses": {n: v[0] for n, v in losses.items()},
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before torch is imported, so the OpenMP pool is sized right from the start.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO_ROOT))
    with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
        result = run(args, work=Path(tmp))
    for name in ("ours_step", "bare_step", "ours_loop"):
        log(f"{name:9s} median {result[name]['median_s'] * 1e3:8.2f} ms  "
            f"(p25 {result[name]['p25_s'] * 1e3:.2f}, p75 {result[name]['p75_s'] * 1e3:.2f})")
    log(f"ours/bare step {result['ratio_step']:.3f} (paired {result['ratio_step_paired_median']:.3f}), "
        f"loop/bare {result['ratio_loop']:.3f}, target <= {TARGET_RATIO}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
