"""Host RAM while loading: the slope of each process's peak RSS against the transformer's bf16 bytes, per mode.

Two FLUX.2 transformers of the real block structure (diffusers Flux2Transformer2DModel, hidden 1024 = 8 heads x
128, 2 double blocks, 4 and 16 single blocks by default) are written in bf16 into the tiny model folder of
trainer.tiny (real diffusers layout; VAE, text encoder and tokenizer stay tiny). For each model and each mode a
fresh process (or torchrun process group, gloo on the CPU) runs the trainer's own path: build_model (LoRA "all",
bf16 mixed precision, gradient checkpointing on) then `--steps` steps of trainer.loop.train_step on a synthetic
batch, and reports from /proc/self/status:

  base_mb    RSS before build_model (after imports and the process group);
  load_mb    peak RSS (VmHWM) from process start to the end of build_model;
  step_mb    peak RSS during the training steps (VmHWM reset with /proc/self/clear_refs after the build);
  peak_mb    the larger of the two: the process's peak; for 2 processes the larger rank's.

  slope = (peak_large - peak_small) / (bf16_bytes_large - bf16_bytes_small)

is the host RAM each process needs per byte of the bf16 transformer; what does not grow with the model (imports,
the process group, activations of the small batch) cancels. Modes: fsdp2 (2 processes), none (1 process), ddp
(2 processes), int8 (int8-quanto base, default dtype bf16, quantized on the CPU, 1 process). The processes
set the C allocator as the trainer's ranks do (trainer/host_allocator.py; --glibc-default skips it,
--malloc-mmap-threshold sets glibc's own variable instead).

Usage (from the repository root):
  python bench/load_memory.py [--modes fsdp2,none,ddp,int8] [--keep] [--work-dir DIR] [--steps 2]
  python bench/load_memory.py --dry-run          # model sizes and the commands; runs nothing
  python bench/load_memory.py --trainer-root /tmp/before   # measure another checkout's trainer (older API too)
Progress goes to stderr; stdout is a markdown table, then one JSON line. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# mode -> (distributed, processes, quantized)
MODES = {"fsdp2": ("fsdp2", 2, False), "none": ("none", 1, False), "ddp": ("ddp", 2, False),
         "int8": ("none", 1, True)}


def log(message: str) -> None:
    print(f"[load_memory] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (hidden = heads x 128; default 8)")
    parser.add_argument("--double", type=int, default=2, help="double blocks in both models (default 2)")
    parser.add_argument("--small-single", type=int, default=4, help="single blocks of the small model (default 4)")
    parser.add_argument("--large-single", type=int, default=16, help="single blocks of the large model (default 16)")
    parser.add_argument("--steps", type=int, default=2, help="train_step calls per process after the build")
    parser.add_argument("--image-size", type=int, default=32,
                        help="square image side in px, multiple of 16 (default 32: 4 image tokens)")
    parser.add_argument("--text-tokens", type=int, default=16,
                        help="text tokens per sample (default 16: bf16 matmuls are slow on the CPU, and the slope is about weights, not activations)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ in the measured processes (e.g. 65536); default: the trainer's own setting")
    parser.add_argument("--glibc-default", action="store_true",
                        help="skip the trainer's allocator setting (trainer/host_allocator.py): glibc's adaptive "
                             "mmap threshold, as before it")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the two model folders go (default: a temp dir, or "
                             "$TMPDIR/load_memory_models with --keep)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated models in the work dir and reuse them when they match")
    parser.add_argument("--trainer-root", type=Path, default=REPO_ROOT,
                        help="checkout whose trainer/ is measured (default: this one); the API before "
                             "trainer/model.py (loop.build_model, LoraSettings) is recognised")
    parser.add_argument("--dry-run", action="store_true", help="print the model sizes and commands; run nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.steps < 1 or args.image_size % 16 or args.small_single >= args.large_single or args.small_single < 0:
        parser.error("--steps >= 1, --image-size a multiple of 16, 0 <= --small-single < --large-single")
    return args


def transformer_config(heads: int, double: int, single: int) -> dict:
    from trainer.tiny import TRANSFORMER_CONFIG

    # joint_attention_dim stays the tiny text encoder's 3 x 32 features, as in bench/memory_modes.py.
    return TRANSFORMER_CONFIG | {"num_attention_heads": heads, "num_layers": double, "num_single_layers": single}


def bf16_bytes(config: dict) -> tuple[int, int]:
    """(parameters, bytes in bf16) of a transformer with this config, counted on the meta device."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return params, 2 * params


