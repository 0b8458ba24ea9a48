"""Step time and per-rank peak memory of the trainer: one process vs DDP vs FSDP2 with 2 CPU processes.

The same global batch (2 samples per step) in each mode: 1 process x batch 2 ("none"), 2 processes x batch 1
with DDP, and with FSDP2. Each mode runs the real trainer (`python -m trainer train` / torchrun) on the tiny
model; step times and rank 0's peak memory come from its events.jsonl. Modes run one after another in
rounds (A B C, B C A, ...) so machine noise hits them alike. Prints a final JSON line.

    OMP_NUM_THREADS=1 python bench/distributed_modes.py [--steps 12] [--rounds 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {
    "none (1 x batch 2)": {"distributed": "none", "train_batch_size": 2, "nproc": 1},
    "ddp (2 x batch 1)": {"distributed": "ddp", "train_batch_size": 1, "nproc": 2},
    "fsdp2 (2 x batch 1)": {"distributed": "fsdp2", "train_batch_size": 1, "nproc": 2},
}


def run_mode(name: str, *, model: Path, manifest: Path, out: Path, steps: int) -> dict:
    mode = MODES[name]
    config = {
        "model_type": "lora", "model_family": "flux2", "pretrained_model_name_or_path": str(model),
        "output_dir": str(out), "dataset_manifest": str(manifest), "train_batch_size": mode["train_batch_size"],
        "max_train_steps": steps, "learning_rate": 1e-3, "lora_rank": 16, "lora_alpha": 16,
        "mixed_precision": "no", "gradient_checkpointing": False, "checkpointing_steps": 10_000,
        "validation_steps": 0, "distributed": mode["distributed"], "seed": 1,
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(config))
    if mode["nproc"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(mode["nproc"]), "-m", "trainer", "train", "--config", str(path)]
    else:
        cmd = [sys.executable, "-m", "trainer", "train", "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps_ev = [e for e in events if e["event"] == "step"][2:]  # the first steps include warm-up
    return {
        "seconds_per_step": statistics.median(e["seconds_per_step"] for e in steps_ev),
        "peak_memory_mb_rank0": max(e.get("peak_memory_mb") or 0 for e in steps_ev),
        "final_loss": steps_ev[-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    from trainer.build import build_dataset
    from trainer.model_files import inspect_model_folder
    from trainer.sample_data import make_sample_dataset
    from trainer.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny(out_dir=root / "model", seed=0)
        images = make_sample_dataset(out_dir=root / "images", count=8, size=args.image_size)
        manifest = build_dataset(image_dir=images, model=inspect_model_folder(model), out_dir=root / "built",
                                 resolution=args.image_size, text_precision="fp32")
        names = list(MODES)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = root / f"run{r}_{names.index(name)}"
                results[name].append(run_mode(name, model=model, manifest=manifest, out=out, steps=args.steps))
                print(f"round {r} {name}: {results[name][-1]}", flush=True)
    summary = {
        name: {
            "median_seconds_per_step": statistics.median(x["seconds_per_step"] for x in runs),
            "peak_memory_mb_rank0": max(x["peak_memory_mb_rank0"] for x in runs),
        }
        for name, runs in results.items()
    }
    base = summary["none (1 x batch 2)"]["median_seconds_per_step"]
    for entry in summary.values():
        entry["time_vs_single_process"] = round(entry["median_seconds_per_step"] / base, 3)
    print(json.dumps({"bench": "distributed_modes", "steps": args.steps, "rounds": args.rounds,
                      "image_size": args.image_size, "threads": os.environ.get("OMP_NUM_THREADS", "1"),
                      "modes": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
