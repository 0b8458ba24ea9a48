"""Host RAM while the text encoder loads for caption caching: peak RSS slope against its bf16 bytes.

Two Mistral3ForConditionalGeneration text encoders of FLUX.2-dev's structure at mid size (text hidden 1024, 8 heads
of 128 with 2 KV heads, MLP 4096, a tiny vision tower; 8 vs 32 decoder layers) are written in bf16 with
save_pretrained into trainer.tiny's folder layout. For each precision (bf16, int8-quanto) and model a fresh process
loads the encoder through the trainer's own trainer.offload.load_text_encoder on the CPU (what Build Dataset and
Mistral Encode run) and reports from /proc/self/status:

  peak_mb   VmHWM: the process's peak RSS, baseline (imports) included;
  anon_mb / file_mb   RssAnon / RssFile after the load (file: pages of the weight files still mapped).

  slope = (peak_large - peak_small) / (bf16_bytes_large - bf16_bytes_small)

Usage (from the repository root):
  python bench/text_encoder_memory.py [--keep] [--work-dir DIR] [--precisions bf16,int8-quanto]
  python bench/text_encoder_memory.py --trainer-root /tmp/before    # another checkout's trainer
Progress goes to stderr; stdout is a markdown table, then one JSON line. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8, "num_key_value_heads": 2,
               "head_dim": 128}


def log(message: str) -> None:
    print(f"[text_encoder_memory] {message}", file=sys.stderr, flush=True)


def make_model(folder: Path, layers: int) -> tuple[Path, int]:
    """trainer.tiny's folder with text_encoder/ replaced by a mid-size Mistral3 of `layers` layers (bf16)."""
    import shutil

    import torch

    from trainer.tiny import build_text_encoder, make_tiny

    stamp = folder / "text_encoder_memory.json"
    wanted = {"layers": layers, **TEXT_CONFIG}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        if folder.exists():
            shutil.rmtree(folder)
        make_tiny(out_dir=folder, seed=0)
        torch.manual_seed(0)
        encoder = build_text_encoder(vocab_size=1000)
        config = encoder.config
        config.text_config.update(TEXT_CONFIG | {"num_hidden_layers": layers})
        encoder = type(encoder)(config).to(torch.bfloat16)
        shutil.rmtree(folder / "text_encoder")
        encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        stamp.write_text(json.dumps(wanted))
    from load_memory import file_bytes  # this folder's sibling script

    total = file_bytes(folder, part="text_encoder")
    return folder, total


def run_child(spec: dict) -> dict:
    sys.path.insert(0, spec["trainer_root"])
    import gc

    import optimum.quanto  # noqa: F401  imports first: they are not model memory
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from trainer.config import QuantizationConfig
    from trainer.model_files import ModelFolder
    from trainer.offload import load_text_encoder

    def status() -> dict[str, float]:
        with open("/proc/self/status") as fh:
            rows = dict(line.split(":", 1) for line in fh if ":" in line)
        return {k: int(rows[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

    gc.collect()
    base = status()
    quant = QuantizationConfig(text_encoder_precision=spec["precision"], quantize_via="cpu") \
        if spec["precision"] != "bf16" else None
    encoder = load_text_encoder(ModelFolder(root=Path(spec["model"])), precision="bf16", device="cpu",
                                quantization=quant)
    gc.collect()
    end = status()
    assert encoder is not None
    return {"base_mb": base["VmRSS"], "peak_mb": end["VmHWM"], "anon_mb": end["RssAnon"], "file_mb": end["RssFile"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="bf16,int8-quanto")
    parser.add_argument("--small-layers", type=int, default=8)
    parser.add_argument("--large-layers", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep and reuse the generated models in the work dir")
    parser.add_argument("--trainer-root", type=Path, default=REPO_ROOT)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    holder = None if args.keep else tempfile.TemporaryDirectory(prefix="te_memory_", dir=args.work_dir)
    work = Path(holder.name) if holder else (args.work_dir or Path(tempfile.gettempdir()) / "te_memory_models")
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = {name: make_model(work / name, layers)
                  for name, layers in (("small", args.small_layers), ("large", args.large_layers))}
        delta_mb = (models["large"][1] - models["small"][1]) / 2**20
        log(f"text encoders: {models['small'][1] / 2**20:.0f} / {models['large'][1] / 2**20:.0f} MiB bf16")
        results = {}
        for precision in args.precisions.split(","):
            rows = {}
            for name, (folder, _) in models.items():
                spec = {"model": str(folder), "precision": precision, "trainer_root": str(args.trainer_root.resolve())}
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(args.trainer_root.resolve())}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                      cwd=args.trainer_root, env=env, capture_output=True, text=True, timeout=900,
                                      check=False)
                if proc.returncode != 0:
                    log(proc.stderr[-4000:])
                    raise SystemExit(f"{precision} on {name} failed")
                rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                log(f"{precision} {name}: {rows[name]}")
            results[precision] = {**rows, "slope": (rows["large"]["peak_mb"] - rows["small"]["peak_mb"]) / delta_mb,
                                  "anon_slope": (rows["large"]["anon_mb"] - rows["small"]["anon_mb"]) / delta_mb,
                                  "file_slope": (rows["large"]["file_mb"] - rows["small"]["file_mb"]) / delta_mb}
    finally:
        if holder is not None:
            holder.cleanup()
    print(f"text encoders: {models['small'][1] / 2**20:.0f} / {models['large'][1] / 2**20:.0f} MiB bf16 "
          f"({args.small_layers} / {args.large_layers} layers)\n")
    print("| precision | peak MB small | peak MB large | peak slope | after load: anon slope / file slope |")
    print("|---|---:|---:|---:|---|")
    for precision, r in results.items():
        print(f"| {precision} | {r['small']['peak_mb']:.0f} | {r['large']['peak_mb']:.0f} | **{r['slope']:.2f}** | "
              f"{r['anon_slope']:.2f} / {r['file_slope']:.2f} |")
    print(json.dumps({"trainer_root": str(args.trainer_root.resolve()), "results": results}))
    return 0


if __name__ == "__main__":
    if "--child" not in sys.argv:
        sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