def make_model(folder: Path, config: dict) -> Path:
    """trainer.tiny's folder with transformer/ replaced by a random bf16 one of this config (save_pretrained)."""
    import shutil

    import torch
    from diffusers import Flux2Transformer2DModel

    from trainer.tiny import make_tiny

    stamp = folder / "load_memory_config.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == config:
        log(f"reusing {folder}")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    make_tiny(out_dir=folder, seed=0)
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**config).to(torch.bfloat16)
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    del transformer
    stamp.write_text(json.dumps(config))
    return folder


def file_bytes(folder: Path, part: str = "transformer") -> int:
    """Bytes of the tensors in the part's safetensors files (what a reader of them maps)."""
    from safetensors import safe_open

    total = 0
    for path in sorted((folder / part).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                s = handle.get_slice(key)
                n = 1
                for d in s.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4}[s.get_dtype()]
    return total


# --------------------------------------------------------------------------------------------- child


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class _Api:
    """The trainer's build/optimizer/objective calls, for trainer/model.py's API or the one before it."""

    def __init__(self) -> None:
        import importlib.util

        self.new = importlib.util.find_spec("trainer.model") is not None
        self.name = "model.build_model" if self.new else "loop.build_model"

    def build(self, folder: str, *, distributed: str, quantized: bool, rank: int, env):
        from trainer.model_files import inspect_model_folder

        lora = dict(rank=rank, alpha=float(rank), dropout=0.0, init="default", target="all")
        quant = dict(base_model_precision="int8-quanto", base_model_default_dtype="bf16", quantize_via="cpu")
        if self.new:
            from trainer.config import LoraConfig, MemoryConfig, ParallelismConfig, QuantizationConfig
            from trainer.model import build_model

            return build_model(inspect_model_folder(folder), lora=LoraConfig(**lora),
                               memory=MemoryConfig(mixed_precision="bf16"),
                               parallelism=ParallelismConfig(distributed=distributed), seed=0, env=env,
                               quantization=QuantizationConfig(**quant) if quantized else None)
        from trainer.config import LoraSettings, QuantizationSettings
        from trainer.loop import build_model

        return build_model(folder=inspect_model_folder(folder), lora=LoraSettings(**lora), precision="bf16",
                           gradient_checkpointing=True, distributed=distributed, seed=0, env=env,
                           quantization=QuantizationSettings(text_encoder_precision="no_change", **quant)
                           if quantized else None)

    def optimizer(self, model):
        from trainer.loop import build_optimizer

        if self.new:
            from trainer.config import OptimizerConfig

            return build_optimizer(model, optim=OptimizerConfig(max_grad_norm=2.0))
        from trainer.config import OptimSettings

        return build_optimizer(model, optim=OptimSettings(optimizer="adamw", learning_rate=1e-4, adam_beta1=0.9,
                                                          adam_beta2=0.999, adam_weight_decay=1e-2,
                                                          adam_epsilon=1e-8, max_grad_norm=2.0))

    def objective(self):
        if self.new:
            from trainer.config import ObjectiveConfig

            return ObjectiveConfig()
        from trainer.objective import ObjectiveSpec

        return ObjectiveSpec()


