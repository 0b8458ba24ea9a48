"""Subcommands of `python -m trainer`. Each one parses arguments and calls one library function.

New subcommands register here with a `_add_<name>` function and are listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random FLUX.2 (diffusers layout) for tests and the demo")
    p.add_argument("--out", required=True, help="folder to create (must be empty or new)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--overwrite", action="store_true", help="replace a tiny model written there before")

    def run(args: argparse.Namespace) -> int:
        from .tiny import make_tiny

        out = make_tiny(out_dir=args.out, seed=args.seed, overwrite=args.overwrite)
        print(out)
        return 0

    p.set_defaults(run=run)


def _add_convert_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-lora", help="convert a FLUX.2 LoRA .safetensors between the ComfyUI and diffusers layouts")
    p.add_argument("src", help="LoRA .safetensors to read (layout detected from its keys)")
    p.add_argument("dst", help="LoRA .safetensors to write; must not exist")
    p.add_argument("--to", required=True, choices=("comfyui", "diffusers"), help="layout of the written file")

    def run(args: argparse.Namespace) -> int:
        from .lora_keys import convert_lora_file

        print(convert_lora_file(args.src, args.dst, to=args.to))
        return 0

    p.set_defaults(run=run)


def _add_inspect_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect-lora", help="print a FLUX.2 LoRA file's layout, modules (rank, alpha, scale) and metadata as JSON")
    p.add_argument("path", help="LoRA .safetensors to read")

    def run(args: argparse.Namespace) -> int:
        import json

        from .lora_keys import describe_lora_file

        print(json.dumps(describe_lora_file(args.path), indent=2, sort_keys=True))
        return 0

    p.set_defaults(run=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA (run under torchrun for several processes)")
    p.add_argument("--config", required=True, help="run.json with SimpleTuner-style keys")

    def run(args: argparse.Namespace) -> int:
        from .config import TrainConfig
        from .loop import train
        from .parallelize import close_distributed, init_distributed

        config = TrainConfig.from_json(args.config)  # every check before any process group or weights
        env = init_distributed()
        try:
            path = train(config, env=env)
            if path is not None:
                print(f"LoRA written to {path}")
        finally:
            close_distributed()
        return 0

    p.set_defaults(run=run)


def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-dataset", help="scan an image folder and cache its VAE latents and caption embeddings")
    p.add_argument("--images", required=True, help="folder of training images (png, jpg, webp, bmp), searched recursively")
    p.add_argument("--model", required=True, help="FLUX.2 diffusers folder whose VAE and text encoder fill the caches")
    p.add_argument("--out", required=True, help="dataset folder to write (manifest.json, report.json, latents/, text/)")
    p.add_argument("--resolution", type=int, default=512, help="buckets hold about N x N pixels, sides multiples of 16")
    p.add_argument("--repeats", type=int, default=1, help="how often each image appears per epoch")
    p.add_argument("--caption-strategy", default="textfile", choices=("textfile", "filename", "instanceprompt"),
                   help="textfile: same-name .txt; filename: the file name; instanceprompt: --instance-prompt for all")
    p.add_argument("--instance-prompt", default=None, help="the caption of every image with --caption-strategy instanceprompt")
    p.add_argument("--prompt", action="append", default=[], dest="prompts",
                   help="validation prompt to cache as well (repeatable), so training never loads the text encoder")
    p.add_argument("--vae-precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="VAE dtype (fp32 default)")
    p.add_argument("--text-precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="text encoder dtype")
    p.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda or cuda:1")

    def run(args: argparse.Namespace) -> int:
        from .data import build_dataset, load_build_report
        from .model_files import inspect_model_folder

        manifest = build_dataset(
            image_dir=args.images, model=inspect_model_folder(args.model), out_dir=args.out,
            resolution=args.resolution, repeats=args.repeats, caption_strategy=args.caption_strategy,
            instance_prompt=args.instance_prompt, vae_precision=args.vae_precision,
            text_precision=args.text_precision, device=args.device, extra_prompts=args.prompts,
        )
        print(load_build_report(manifest.parent).summary())
        print(f"manifest: {manifest}")
        return 0

    p.set_defaults(run=run)


def _add_make_sample_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-sample-dataset", help="write the demo dataset: coloured shapes with captions")
    p.add_argument("--out", required=True, help="folder to write (empty or new)")
    p.add_argument("--count", type=int, default=8, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed for placement")

    def run(args: argparse.Namespace) -> int:
        from .sample_data import make_sample_dataset

        print(make_sample_dataset(out_dir=args.out, count=args.count, size=args.size, seed=args.seed))
        return 0

    p.set_defaults(run=run)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_make_tiny, _add_convert_lora, _add_inspect_lora, _add_train, _add_build_dataset, _add_make_sample_dataset]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="FLUX.2 LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser
