"""Load FLUX.2 LoRA files through stock ComfyUI's own code and measure what it patches.

Run with ComfyUI's interpreter (COMFYUI_PY), never imported by pytest:

    python comfy_lora_probe.py --comfyui-dir DIR --depth 1 --depth-single 1 \
        --lora comfyui=A.safetensors --lora diffusers=B.safetensors --out report.json

What it does, as ComfyUI's load_diffusion_model_state_dict + LoraLoaderModelOnly would:
1. ComfyUI's checkpoint detection (comfy.model_detection.model_config_from_unet) is fed the FLUX.2-dev
   key layout as meta tensors, so ComfyUI itself picks the model class (supported_models.Flux2) and its
   FLUX.2 settings (48 heads, mlp ratio 3, ...). The model (comfy.ldm.flux.model.Flux) is built on the
   meta device: full width, `--depth` double and `--depth-single` single blocks, float32 weights, no
   memory. Its full meta state dict is then detected again and must give the same config.
2. It is wrapped in a ModelPatcher; each LoRA file goes through comfy.utils.load_torch_file and
   comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0), with ComfyUI's log captured
   ("lora key not loaded: ...", "NOT LOADED ...").
3. For each weight ComfyUI patched, one at a time: that weight alone is materialised with random
   values on the CPU, ModelPatcher.patch_weight_to_device (the per-weight step ModelPatcher.load runs
   for every weight during patch_model) patches it, and patched - base is compared, in row chunks,
   with the delta the file means: trainer.lora_keys.lora_delta for a ComfyUI-layout file (for a LoKr
   file trainer.lokr_keys.lokr_delta_rows: the rows of alpha / dim * kron(w1, w2)), the PEFT
   delta (trainer.lora_keys.diffusers_lora_delta with the file's adapter config) for a diffusers one,
   plus the least-squares factor between the two. Then unpatch_model must restore the base weight bit
   for bit, and the weight goes back to meta. Peak memory is about four float32 copies of the largest
   adapted weight (base, ComfyUI's working copy, B @ A, its scaled copy; single_blocks.0.linear1 is
   55296 x 6144 = 1.4 GB each), about 6 GB in all, instead of the whole 2.3 B-parameter model.

Writes a JSON report (counts, key sets, max abs differences, fitted scale ratios, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_CHUNK = 256
"""Rows compared at a time. It divides FLUX.2-dev's hidden size 6144, so a chunk never straddles q/k/v,
and keeps each temporary under glibc's 32 MB mmap ceiling, so freed chunks are reused instead of
being unmapped and faulted in again (page faults dominate elementwise work on this kind of VM)."""


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _seed_state_dict(*, hidden: int, in_channels: int, context_dim: int, depth: int, depth_single: int,
                     guidance_embed: bool = True) -> dict:
    """The keys ComfyUI's detector reads for a FLUX.2 checkpoint, as meta tensors with its shapes: FLUX.2-dev's, or
    FLUX.2 [klein]'s (other width and text features, no guidance_in: ComfyUI reads guidance_embed from its presence)."""
    import torch

    def meta(*shape: int):
        return torch.empty(*shape, device="meta")

    sd = {
        "img_in.weight": meta(hidden, in_channels),
        "txt_in.weight": meta(hidden, context_dim),
        "double_stream_modulation_img.lin.weight": meta(6 * hidden, hidden),
    }
    if guidance_embed:
        sd["guidance_in.in_layer.weight"] = meta(hidden, 256)
    for i in range(depth):
        sd[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = meta(128)
    for i in range(depth_single):
        sd[f"single_blocks.{i}.norm.key_norm.scale"] = meta(128)
    return sd


def build_meta_model(args: argparse.Namespace):
    """(ModelPatcher over a meta-device ComfyUI FLUX.2 model, report dict)."""
    import comfy.model_detection
    import comfy.model_patcher
    import torch

    seed = _seed_state_dict(hidden=args.hidden, in_channels=args.in_channels, context_dim=args.context_dim,
                            depth=args.depth, depth_single=args.depth_single,
                            guidance_embed=not args.no_guidance_embed)
    model_config = comfy.model_detection.model_config_from_unet(seed, "")
    if model_config is None:
        raise SystemExit("ComfyUI's model detection did not recognise the FLUX.2 key layout")
    # float32 weights so that patched - base is exact up to float32 rounding (bf16 would round the sum).
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(seed, "", device=torch.device("meta"))
    full_sd = model.diffusion_model.state_dict()
    redetected = comfy.model_detection.detect_unet_config(full_sd, "")
    detected = dict(model_config.unet_config)
    detected.pop("dtype", None)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    report = {
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "diffusion_model_class": f"{type(model.diffusion_model).__module__}.{type(model.diffusion_model).__name__}",
        "config_class": type(model_config).__name__,
        "unet_config": {k: v for k, v in sorted(detected.items())},
        "redetected_same": redetected == detected,
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_devices": sorted({p.device.type for p in model.parameters()}),
    }
    return patcher, report


def _rows_reference(ref_state: dict, ref_config: dict, bfl_key: str, r0: int, r1: int, hidden: int):
    """PEFT delta rows [r0:r1] of the BFL weight `bfl_key`, from the diffusers-layout reference file."""
    from trainer.lora_keys import bfl_module_to_diffusers, diffusers_lora_delta

    module = bfl_key.removeprefix("diffusion_model.").removesuffix(".weight")
    names = bfl_module_to_diffusers(module)
    if len(names) == 3:
        slot, r0, r1 = r0 // hidden, r0 % hidden, r0 % hidden + (r1 - r0)
        name = names[slot]
    else:
        name = names[0]
    key = "transformer." + name
    sliced = {key + ".lora_A.weight": ref_state[key + ".lora_A.weight"],
              key + ".lora_B.weight": ref_state[key + ".lora_B.weight"][r0:r1]}
    return diffusers_lora_delta(sliced, name, adapter_config=ref_config)


def _rows_lora_delta(comfy_state: dict, bfl_key: str, r0: int, r1: int):
    from trainer.lokr_keys import lokr_delta_rows
    from trainer.lora_keys import lora_delta

    module = bfl_key.removesuffix(".weight")
    if module + ".lokr_w1" in comfy_state or module + ".lokr_w1_a" in comfy_state:  # a LoKr: scale * kron(w1, w2)
        return lokr_delta_rows(comfy_state, module, r0, r1)
    sliced = {module + ".lora_A.weight": comfy_state[module + ".lora_A.weight"],
              module + ".lora_B.weight": comfy_state[module + ".lora_B.weight"][r0:r1]}
    if module + ".alpha" in comfy_state:
        sliced[module + ".alpha"] = comfy_state[module + ".alpha"]
    return lora_delta(sliced, module)


def _compare(patched, base, *, key: str, lora: dict | None, reference: tuple[dict, dict] | None,
             hidden: int) -> dict:
    """patched - base against our deltas, row chunk by row chunk (few temporaries: allocation is slow here)."""
    import torch

    inf = float("inf")
    stats: dict = {"max_abs_delta": 0.0}
    if lora is not None:
        stats["max_abs_diff_vs_lora_delta"] = 0.0
    oe = ee = 0.0
    if reference is not None:
        stats["max_abs_diff_vs_reference"] = 0.0
    for r0 in range(0, base.shape[0], ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, base.shape[0])
        observed = patched[r0:r1].float() - base[r0:r1].float()
        stats["max_abs_delta"] = max(stats["max_abs_delta"], torch.linalg.vector_norm(observed, inf).item())
        if lora is not None:
            expected = _rows_lora_delta(lora, key, r0, r1).sub_(observed)
            stats["max_abs_diff_vs_lora_delta"] = max(stats["max_abs_diff_vs_lora_delta"],
                                                      torch.linalg.vector_norm(expected, inf).item())
        if reference is not None:
            expected = _rows_reference(*reference, key, r0, r1, hidden)
            oe += torch.dot(observed.view(-1), expected.view(-1)).item()
            ee += torch.dot(expected.view(-1), expected.view(-1)).item()
            stats["max_abs_diff_vs_reference"] = max(stats["max_abs_diff_vs_reference"],
                                                     torch.linalg.vector_norm(expected.sub_(observed), inf).item())
        del observed
    if reference is None:
        return stats
    # Least-squares factor observed ~ ratio * reference: 1.0 when ComfyUI applies the trained scale.
    ratio = oe / ee
    stats["scale_ratio_vs_reference"] = ratio
    if abs(ratio - 1.0) > 1e-3:
        # Another scale: is the delta still exactly that multiple of the trained one?
        worst = 0.0
        for r0 in range(0, base.shape[0], ROW_CHUNK):
            r1 = min(r0 + ROW_CHUNK, base.shape[0])
            expected = _rows_reference(*reference, key, r0, r1, hidden).mul_(ratio)
            expected.sub_(patched[r0:r1].float()).add_(base[r0:r1].float())
            worst = max(worst, torch.linalg.vector_norm(expected, inf).item())
        stats["max_abs_diff_vs_ratio_times_reference"] = worst
    return stats


def probe_file(base_patcher, path: Path, *, hidden: int, seed: int) -> dict:
    """Load one LoRA file through ComfyUI onto `base_patcher`'s model and check every weight it patches."""
    import comfy.sd
    import comfy.utils
    import torch

    from trainer.lora_keys import detect_layout, load_lora_for_diffusers

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    layout = detect_layout(lora)
    # What the file means: its PEFT state and adapter config, as diffusers would apply it.
    reference = load_lora_for_diffusers(path) if layout == "diffusers" else None
    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        patcher, _ = comfy.sd.load_lora_for_models(base_patcher, None, lora, 1.0, 0)
    finally:
        root.removeHandler(capture)
    not_loaded = sorted(m.split(": ", 1)[1] for m in capture.messages if m.startswith("lora key not loaded: "))
    not_patched = sorted(m.split(" ", 2)[2] for m in capture.messages if m.startswith("NOT LOADED "))
    patched_keys = sorted(patcher.patches)
    result = {
        "layout": layout,
        "keys_in_file": len(lora),
        "keys_not_loaded": not_loaded,
        "keys_loaded": len(lora) - len(not_loaded),
        "patches_not_applied": not_patched,
        "patched_weights": patched_keys,
        "patch_counts": {k: len(v) for k, v in patcher.patches.items()},
        "weights": {},
    }
    generator = torch.Generator().manual_seed(seed)
    for key in patched_keys:
        t0 = time.perf_counter()
        meta_weight = comfy.utils.get_attr(patcher.model, key)
        base = torch.randn(meta_weight.shape, generator=generator, dtype=meta_weight.dtype).mul_(0.02)
        comfy.utils.set_attr_param(patcher.model, key, base)
        t1 = time.perf_counter()
        patcher.patch_weight_to_device(key, device_to=torch.device("cpu"))
        t2 = time.perf_counter()
        patched = comfy.utils.get_attr(patcher.model, key)
        stats = _compare(patched, base, key=key, lora=lora if layout == "comfyui" else None,
                         reference=reference, hidden=hidden)
        del patched
        patcher.unpatch_model()
        stats["unpatch_restores_base"] = bool(torch.equal(comfy.utils.get_attr(patcher.model, key), base))
        comfy.utils.set_attr_param(patcher.model, key, meta_weight)  # free it: back to meta
        del base
        stats["seconds_init_patch_compare"] = [round(t1 - t0, 2), round(t2 - t1, 2), round(time.perf_counter() - t2, 2)]
        result["weights"][key] = stats
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui-dir", required=True, type=Path)
    parser.add_argument("--lora", action="append", required=True, metavar="LABEL=PATH",
                        help="a LoRA file to load through ComfyUI (repeatable)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--depth-single", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--in-channels", type=int, default=128)
    parser.add_argument("--context-dim", type=int, default=15360)
    parser.add_argument("--no-guidance-embed", action="store_true",
                        help="FLUX.2 [klein]: no guidance_in weights (klein-4b: --hidden 3072 --context-dim 7680)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # ComfyUI first: its `nodes`, `utils`, `comfy` must win; the repo root only supplies `trainer`.
    sys.path.insert(0, str(args.comfyui_dir.resolve()))
    sys.path.append(str(REPO_ROOT))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # what `main.py --cpu` sets before comfy.model_management is imported
    import torch

    torch.manual_seed(args.seed)
    patcher, report = build_meta_model(args)
    report["comfyui_dir"] = str(args.comfyui_dir)
    report["torch"] = torch.__version__
    report["runs"] = {}
    for item in args.lora:
        label, _, path = item.partition("=")
        report["runs"][label] = probe_file(patcher, Path(path), hidden=args.hidden, seed=args.seed)
    report["param_devices_after"] = sorted({p.device.type for p in patcher.model.parameters()})
    report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