def run_child(spec: dict) -> dict:
    import gc

    sys.path.insert(0, spec["trainer_root"])
    # Import everything any mode needs before the baseline, so imports never count as model memory.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import optimum.quanto  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import torch.distributed as dist
    from diffusers import Flux2Transformer2DModel  # noqa: F401

    import trainer
    from trainer import blocks, lora, quantize  # noqa: F401
    from trainer.loop import train_step
    from trainer.parallelize import DistEnv

    if not Path(trainer.__file__).resolve().is_relative_to(Path(spec["trainer_root"]).resolve()):
        raise RuntimeError(f"imported {trainer.__file__}, not the trainer under {spec['trainer_root']}")
    allocator = "glibc default"
    if spec["trainer_allocator"]:
        try:  # what the trainer's rank does first (trainer/host_allocator.py); checkouts before it lack it
            from trainer.host_allocator import MMAP_THRESHOLD_BYTES, return_freed_memory_to_os
        except ImportError:
            pass
        else:
            if return_freed_memory_to_os():
                allocator = f"mmap threshold {MMAP_THRESHOLD_BYTES}"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        allocator = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    env = DistEnv(rank=int(os.environ.get("RANK", "0")), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=torch.device("cpu"))
    api = _Api()
    gc.collect()
    base = _status()
    model = api.build(spec["model"], distributed=spec["distributed"], quantized=spec["quantized"],
                      rank=spec["rank"], env=env)
    gc.collect()
    built = _status()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS: what follows is the steps' own peak
    optimizer = api.optimizer(model)
    side = spec["image_size"] // 16
    g = torch.Generator().manual_seed(env.rank)

    class Batch:
        latents = torch.randn(1, 128, side, side, generator=g)
        prompt_embeds = torch.randn(1, spec["text_tokens"], 96, generator=g)
        reference_latents = None
        image_paths = ()  # named in train_step's non-finite-loss message

    losses = []
    for i in range(spec["steps"]):
        loss = train_step(model, optimizer, micro_batches=[Batch], objective=api.objective(), empty_embeds=None,
                             seed=0, step=i, env=env, max_grad_norm=2.0, nan_policy="stop")[0]
        losses.append(loss)
    end = _status()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    mb = 2**20
    return {"rank": env.rank, "api": api.name, "allocator": allocator, "base_mb": base["VmRSS"] / mb, "load_mb": built["VmHWM"] / mb,
            "built_mb": built["VmRSS"] / mb, "built_anon_mb": built["RssAnon"] / mb,
            "built_file_mb": built["RssFile"] / mb, "step_mb": end["VmHWM"] / mb, "end_mb": end["VmRSS"] / mb,
            "end_anon_mb": end["RssAnon"] / mb, "end_file_mb": end["RssFile"] / mb,
            "peak_mb": max(built["VmHWM"], end["VmHWM"]) / mb, "losses": losses}


# -------------------------------------------------------------------------------------------- parent


def command(mode: str, spec: dict) -> list[str]:
    _, procs, _ = MODES[mode]
    script = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if procs > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *script]
    return [sys.executable, *script]


