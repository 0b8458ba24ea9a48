"""The warm trainer on this machine: can it fork runs here, on which device do they train, and how much sooner do
they start than a cold launch?

Made for a lent GPU machine, where the forks are only sound while the worker's imports leave CUDA untouched
(trainer/nvml_facts.py); it runs on the CPU too. It starts the warm worker as ComfyUI does (trainer/warm_worker.py),
prints the line the worker wrote when its imports were done ("ready to fork runs", or why runs will start
cold), then launches the same tiny run (bench/vs_diffusers_example.py's workload, our side only) alternately forked
from the worker and cold (`python -m trainer train`; with --processes N > 1, N ranks forked against torchrun's N), and
reports launch to first step and step time of each, and the device each forked run reported in its start event.

    python bench/warm_fork_check.py [--rounds 2] [--steps 5] [--processes 1]

The last stdout line is one JSON object. Nothing here asserts: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_diffusers_example import (  # noqa: E402 - bench/ is not a package
    REPO,
    launch,
    launch_torchrun,
    launch_warm,
    ours_command,
    prepare,
    start_warm_worker,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="launches of each kind (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per launch (default 5, at least 3)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every launch (default 1)")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes per run (default 1); several: forked ranks against torchrun's")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 3 or args.processes < 1:
        parser.error("--rounds and --processes must be >= 1 and --steps >= 3 (step time needs two intervals)")
    with tempfile.TemporaryDirectory(prefix="warm-fork-check-") as tmp:
        work = Path(tmp)
        model, images = prepare(work, images=4)
        worker, env = start_warm_worker(sys.executable, threads=args.threads)
        try:
            ready_line = (worker.socket_path.parent / "worker.log").read_text().strip().splitlines()[-1:]
            print(f"worker: {ready_line}", file=sys.stderr, flush=True)
            runs: dict[str, list[dict]] = {"warm": [], "cold": []}
            for index in range(args.rounds):
                warm_run = f"warm{index}"
                figures = launch_warm(worker, env, work, warm_run, model=model, images=images, steps=args.steps,
                                      processes=args.processes)
                events = (work / warm_run / "out" / "events.jsonl").read_text().splitlines()
                figures["device"] = next(json.loads(e).get("device") for e in events if '"start"' in e)
                runs["warm"].append(figures)
                if args.processes == 1:
                    target = ours_command(work, f"cold{index}", model=model, images=images, steps=args.steps)
                    runs["cold"].append(launch(sys.executable, target, cwd=REPO, clock=work / f"cold{index}.json",
                                               threads=args.threads, log=work / f"cold{index}.log"))
                else:
                    runs["cold"].append(launch_torchrun(sys.executable, work, f"cold{index}", model=model,
                                                        images=images, steps=args.steps, threads=args.threads,
                                                        processes=args.processes))
                print(f"round {index}: warm {runs['warm'][-1]['launch_s']:.2f} s, "
                      f"cold {runs['cold'][-1]['launch_s']:.2f} s to the first step", file=sys.stderr, flush=True)
        finally:
            worker.stop()
    result = {"worker": ready_line[0] if ready_line else "", "processes": args.processes, "runs": runs}
    for figure in ("launch_s", "step_s"):
        warm, cold = (statistics.median(r[figure] for r in runs[kind]) for kind in ("warm", "cold"))
        result[figure] = {"warm": round(warm, 3), "cold": round(cold, 3), "ratio": round(warm / cold, 3)}
    result["devices"] = sorted({r["device"] for r in runs["warm"]})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
