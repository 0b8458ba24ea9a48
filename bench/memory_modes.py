"""Step time and peak memory of the memory modes, on the CPU: fp32, bf16 autocast, int8-quanto, group offload.

Each (mode, round) runs in its own child process, because peak RSS only grows within a process; rounds
are interleaved (the mode order rotates every round) so that the noise of a shared machine hits every mode
alike. A child builds the model exactly as trainer.model.build_model does (LoRA "all", gradient
checkpointing on in every mode, since group offload needs it), runs one untimed step, then times
trainer.loop.train_step on synthetic latents and embeddings, and reports:

  step_s        median seconds per optimizer step (forward, checkpointed backward, clip, AdamW);
  model_mb      RSS growth from building the model (weights resident in CPU memory);
  peak_mb       peak RSS during the timed steps above the RSS before the model was built.

glibc's adaptive mmap threshold would keep freed tensors in the heap, so MALLOC_MMAP_THRESHOLD_ is pinned at
64 KiB in the children and RSS follows live memory. On a CPU-only machine group offload moves nothing (the
onload device is the CPU): its row shows the hooks' time cost, not the accelerator memory it saves.

Usage (from the repository root):
  python bench/memory_modes.py [--size mid|tiny] [--rounds 2] [--steps 2] [--image-size 128] [--text-tokens 128]
  python bench/memory_modes.py --estimates [--flavour dev|klein-4b|klein-9b]   # trainer.memory's table, no run
Progress goes to stderr; the last stdout line is one JSON object. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "bf16_autocast", "int8_quanto", "group_offload")
SIZES = {
    # hidden = heads x 128; joint_attention_dim stays 96 (the tiny text encoder's 3 x 32 features).
    "tiny": {"num_attention_heads": 2, "num_layers": 2, "num_single_layers": 3},
    "mid": {"num_attention_heads": 6, "num_layers": 2, "num_single_layers": 4},
}


def log(message: str) -> None:
    print(f"[memory_modes] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="mid", help="transformer size (default mid: hidden 768)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; one child per mode per round")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child (after one untimed step)")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in px, multiple of 16")
    parser.add_argument("--text-tokens", type=int, default=128,
                        help="text tokens per sample (training uses 512; fewer keeps the CPU run short)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--model", type=Path, default=None, help="FLUX.2 folder to use instead of a generated one")
    parser.add_argument("--estimates", action="store_true",
                        help="print trainer.memory's estimates for --flavour as a markdown table and exit")
    parser.add_argument("--flavour", choices=("dev", "klein-4b", "klein-9b"), default="dev",
                        help="with --estimates: the FLUX.2 transformer (real config from trainer/flavours.py)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.batch < 1 or args.image_size % 16:
        parser.error("--rounds, --steps, --batch >= 1 and --image-size a multiple of 16")
    return args


def make_model(root: Path, size: str) -> Path:
    """The tiny FLUX.2 folder with its transformer replaced by a random one of the chosen size."""
    import shutil

    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer.tiny import TRANSFORMER_CONFIG, make_tiny

    folder = make_tiny(out_dir=root / "model", seed=0)
    if size != "tiny":
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(**(TRANSFORMER_CONFIG | SIZES[size]))
        shutil.rmtree(folder / "transformer")
        transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------- child


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _own_memory(module) -> None:
    """Copy weights that still live in the mmapped safetensors file into process memory.

    diffusers loads safetensors by mmap: an untouched weight costs no RSS until the first step reads it, and
    a touched page stays counted while any tensor maps the file. Copying makes every mode's weights plain
    process memory, counted when built, and drops the mapping once nothing refers to it.
    """
    import gc

    from optimum.quanto import QModuleMixin

    quantized = {id(p) for m in module.modules() if isinstance(m, QModuleMixin) for p in m.parameters(recurse=False)}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in quantized:  # quanto's int8 tensors were made in memory already
            tensor.data = tensor.data.clone()
    gc.collect()


def run_child(spec: dict) -> dict:
    # Import everything any mode needs before the baseline, so imports never count as model memory.
    import optimum.quanto  # noqa: F401
    import torch
    from diffusers.hooks import group_offloading  # noqa: F401

    from trainer.config import (LoraConfig, MemoryConfig, ObjectiveConfig, OffloadConfig, OptimizerConfig,
                                ParallelismConfig, QuantizationConfig)
    from trainer.loop import build_optimizer, train_step
    from trainer.model import build_model
    from trainer.model_files import inspect_model_folder
    from trainer.parallelize import DistEnv

    torch.set_num_threads(1)
    mode = spec["mode"]
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    lora = LoraConfig(rank=spec["rank"], alpha=float(spec["rank"]), dropout=0.0, init="default", target="all")
    quantization = offload = None
    if mode == "int8_quanto":
        quantization = QuantizationConfig(base_model_precision="int8-quanto", base_model_default_dtype="fp32",
                                          quantize_via="cpu")
    if mode == "group_offload":
        offload = OffloadConfig(enabled=True)
    before_model = _status("VmRSS:")
    precision = "bf16" if mode == "bf16_autocast" else "no"
    model = build_model(inspect_model_folder(spec["model"]), lora=lora, memory=MemoryConfig(mixed_precision=precision),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=env,
                        quantization=quantization, offload=offload)
    _own_memory(model.inner)
    model_bytes = _status("VmRSS:") - before_model
    optimizer = build_optimizer(model, optim=OptimizerConfig(max_grad_norm=2.0))
    side = spec["image_size"] // 16
    g = torch.Generator().manual_seed(0)

    class Batch:
        latents = torch.randn(spec["batch"], 128, side, side, generator=g)
        prompt_embeds = torch.randn(spec["batch"], spec["text_tokens"], 96, generator=g)
        reference_latents = None

    def step(i: int) -> float:
        started = time.perf_counter()
        train_step(model, optimizer, micro_batches=[Batch], objective=ObjectiveConfig(), empty_embeds=None,
                             seed=0, step=i, env=env, max_grad_norm=2.0, nan_policy="stop")
        return time.perf_counter() - started

    step(0)  # untimed: first-call costs, optimizer state allocation
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    times = [step(i + 1) for i in range(spec["steps"])]
    return {"mode": mode, "step_s": statistics.median(times), "model_mb": model_bytes / 2**20,
            "peak_mb": (_status("VmHWM:") - before_model) / 2**20}


# -------------------------------------------------------------------------------------------- parent


def dev_estimates(*, resolution: int = 1024, rank: int = 16, dropout: float = 0.1, flavour: str = "dev") -> str:
    """FLUX.2 estimates (trainer.memory) as a markdown table: peak memory per GPU, and host RAM per process
    (while loading / while training) and for all the processes of one node. flavour: dev, klein-4b or klein-9b,
    whose real transformer config trainer/flavours.py holds (dev's equals trainer.memory's
    FLUX2_DEV_TRANSFORMER_CONFIG)."""
    from trainer.flavours import SPECS
    from trainer.memory import estimate_host_memory, estimate_peak_memory

    config = dict(SPECS[flavour].transformer)

    rows = [("| base weights | checkpointing | GPUs (mode) | weights | LoRA+AdamW | activations | overhead | "
             "total GB per GPU | fits 24 / 48 / 80 | host RAM per process: load / train GB | host RAM per node GB |"),
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    cases = [("bf16", "no_change", False), ("int8-quanto", "int8-quanto", False), ("int4-quanto", "int4-quanto", False),
             ("bf16 + group offload", "no_change", True)]
    for label, precision, offload in cases:
        for checkpointing in (True, False):
            if offload and not checkpointing:
                continue  # refused: offload saves nothing without checkpointing
            gpus = [("1", "none", 1), ("8", "fsdp2" if precision == "no_change" and not offload else "ddp", 8)]
            for text, distributed, world in gpus:
                settings = dict(base_model_precision=precision, group_offload=offload, distributed=distributed,
                                world_size=world)
                e = estimate_peak_memory(config, lora_rank=rank, lora_dropout=dropout,
                                         resolution=(resolution, resolution), gradient_checkpointing=checkpointing,
                                         **settings)
                host = estimate_host_memory(config, **settings)
                b = e.breakdown()
                fits = " / ".join("yes" if e.fits(gb) else "no" for gb in (24, 48, 80))
                mode = f"{text} ({distributed})" if world > 1 else text
                rows.append(f"| {label} | {'on' if checkpointing else 'off'} | {mode} | {b['weights']:.1f} | "
                            f"{b['lora_and_optimizer']:.2f} | {b['activations']:.1f} | {b['overhead']:.1f} | "
                            f"**{b['total']:.1f}** | {fits} | {host.load_gb:.1f} / {host.steady_gb:.1f} | "
                            f"{host.peak_gb * world:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.estimates:
        print(dev_estimates(rank=args.rank, flavour=args.flavour))
        return 0
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory_modes_") as tmp:
        model = args.model or make_model(Path(tmp), args.size)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                spec = {"mode": mode, "model": str(model), "rank": args.rank, "batch": args.batch,
                        "image_size": args.image_size, "text_tokens": args.text_tokens, "steps": args.steps}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
                                      check=False)
                if proc.returncode != 0:
                    log(proc.stderr[-3000:])
                    raise SystemExit(f"child {mode} failed ({proc.returncode})")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                results[mode].append(row)
                log(f"round {r + 1} {mode}: {row['step_s']:.3f} s/step, model {row['model_mb']:.0f} MB, "
                    f"peak {row['peak_mb']:.0f} MB")
    summary = {
        mode: {"step_s": statistics.median(r["step_s"] for r in rows),
               "model_mb": statistics.median(r["model_mb"] for r in rows),
               "peak_mb": statistics.median(r["peak_mb"] for r in rows)}
        for mode, rows in results.items()
    }
    base = summary["fp32"]
    for row in summary.values():
        row["step_vs_fp32"] = row["step_s"] / base["step_s"]
        row["peak_vs_fp32"] = row["peak_mb"] / base["peak_mb"]
    out = {"size": args.size, "image_size": args.image_size, "text_tokens": args.text_tokens, "batch": args.batch,
           "rank": args.rank, "rounds": args.rounds, "steps": args.steps, "threads": 1, "modes": summary,
           "runs": results, "wall_s": time.perf_counter() - started}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
