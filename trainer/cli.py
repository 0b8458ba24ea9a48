"""Subcommands of `python -m trainer`. Each one parses arguments and calls one library function.

New subcommands register here with a `_add_<name>` function and are listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .flavours import FLAVOURS


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random FLUX.2 (diffusers layout) for tests and the demo")
    p.add_argument("--out", required=True, help="folder to create (must be empty or new)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--overwrite", action="store_true", help="replace a tiny model written there before")
    p.add_argument("--flavour", choices=FLAVOURS, default="dev",
                   help="which FLUX.2 to imitate: dev (Mistral3 text encoder) or klein-4b / klein-9b (Qwen3 text "
                        "encoder, the real block counts, no guidance embedding)")
    p.add_argument("--distilled", action="store_true",
                   help="klein only: write the step-distilled variant (model_index.json is_distilled true)")

    def run(args: argparse.Namespace) -> int:
        from .tiny import make_tiny

        out = make_tiny(out_dir=args.out, seed=args.seed, overwrite=args.overwrite, flavour=args.flavour,
                        distilled=args.distilled)
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
    p = sub.add_parser("inspect-lora", help="print a FLUX.2 LoRA or LoKr file's adapter type, layout, modules (shapes, scale) and metadata as JSON")
    p.add_argument("path", help="LoRA .safetensors to read")

    def run(args: argparse.Namespace) -> int:
        import json

        from .lokr_keys import describe_adapter_file

        print(json.dumps(describe_adapter_file(args.path), indent=2, sort_keys=True))
        return 0

    p.set_defaults(run=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", allow_abbrev=False,
                       help="train a LoRA (run under torchrun for several processes, or give --num-processes)",
                       description="Any further --key=value or --key value sets that config key over the file's.")
    p.add_argument("--config", default=None,
                   help="config.json / run.json with SimpleTuner-style keys (default: config/config.json, then "
                        "config.json, under the working directory; trainer/cli_config.py)")
    p.set_defaults(accepts_config_keys=True)
    p.add_argument("--num-processes", type=int, default=None,
                   help="supervise the run as the Train LoRA node does: take the output folder's lock, check memory, "
                        "start torchrun with this many processes on this machine and print its events as JSON lines "
                        "(Ctrl-C stops every process; the next run resumes from the last checkpoint)")
    p.add_argument("--export", action="store_true",
                   help="write run.json into output_dir and print the torchrun commands for a cluster instead of "
                        "training")

    def run(args: argparse.Namespace) -> int:
        if args.num_processes is not None or args.export:
            return _supervise_training(args)
        from .cli_config import load_cli_config
        from .host_allocator import return_freed_memory_to_os
        from .loop import train
        from .parallelize import close_distributed, init_distributed
        from torch.distributed.elastic.multiprocessing.errors import record

        from .runlock import exit_with_parent

        return_freed_memory_to_os()  # before any weight: a rank's host RAM is its tensors, not freed heap
        exit_with_parent()  # a rank never outlives torchrun (kill -9 of torchrun's group included)
        config = load_cli_config(args.config, overrides=args.overrides)  # every check before any process group
        _print_preflight(config)
        env = init_distributed(timeout_s=config.parallelism.collective_timeout_s)
        finished = False
        try:
            # record: under torchrun the failing rank's exception heads torchrun's summary, the log's last lines.
            path = record(train)(config, env=env)
            finished = True
            if path is not None:
                print(f"LoRA written to {path}")
        finally:
            # After a failure another rank may be gone: only a finished run waits for the others.
            close_distributed(synchronize=finished)
        return 0

    p.set_defaults(run=run)


def _print_preflight(config) -> None:
    """Rank 0 of a run started directly (torchrun, a cluster): print the memory and time estimates and write them to
    the run folder. A run that run_training started (its lock token is set) had both done before the launch."""
    import os

    from .preflight import run_preflight
    from .run import resume_step
    from .runlock import TOKEN_ENV

    if os.environ.get(TOKEN_ENV) or os.environ.get("RANK", "0") != "0":
        return
    checked = run_preflight(config, num_processes=int(os.environ.get("WORLD_SIZE", "1")), enforce=False,
                            start_step=resume_step(config))
    config.checkpoint.output_dir.mkdir(parents=True, exist_ok=True)
    checked.write(config.checkpoint.output_dir)
    print("\n".join(checked.lines()), flush=True)


def _supervise_training(args: argparse.Namespace) -> int:
    """train --num-processes / --export: trainer.run.run_training, the Train LoRA node's launcher."""
    import json
    import sys

    from .cli_config import load_cli_config
    from .launch import PACK_ROOT, TrainingCancelled, TrainingFailed
    from .run import run_training

    config = load_cli_config(args.config, overrides=args.overrides)
    # torchrun starts in the pack folder: a relative path would name another file there.
    for key, path in [("output_dir", config.checkpoint.output_dir),
                      ("pretrained_model_name_or_path", config.model.root),
                      *(("dataset_manifest", m) for m in config.data.dataset_manifests),
                      ("data_backend_config", config.data.data_backend_config)]:
        if path is not None and not path.is_absolute():
            raise ValueError(f"config: {key} {str(path)!r} is relative; the trainer starts in "
                             f"{PACK_ROOT}, so give absolute paths.")
    try:
        result = run_training(config, num_processes=args.num_processes or 1, owner="trainer CLI", export=args.export,
                              on_event=lambda event: print(json.dumps(event, default=str), flush=True))
    except (TrainingCancelled, TrainingFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 130 if isinstance(err, TrainingCancelled) else 1
    print(result.info)
    return 0


def _add_build_dataset(sub: argparse._SubParsersAction) -> None:
    from .captions import CAPTION_STRATEGIES

    p = sub.add_parser("build-dataset", help="scan an image folder and cache its VAE latents and caption embeddings")
    p.add_argument("--images", default=None, help="folder of training images (png, jpg, webp, bmp), searched recursively")
    p.add_argument("--config", default=None,
                   help="SimpleTuner multidatabackend.json (several datasets, conditioning, text_embeds) instead of --images")
    p.add_argument("--model", required=True, help="FLUX.2 diffusers folder whose VAE and text encoder fill the caches")
    p.add_argument("--out", default=None, help="dataset folder to write (manifest.json, report.json, latents/, text/); "
                   "with --config it defaults to <config folder>/<config name>.dataset")
    p.add_argument("--resolution", type=int, default=512, help="buckets hold about N x N pixels, sides multiples of 16")
    p.add_argument("--repeats", type=int, default=1, help="how often each image appears per epoch")
    p.add_argument("--caption-strategy", default="textfile", choices=CAPTION_STRATEGIES,
                   help="textfile: same-name .txt; filename: the file name; instanceprompt: --instance-prompt for all")
    p.add_argument("--instance-prompt", default=None, help="the caption of every image with --caption-strategy instanceprompt")
    p.add_argument("--disable-multiline-split", action="store_true",
                   help="a .txt caption file is one caption (default: each non-empty line is a caption of its own)")
    p.add_argument("--prompt", action="append", default=[], dest="prompts",
                   help="validation prompt to cache as well (repeatable), so training never loads the text encoder")
    p.add_argument("--vae-precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="VAE dtype (fp32 default)")
    p.add_argument("--text-precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="text encoder dtype")
    p.add_argument("--device", default="cpu", help="torch device for the encoders, e.g. cuda or cuda:1")
    _add_encoder_options(p)

    def run(args: argparse.Namespace) -> int:
        from .build import build_datasets
        from .build_report import load_build_report
        from .databackend import load_backend_config, single_folder_config
        from .model_files import inspect_model_folder

        if (args.images is None) == (args.config is None):
            raise SystemExit("build-dataset: give exactly one of --images (one folder) and --config (multidatabackend.json).")
        if args.config is not None:
            config = load_backend_config(args.config)
            out = args.out or str(config.path.with_name(config.path.stem + ".dataset"))
        elif args.out is None:
            raise SystemExit("build-dataset: --out is required with --images.")
        else:
            config = single_folder_config(args.images, resolution=args.resolution, repeats=args.repeats,
                                          caption_strategy=args.caption_strategy, instance_prompt=args.instance_prompt,
                                          disable_multiline_split=args.disable_multiline_split)
            out = args.out
        quantization, offload = _encoder_configs(args)
        manifest = build_datasets(
            config, model=inspect_model_folder(args.model), out_dir=out, vae_precision=args.vae_precision,
            text_precision=args.text_precision, device=args.device, extra_prompts=args.prompts,
            vae_batch_size=args.vae_batch_size, quantization=quantization, offload=offload,
        )
        print(load_build_report(manifest.parent).summary())
        print(f"manifest: {manifest}")
        return 0

    p.set_defaults(run=run)


def _add_encoder_options(p: argparse.ArgumentParser) -> None:
    """The training config's encoder keys, for building a dataset outside a run (same names and meaning)."""
    p.add_argument("--vae-batch-size", type=int, default=4, help="images per VAE encode (config: vae_batch_size)")
    p.add_argument("--text-encoder-1-precision", default="no_change", choices=("no_change", "int8-quanto", "int4-quanto"),
                   help="quantize the text encoder's decoder layers with optimum-quanto (config: text_encoder_1_precision)")
    p.add_argument("--quantize-via", default="accelerator", choices=("cpu", "accelerator"),
                   help="where quantization runs (config: quantize_via)")
    p.add_argument("--group-offload-text-encoder", action="store_true",
                   help="diffusers group offload of the text encoder while it encodes (config: group_offload_text_encoder)")
    p.add_argument("--group-offload-vae", action="store_true",
                   help="diffusers group offload of the VAE while it encodes (config: group_offload_vae)")
    p.add_argument("--group-offload-type", default="block_level", choices=("block_level", "leaf_level"),
                   help="offload granularity (config: group_offload_type)")
    p.add_argument("--group-offload-blocks-per-group", type=int, default=1,
                   help="blocks moved together with block_level (config: group_offload_blocks_per_group)")
    p.add_argument("--group-offload-use-stream", action="store_true",
                   help="overlap transfers on a CUDA stream; CUDA only (config: group_offload_use_stream)")


def _encoder_configs(args: argparse.Namespace):
    """The encoder options as the training config's (QuantizationConfig, OffloadConfig)."""
    from .config import OffloadConfig, QuantizationConfig

    quantization = QuantizationConfig(text_encoder_precision=args.text_encoder_1_precision,
                                      quantize_via=args.quantize_via)
    offload = OffloadConfig(enabled=args.group_offload_text_encoder or args.group_offload_vae,
                            text_encoder=args.group_offload_text_encoder, vae=args.group_offload_vae,
                            offload_type=args.group_offload_type, blocks_per_group=args.group_offload_blocks_per_group,
                            use_stream=args.group_offload_use_stream)
    return quantization, offload


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
