"""Our FLUX.2 LoRA files in stock ComfyUI: its own model class, its own LoRA loader, its own patching.

ComfyUI's checkpoint detection builds its FLUX.2 model (comfy.model_base.Flux2 around
comfy.ldm.flux.model.Flux) at FLUX.2-dev's full width (hidden 6144, 48 heads, mlp ratio 3) with one
double and one single block, the fewest that contain every layer kind our presets adapt; about 2.3 B
parameters, all on the meta device. A LoRA for the same architecture, written the way our trainer
writes it (trainer.loop.save_final_lora: full_lora_state -> diffusers_to_comfy -> save_lora_file,
layout "comfyui"), goes through comfy.utils.load_torch_file and comfy.sd.load_lora_for_models. Each
weight ComfyUI patches is then materialised alone (random float32), patched by
ModelPatcher.patch_weight_to_device (the per-weight step of patch_model) and compared with
trainer.lora_keys.lora_delta; see tests/e2e/comfy_lora_probe.py, which runs in ComfyUI's interpreter.

About 1.5-2 minutes on 2 busy cores (ComfyUI's import, then elementwise passes over 1.5 B adapted
weights), peak about 6 GB (four float32 copies of the largest weight): marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from comfyui_harness import ComfyInstall

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROBE = Path(__file__).resolve().parent / "comfy_lora_probe.py"
DEPTH = 1
DEPTH_SINGLE = 1
RANK = 4
ALPHA = 2.0  # alpha != rank: a scale of 0.5 that a loader ignoring alpha gets wrong by 2x
PRESET = "all"
PROBE_TIMEOUT_S = 900
# patched - base is float32(base + delta) - base: rounding of numbers below 0.2 costs at most ~1.5e-8.
PATCH_ATOL = 1e-7
LAYOUT_HINT = (
    "Stock ComfyUI applies only our ComfyUI-layout LoRA files correctly: users must load the file the "
    "trainer writes by default (ComfyUI/BFL keys under 'diffusion_model.' with '.alpha'), or convert a "
    "diffusers-layout file with `python -m trainer convert-lora SRC DST --to comfyui`."
)


def _trained_adapter(*, seed: int):
    """(LoRA state with diffusers/PEFT names, adapted modules, hidden size, parameter count) of a full-width FLUX.2-dev-shaped
    Flux2Transformer2DModel with DEPTH/DEPTH_SINGLE blocks built on meta, LoRA injected by our preset."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from peft.tuners.lora import LoraLayer

    from flux2_lora_pack.trainer.lora import (
        ADAPTER_NAME,
        adapted_module_names,
        apply_lora,
        lora_target_modules,
    )
    from flux2_lora_pack.trainer.parallelize import DistEnv, full_lora_state

    # diffusers' defaults are FLUX.2-dev's config; only the block counts differ.
    with init_empty_weights():
        transformer = Flux2Transformer2DModel(num_layers=DEPTH, num_single_layers=DEPTH_SINGLE)
    parameters = sum(p.numel() for p in transformer.parameters())
    targets = lora_target_modules(transformer, preset=PRESET)
    apply_lora(transformer, preset=PRESET, rank=RANK, alpha=ALPHA)
    assert adapted_module_names(transformer) == set(targets)
    # PEFT left the adapter on meta with its base layers; give it trained-looking values (B != 0).
    generator = torch.Generator().manual_seed(seed)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            lora_a, lora_b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
            bound = 1.0 / math.sqrt(lora_a.in_features)  # PEFT's Kaiming-uniform bound for A
            a = (torch.rand(lora_a.weight.shape, generator=generator) * 2 - 1) * bound
            lora_a.weight = torch.nn.Parameter(a, requires_grad=False)
            lora_b.weight = torch.nn.Parameter(torch.randn(lora_b.weight.shape, generator=generator),
                                               requires_grad=False)
    state = full_lora_state(transformer, env=DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return state, targets, hidden, parameters


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flux2_lora_pack.trainer.lora_keys import (
        diffusers_to_comfy,
        lora_metadata,
        save_lora_file,
        save_trained_lora,
    )

    state, targets, hidden, parameters = _trained_adapter(seed=0)
    out = tmp_path_factory.mktemp("stock_comfyui_lora")
    metadata = lora_metadata(rank=RANK, alpha=ALPHA, targets=PRESET, base_model="FLUX.2-dev",
                             steps=0, dataset_fingerprint="none")
    # The trainer's own save path (trainer.loop.save_final_lora), minus the process group.
    comfy = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=hidden)
    comfy_path = save_lora_file(out / "lora_comfyui.safetensors", state=comfy, metadata=metadata, layout="comfyui")
    diffusers_path = save_trained_lora(out / "lora_diffusers.safetensors", state=state, rank=RANK, alpha=ALPHA,
                                       hidden_size=hidden, layout="diffusers", metadata=metadata)
    return {"comfyui": comfy_path, "diffusers": diffusers_path, "targets": targets, "hidden": hidden,
            "parameters": parameters, "comfy_keys": set(comfy), "diffusers_keys": {"transformer." + k for k in state},
            "out": out}


