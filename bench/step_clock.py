"""Run a Python training script or module and record when each optimizer step finished.

    STEP_CLOCK_T0=<epoch seconds before the launch> python bench/step_clock.py OUT.json script.py [args...]
    STEP_CLOCK_T0=... python bench/step_clock.py OUT.json -m trainer train --config cfg.json

A global torch.optim post-step hook (it fires for every torch.optim.Optimizer, whoever built it) appends the
seconds since STEP_CLOCK_T0; at exit OUT.json gets {"steps": [...], "cpu_steps": [...], "peak_rss_mb": ...}: wall seconds since STEP_CLOCK_T0 and
the process's CPU seconds (user + system) at each step. The launcher sets
STEP_CLOCK_T0 just before it starts the process, so the first figure is launch to first finished step,
interpreter start included. Used by bench/vs_diffusers_example.py to time both trainers the same way.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    out, target = sys.argv[1], sys.argv[2:]
    t0 = float(os.environ["STEP_CLOCK_T0"])
    steps: list[float] = []
    cpu: list[float] = []

    def write() -> None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"steps": steps, "cpu_steps": cpu, "peak_rss_mb": peak_kb / 1024}, fh)

    def stamp(*_: object) -> None:
        steps.append(time.time() - t0)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(usage.ru_utime + usage.ru_stime)  # CPU seconds: what a busy shared machine does not inflate

    atexit.register(write)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(stamp)
    if target[0] == "-m":
        sys.path[0] = os.getcwd()  # as `python -m` does
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target[0]))  # as `python script.py` does
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
