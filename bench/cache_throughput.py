"""Dataset cache throughput on the tiny model: latent caching (images/s), text caching (prompts/s) and the
cache's bytes per image, through the same build_dataset code users run.

One build on fresh caches with N images of SIZE x SIZE and N distinct captions (plus "" for dropout), then
a second build on the same inputs (everything cached: no encoder loads). The two cache phases are timed by
wrapping build.fill_latent_cache and build.fill_text_cache; each figure includes loading its encoder once
(the cost a real build pays), and the load time is also reported on its own.

Usage (from the repository root):
  python bench/cache_throughput.py [--images 32] [--size 64] [--vae-batch 4] [--text-batch 8] [--model DIR]
Progress goes to stderr; the last stdout line is one JSON object. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image side and training resolution (multiple of 16)")
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--text-batch", type=int, default=8)
    parser.add_argument("--model", default=None, help="a FLUX.2 diffusers folder (default: a fresh tiny model)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    from trainer import build, build_report, model_files
    from trainer.model_files import inspect_model_folder
    from trainer.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else make_tiny(out_dir=root / "model", seed=0)
        model = inspect_model_folder(model_dir)
        images = root / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
            (images / f"{i:04d}.txt").write_text(f"image number {i} of a benchmark, a colourful noise pattern", encoding="utf-8")

        timings: dict[str, float] = {}

        def timed(name, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            return wrapper

        for name, loader in (("vae_load", "load_vae"), ("text_load", "load_text_encoder")):
            setattr(model_files, loader, timed(name, getattr(model_files, loader)))
        build.fill_latent_cache = timed("latent_phase", build.fill_latent_cache)
        build.fill_text_cache = timed("text_phase", build.fill_text_cache)

        out = root / "built"
        start = time.perf_counter()
        build.build_dataset(image_dir=images, model=model, out_dir=out, resolution=args.size, text_precision="fp32",
                            vae_batch_size=args.vae_batch, text_batch_size=args.text_batch)
        first = time.perf_counter() - start
        report = build_report.load_build_report(out)
        cold = dict(timings)
        timings.clear()
        start = time.perf_counter()
        build.build_dataset(image_dir=images, model=model, out_dir=out, resolution=args.size, text_precision="fp32",
                            vae_batch_size=args.vae_batch, text_batch_size=args.text_batch)
        second = time.perf_counter() - start
        again = build_report.load_build_report(out)
        prompts = report.prompts_encoded
        result = {
            "device": "cpu", "threads": args.threads, "images": args.images, "size": args.size,
            "vae_batch": args.vae_batch, "text_batch": args.text_batch, "model": "tiny" if not args.model else str(model_dir),
            "latent_images_per_s": round(report.vae_images_encoded / cold["latent_phase"], 2),
            "latent_images_per_s_excl_load": round(
                report.vae_images_encoded / (cold["latent_phase"] - cold.get("vae_load", 0.0)), 2),
            "text_prompts_per_s": round(prompts / cold["text_phase"], 2),
            "text_prompts_per_s_excl_load": round(prompts / (cold["text_phase"] - cold.get("text_load", 0.0)), 2),
            "vae_load_s": round(cold.get("vae_load", 0.0), 3), "text_load_s": round(cold.get("text_load", 0.0), 3),
            "latent_bytes_per_image": round(report.latent_bytes_per_image, 1),
            "text_bytes_per_caption": round(report.text_bytes_per_caption, 1),
            "first_build_s": round(first, 3), "cached_build_s": round(second, 3),
            "cached_build_encoder_loads": int(again.vae_loaded) + int(again.text_encoder_loaded),
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