def run_mode(mode: str, *, model: Path, args: argparse.Namespace) -> list[dict]:
    distributed, _, quantized = MODES[mode]
    spec = {"model": str(model), "distributed": distributed, "quantized": quantized, "rank": args.rank,
            "steps": args.steps, "image_size": args.image_size, "text_tokens": args.text_tokens,
            "trainer_root": str(args.trainer_root.resolve()), "trainer_allocator": not args.glibc_default}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(args.trainer_root.resolve())}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    with tempfile.TemporaryDirectory(prefix="load_memory_out_") as out:
        spec["out"] = out
        proc = subprocess.run(command(mode, spec), cwd=args.trainer_root, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        if proc.returncode != 0:
            log(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"{mode} on {model.name} failed ({proc.returncode})")
        rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    if len(rows) != MODES[mode][1]:
        raise SystemExit(f"{mode} on {model.name}: {len(rows)} ranks reported, expected {MODES[mode][1]}")
    return rows


def table(models: dict, results: dict) -> str:
    small, large = models["small"], models["large"]
    delta = large["bytes"] - small["bytes"]
    lines = [f"models (bf16 bytes of transformer/): small {small['bytes'] / 2**20:.1f} MiB "
             f"({small['params'] / 1e6:.1f} M params, {small['single']} single blocks), large "
             f"{large['bytes'] / 2**20:.1f} MiB ({large['params'] / 1e6:.1f} M, {large['single']} single); "
             f"difference {delta / 2**20:.1f} MiB", "",
             "| mode | procs | base MB small / large | peak MB small | peak MB large | load-peak slope | "
             "step-peak slope | peak slope (x bf16 bytes) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {MODES[mode][1]} | {r['small']['base_mb']:.0f} / {r['large']['base_mb']:.0f} | "
                     f"{r['small']['peak_mb']:.0f} | {r['large']['peak_mb']:.0f} | {r['load_slope']:.2f} | "
                     f"{r['step_slope']:.2f} | **{r['slope']:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        row = run_child(spec)
        # one file per rank: the ranks of a torchrun group share stdout, where their lines can interleave
        Path(spec["out"], f"rank{row['rank']}.json").write_text(json.dumps(row))
        return 0
    started = time.perf_counter()
    configs = {"small": transformer_config(args.heads, args.double, args.small_single),
               "large": transformer_config(args.heads, args.double, args.large_single)}
    if args.dry_run:
        for name, config in configs.items():
            params, nbytes = bf16_bytes(config)
            print(f"{name}: {params / 1e6:.1f} M params, {nbytes / 2**20:.1f} MiB bf16 "
                  f"(hidden {args.heads * 128}, {args.double} double + {config['num_single_layers']} single)")
        for mode in args.modes:
            print(f"{mode}: " + " ".join(command(mode, {"...": "..."})))
        return 0
    if args.keep:
        work = args.work_dir or Path(tempfile.gettempdir()) / "load_memory_models"
        work.mkdir(parents=True, exist_ok=True)
        holder = None
    else:
        holder = tempfile.TemporaryDirectory(prefix="load_memory_", dir=args.work_dir)
        work = Path(holder.name)
    try:
        models = {}
        for name, config in configs.items():
            folder = make_model(work / name, config)
            params, _ = bf16_bytes(config)
            models[name] = {"folder": folder, "bytes": file_bytes(folder), "params": params,
                            "single": config["num_single_layers"]}
            log(f"{name}: {models[name]['bytes'] / 2**20:.1f} MiB bf16 in {folder}")
        results = {}
        for mode in args.modes:
            per_model = {}
            for name in ("small", "large"):
                ranks = run_mode(mode, model=models[name]["folder"], args=args)
                worst = max(ranks, key=lambda r: r["peak_mb"])
                per_model[name] = {**worst, "ranks": ranks}
                log(f"{mode} {name}: peak {worst['peak_mb']:.0f} MB (rank {worst['rank']}; load "
                    f"{worst['load_mb']:.0f}, steps {worst['step_mb']:.0f}, base {worst['base_mb']:.0f}; after "
                    f"build anon {worst['built_anon_mb']:.0f} + file {worst['built_file_mb']:.0f})")
            delta_mb = (models["large"]["bytes"] - models["small"]["bytes"]) / 2**20
            s, lg = per_model["small"], per_model["large"]
            results[mode] = {**per_model, "slope": (lg["peak_mb"] - s["peak_mb"]) / delta_mb,
                             "load_slope": (lg["load_mb"] - s["load_mb"]) / delta_mb,
                             "step_slope": (lg["step_mb"] - s["step_mb"]) / delta_mb,
                             "built_slope": (lg["built_mb"] - s["built_mb"]) / delta_mb}
    finally:
        if holder is not None:
            holder.cleanup()
    print(table(models, results))
    api = next(iter(results.values()))["small"]["api"] if results else None
    out = {"trainer_root": str(args.trainer_root.resolve()), "api": api, "steps": args.steps,
           "allocator": next(iter(results.values()))["small"]["allocator"] if results else None,
           "malloc_mmap_threshold": args.malloc_mmap_threshold,
           "image_size": args.image_size, "text_tokens": args.text_tokens, "rank": args.rank,
           "models": {k: {kk: (str(vv) if kk == "folder" else vv) for kk, vv in v.items()} for k, v in models.items()},
           "modes": results, "wall_s": time.perf_counter() - started}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if "--child" not in sys.argv:
        sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
