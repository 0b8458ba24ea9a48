"""Our trainer against diffusers' own FLUX.2 LoRA example, launched side by side on the same tiny model and data.

The example (examples/dreambooth/train_dreambooth_lora_flux2.py of the diffusers repository) is not part of this
repository: fetch it and give its path. It needs torchvision, so give --python an interpreter that has it and our
requirements (a ComfyUI environment does). Both trainers run as a user launches them, one process each, with the
example's workload: one instance prompt ("dog") on every image, attention LoRA targets, rank 4 (alpha 4), no LoRA
dropout, 64 px, batch 1, fp32 (no mixed precision on the CPU), no gradient checkpointing, no validation, constant
learning rate 1e-4, --steps optimizer steps. Ours runs `python -m trainer train --config <cfg>` with a SimpleTuner
data backend (caption_strategy instanceprompt) and the "attention" preset (SimpleTuner's, which also adapts the
double blocks' text-stream add_q/k/v and to_add_out); the example gets the same modules through its own
--lora_layers, so both train the same layers.

Each launch starts from nothing: a new output folder and, for ours, an empty latent and text cache, so launch to
first step includes every import, model load and encode of both. bench/step_clock.py times each optimizer step
(a global torch.optim hook) from just before the process starts. Launches alternate (ours, example, example,
ours, ...) so that a noisy machine hits both alike.

Figures per launch: launch_s (launch to the end of the first optimizer step), step_s (median of the
intervals between steps 2..N), the same two in CPU seconds of the process (launch_cpu_s, step_cpu_s: with one
thread they equal wall time on an idle machine, and other jobs on a shared one do not inflate them; the interpreter's
own start before bench/step_clock.py runs is not in launch_cpu_s) and peak RSS. The ratios are ours' median over the example's median (paired
ratios too). Targets (issue 16): launch <= 0.75x, step <= 0.95x.

    OMP_NUM_THREADS=1 python bench/vs_diffusers_example.py --example /path/to/train_dreambooth_lora_flux2.py \
        --python /path/to/comfyui/.venv/bin/python [--rounds 3] [--steps 10] [--warm] [--torchrun]

Progress goes to stderr; the last stdout line is one JSON object. Nothing here asserts: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"launch_s": 0.75, "step_s": 0.95, "launch_cpu_s": 0.75, "step_cpu_s": 0.95}
INSTANCE_PROMPT = "dog"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, required=True, help="diffusers' train_dreambooth_lora_flux2.py")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for both trainers (needs torchvision for the example; default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="launches of each trainer (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per launch (default 10)")
    parser.add_argument("--images", type=int, default=4, help="training images (default 4)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                        help="OMP_NUM_THREADS of both (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    parser.add_argument("--warm", action="store_true",
                        help="also launch ours forked from the warm trainer (trainer/warm_worker.py, as the Train LoRA "
                             "node does inside ComfyUI), started once before the rounds; timed from the request")
    parser.add_argument("--torchrun", action="store_true",
                        help="also launch ours under torchrun with one process (how the Train LoRA node started a "
                             "one-process run before it started the trainer directly), timed from its events.jsonl")
    args = parser.parse_args(argv)
    if not args.example.is_file():
        parser.error(f"--example {args.example}: no such file; fetch diffusers' "
                     "examples/dreambooth/train_dreambooth_lora_flux2.py and give its path")
    if args.rounds < 1 or args.steps < 3:
        parser.error("--rounds must be >= 1 and --steps >= 3 (step time needs two intervals)")
    return args


def prepare(work: Path, *, images: int) -> tuple[Path, Path]:
    """The tiny model and a folder of PNGs only (the example reads every file of its folder as an image)."""
    from trainer.sample_data import make_sample_dataset
    from trainer.tiny import make_tiny

    model = make_tiny(out_dir=work / "model", seed=0)
    make_sample_dataset(out_dir=work / "sample", count=images, size=64, seed=0)
    pngs = work / "images"
    pngs.mkdir()
    for png in sorted((work / "sample").glob("*.png")):
        shutil.copy(png, pngs / png.name)
    return model, pngs


def ours_command(work: Path, run: str, *, model: Path, images: Path, steps: int) -> list[str]:
    folder = work / run
    folder.mkdir()
    backend = [
        {"id": "dog", "type": "local", "instance_data_dir": str(images), "caption_strategy": "instanceprompt",
         "instance_prompt": INSTANCE_PROMPT, "resolution": 64, "resolution_type": "pixel_area",
         "cache_dir_vae": str(folder / "cache" / "vae")},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(folder / "cache" / "text")},
    ]
    config = {
        "pretrained_model_name_or_path": str(model), "data_backend_config": str(folder / "backend.json"),
        "output_dir": str(folder / "out"), "lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0,
        "flux_lora_target": "attention", "train_batch_size": 1, "max_train_steps": steps, "learning_rate": 1e-4,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "mixed_precision": "no", "gradient_checkpointing": False,
        "validation_steps": 0, "checkpointing_steps": 10 * steps,
    }
    (folder / "backend.json").write_text(json.dumps(backend))
    (folder / "config.json").write_text(json.dumps(config))
    return ["-m", "trainer", "train", "--config", str(folder / "config.json")]


def attention_layers(model: Path) -> str:
    """Our "attention" preset's modules, fully named, as the example's --lora_layers: both train the same layers."""
    from trainer.lora import preset_layers

    config = json.loads((model / "transformer" / "config.json").read_text())
    double, single = preset_layers("attention")
    names = [f"transformer_blocks.{i}.{layer}" for i in range(config["num_layers"]) for layer in double]
    names += [f"single_transformer_blocks.{i}.{layer}" for i in range(config["num_single_layers"]) for layer in single]
    return ",".join(names)


def example_command(work: Path, run: str, *, example: Path, model: Path, images: Path, steps: int) -> list[str]:
    return [str(example), "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--lora_layers", attention_layers(model),
            "--instance_prompt", INSTANCE_PROMPT, "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", str(10 * steps),
            "--output_dir", str(work / run / "out"), "--seed", "0"]


def launch_torchrun(python: str, work: Path, run: str, *, model: Path, images: Path, steps: int, threads: int,
                    processes: int = 1) -> dict:
    """Ours under torchrun (one process by default): launch and step from the step events' times (the worker is
    torchrun's child, out of step_clock's reach; an event follows its optimizer step by well under a millisecond)."""
    target = ours_command(work, run, model=model, images=images, steps=steps)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *target]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    with (work / f"{run}.log").open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{run} (torchrun) failed (exit {proc.returncode}); see {work / f'{run}.log'}")
    return _step_figures(work / run / "out", t0)


def _step_figures(run_dir: Path, t0: float) -> dict:
    from trainer.events import EVENTS_FILE

    events = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    times = [e["time"] - t0 for e in events if e.get("event") == "step"]
    return {"launch_s": times[0], "step_s": statistics.median(b - a for a, b in zip(times, times[1:])),
            "steps": len(times)}


def start_warm_worker(python: str, *, threads: int):
    """The warm trainer as ComfyUI starts it, with the environment the bench gives every launch; waits until its
    imports are done (not timed: in ComfyUI they happen while the user sets up the graph)."""
    from trainer import warm_worker
    from trainer.launch import trainer_env

    env = trainer_env(cwd=REPO, extra={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    worker = warm_worker.start_worker(env=env, cwd=REPO, python=python)
    if worker is None:
        raise SystemExit("--warm: the warm trainer is Linux only (or FLUX2LORA_WARM_TRAINER=0)")
    deadline = time.time() + 600
    while not worker.ready():
        if worker.popen.poll() is not None or time.time() > deadline:
            raise SystemExit("--warm: the warm trainer did not become ready")
        time.sleep(0.2)
    return worker, env


def launch_warm(worker, env: dict, work: Path, run: str, *, model: Path, images: Path, steps: int,
                processes: int = 1) -> dict:
    """Ours forked from the warm trainer: launch = request to the first step event."""
    target = ours_command(work, run, model=model, images=images, steps=steps)
    t0 = time.time()
    forked = worker.start_run(argv=target[2:], cwd=REPO, env=env, log_path=work / f"{run}.log", processes=processes)
    if forked is None:
        raise SystemExit(f"{run}: the warm trainer refused the run; see its log line")
    if forked.wait() != 0:
        raise SystemExit(f"{run} (warm) failed; see {work / f'{run}.log'}")
    return _step_figures(work / run / "out", t0)


def launch(python: str, target: list[str], *, cwd: Path, clock: Path, threads: int, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "STEP_CLOCK_T0": ""}
    env["STEP_CLOCK_T0"] = repr(time.time())
    with log.open("w") as fh:
        proc = subprocess.run([python, str(REPO / "bench" / "step_clock.py"), str(clock), *target], cwd=cwd,
                              env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(target[:3])} failed (exit {proc.returncode}); see {log}")
    data = json.loads(clock.read_text())
    steps, cpu = data["steps"], data["cpu_steps"]
    return {"launch_s": steps[0], "step_s": statistics.median(b - a for a, b in zip(steps, steps[1:])),
            "launch_cpu_s": cpu[0], "step_cpu_s": statistics.median(b - a for a, b in zip(cpu, cpu[1:])),
            "peak_rss_mb": data["peak_rss_mb"], "steps": len(steps)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vs_example_"))
    work.mkdir(parents=True, exist_ok=True)
    model, images = prepare(work, images=args.images)
    results: dict[str, list[dict]] = {"ours": [], "example": []}
    extra = (("ours_warm",) if args.warm else ()) + (("ours_torchrun",) if args.torchrun else ())
    results.update({who: [] for who in extra})
    worker, warm_env = start_warm_worker(args.python, threads=args.threads) if args.warm else (None, None)
    for k in range(args.rounds):
        order = ("ours", "example") if k % 2 == 0 else ("example", "ours")
        for who in order + extra:
            run = f"{who}{k}"
            if who in extra:
                if who == "ours_warm":
                    figures = launch_warm(worker, warm_env, work, run, model=model, images=images, steps=args.steps)
                else:
                    figures = launch_torchrun(args.python, work, run, model=model, images=images, steps=args.steps,
                                              threads=args.threads)
                results[who].append(figures)
                print(f"{run}: launch {figures['launch_s']:.2f} s, step {figures['step_s']:.3f} s", file=sys.stderr,
                      flush=True)
                continue
            if who == "ours":
                target, cwd = ours_command(work, run, model=model, images=images, steps=args.steps), REPO
            else:
                (work / run).mkdir()
                target = example_command(work, run, example=args.example.resolve(), model=model, images=images,
                                         steps=args.steps)
                cwd = work / run
            figures = launch(args.python, target, cwd=cwd, clock=work / f"{run}.clock.json", threads=args.threads,
                             log=work / f"{run}.log")
            if figures["steps"] != args.steps:
                raise SystemExit(f"{run}: {figures['steps']} optimizer steps recorded, expected {args.steps}")
            results[who].append(figures)
            print(f"{run}: launch {figures['launch_s']:.2f} s ({figures['launch_cpu_s']:.2f} CPU s), step "
                  f"{figures['step_s']:.3f} s ({figures['step_cpu_s']:.3f} CPU s), peak RSS "
                  f"{figures['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary: dict = {"rounds": args.rounds, "steps": args.steps, "threads": args.threads, "python": args.python}
    for key in ("launch_s", "step_s", "launch_cpu_s", "step_cpu_s", "peak_rss_mb"):
        ours = statistics.median(r[key] for r in results["ours"])
        example = statistics.median(r[key] for r in results["example"])
        paired = statistics.median(o[key] / e[key] for o, e in zip(results["ours"], results["example"]))
        summary[key] = {"ours": round(ours, 3), "example": round(example, 3), "ratio": round(ours / example, 3),
                        "ratio_paired_median": round(paired, 3), "target": TARGETS.get(key)}
    for who in extra:  # wall seconds from the step events: against the example, and against ours cold
        for key in ("launch_s", "step_s"):
            median = statistics.median(r[key] for r in results[who])
            summary[key][who] = {"seconds": round(median, 3),
                                 "ratio_to_example": round(median / summary[key]["example"], 3),
                                 "ratio_paired_median": round(statistics.median(
                                     w[key] / e[key] for w, e in zip(results[who], results["example"])), 3),
                                 "ratio_to_ours_cold": round(median / summary[key]["ours"], 3)}
    if worker is not None:
        worker.stop()
    summary["runs"] = results
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