@pytest.fixture(scope="module")
def probe_report(comfyui_install: ComfyInstall, lora_files: dict) -> dict:
    """Run the probe once in ComfyUI's interpreter for both files; its JSON report."""
    report_path = lora_files["out"] / "report.json"
    command = [
        str(comfyui_install.python), str(PROBE),
        "--comfyui-dir", str(comfyui_install.root),
        "--depth", str(DEPTH), "--depth-single", str(DEPTH_SINGLE), "--hidden", str(lora_files["hidden"]),
        "--lora", f"comfyui={lora_files['comfyui']}",
        "--lora", f"diffusers={lora_files['diffusers']}",
        "--out", str(report_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the probe orders ComfyUI and the repo on sys.path itself
    try:
        done = subprocess.run(command, check=False, cwd=lora_files["out"], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ComfyUI LoRA probe ran past {PROBE_TIMEOUT_S} s: {' '.join(command)}\n"
                    f"{(exc.stdout or '')[-4000:]}\n{(exc.stderr or '')[-4000:]}")
    if done.returncode != 0:
        pytest.fail(f"the ComfyUI LoRA probe failed (exit {done.returncode}): {' '.join(command)}\n"
                    f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}")
    report = json.loads(report_path.read_text())
    report["log"] = done.stderr
    return report


def _bfl_weight(module: str) -> str:
    from flux2_lora_pack.trainer.lora_keys import diffusers_module_to_bfl

    return f"diffusion_model.{diffusers_module_to_bfl(module)[0]}.weight"


def test_comfyui_detects_and_builds_full_width_flux2_on_meta(probe_report: dict, lora_files: dict):
    assert probe_report["config_class"] == "Flux2"
    assert probe_report["model_class"] == "comfy.model_base.Flux2"
    assert probe_report["diffusion_model_class"] == "comfy.ldm.flux.model.Flux"
    config = probe_report["unet_config"]
    expected = {"image_model": "flux2", "hidden_size": 6144, "num_heads": 48, "mlp_ratio": 3.0, "depth": DEPTH,
                "depth_single_blocks": DEPTH_SINGLE, "in_channels": 128, "context_in_dim": 15360,
                "guidance_embed": True, "qkv_bias": False}
    assert {k: config.get(k) for k in expected} == expected
    # Detection on the built model's whole state dict gives the same config: the model is what ComfyUI
    # would build from a FLUX.2-dev checkpoint cut to these block counts.
    assert probe_report["redetected_same"] is True
    # Same architecture on both sides: ComfyUI's model and diffusers' have the same parameter count.
    assert probe_report["parameters"] == lora_files["parameters"]
    # Nothing stayed materialised: every weight went back to meta after its check.
    assert probe_report["param_devices"] == ["meta"]
    assert probe_report["param_devices_after"] == ["meta"]


def test_comfyui_layout_lora_loads_every_key_and_patches_base_plus_delta(probe_report: dict, lora_files: dict):
    run = probe_report["runs"]["comfyui"]
    assert run["layout"] == "comfyui"
    assert run["keys_in_file"] == len(lora_files["comfy_keys"]) == 3 * 10  # A, B, alpha for 10 BFL modules
    assert run["keys_not_loaded"] == [], f"stock ComfyUI logged 'lora key not loaded' for {run['keys_not_loaded']}"
    assert run["keys_loaded"] == run["keys_in_file"]
    assert run["patches_not_applied"] == []
    # Exactly the weights of the preset's modules (q/k/v fused into one qkv weight) and nothing else.
    assert set(run["patched_weights"]) == {_bfl_weight(m) for m in lora_files["targets"]}
    assert set(run["patch_counts"].values()) == {1}
    for key, stats in run["weights"].items():
        assert stats["max_abs_delta"] > 1e-3, f"{key}: the LoRA changed nothing, the comparison would prove nothing"
        assert stats["max_abs_diff_vs_lora_delta"] <= PATCH_ATOL, (
            f"{key}: ComfyUI's patched - base differs from trainer.lora_keys.lora_delta by "
            f"{stats['max_abs_diff_vs_lora_delta']:.3g} (tolerance {PATCH_ATOL})")
        assert stats["unpatch_restores_base"] is True, f"{key}: unpatch_model did not restore the base weight"
    worst = max(s["max_abs_diff_vs_lora_delta"] for s in run["weights"].values())
    print(f"\nComfyUI layout: {run['keys_in_file']} keys in file, {run['keys_loaded']} loaded, "
          f"{len(run['keys_not_loaded'])} not loaded; {len(run['patched_weights'])} weights patched, "
          f"max |patched - base - lora_delta| = {worst:.3g}; model {probe_report['parameters']:,} parameters (meta); "
          f"probe peak RSS {probe_report['peak_rss_gb']:.2f} GiB")


def test_diffusers_layout_lora_is_lossy_in_stock_comfyui(probe_report: dict, lora_files: dict):
    """What stock ComfyUI (Jan 2026) does with the diffusers-layout twin of the same LoRA, pinned so that a
    ComfyUI change is noticed: its FLUX.1 diffusers key map knows the attention names but not FLUX.2's
    ff.linear_in/out, ff_context.* or single_transformer_blocks.*.attn.to_qkv_mlp_proj / to_out, and it
    ignores the PEFT alpha in the safetensors metadata (scale 1 instead of alpha / rank)."""
    run = probe_report["runs"]["diffusers"]
    file_keys = lora_files["diffusers_keys"]
    assert run["layout"] == "diffusers"
    assert run["keys_in_file"] == len(file_keys) == 2 * len(lora_files["targets"])
    dropped = {k for k in file_keys if ".ff." in k or ".ff_context." in k or ".single_transformer_blocks." in k}
    assert set(run["keys_not_loaded"]) == dropped, (
        f"stock ComfyUI's handling of diffusers-layout FLUX.2 LoRA keys changed: not loaded now "
        f"{sorted(run['keys_not_loaded'])}, expected {sorted(dropped)}. Update this test and the docs. {LAYOUT_HINT}")
    assert len(dropped) == 8 * DEPTH + 4 * DEPTH_SINGLE  # 12 of 28 keys on 1 + 1 blocks
    loaded_modules = [m for m in lora_files["targets"] if "transformer." + m + ".lora_A.weight" not in dropped]
    assert set(run["patched_weights"]) == {_bfl_weight(m) for m in loaded_modules}
    # q, k, v each patch a third of the fused qkv weight.
    assert run["patch_counts"] == {_bfl_weight(m): (3 if m.endswith(("to_q", "q_proj")) else 1)
                                   for m in loaded_modules if not m.endswith(("to_k", "to_v", "k_proj", "v_proj"))}
    for key, stats in run["weights"].items():
        # Least-squares factor between what ComfyUI added and the PEFT delta of the trained adapter.
        assert stats["scale_ratio_vs_reference"] == pytest.approx(RANK / ALPHA, rel=1e-6), (
            f"{key}: stock ComfyUI now scales diffusers-layout FLUX.2 LoRA by {stats['scale_ratio_vs_reference']:.6g} "
            f"x the trained delta (was rank/alpha = {RANK / ALPHA}: alpha ignored). Update this test. {LAYOUT_HINT}")
        assert stats["max_abs_diff_vs_ratio_times_reference"] <= PATCH_ATOL * RANK / ALPHA, key
        assert stats["unpatch_restores_base"] is True, key
    print(f"\ndiffusers layout: {run['keys_in_file']} keys in file, {run['keys_loaded']} loaded, "
          f"{len(run['keys_not_loaded'])} not loaded (ff, ff_context, single blocks), loaded modules scaled "
          f"{RANK / ALPHA:g}x (alpha ignored). {LAYOUT_HINT}")
