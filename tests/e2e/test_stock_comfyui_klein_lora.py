"""Our FLUX.2 [klein] LoRA files in stock ComfyUI: its own model detection, model class, LoRA loader and patching,
at the real klein widths.

As tests/e2e/test_stock_comfyui_lora.py does for FLUX.2-dev: ComfyUI's detector is fed klein's key layout (img_in
and txt_in at klein-4b's 3072 x 7680 or klein-9b's 4096 x 12288, no guidance_in), so ComfyUI itself builds its
FLUX.2 model (comfy.ldm.flux.model.Flux, heads = width / 128, no guidance embedding) on the meta device with one
double and one single block. A LoRA written the way the trainer writes it (ComfyUI/BFL layout, `.alpha` keys,
model_flavour in the header) goes through comfy.sd.load_lora_for_models; every weight ComfyUI patches is
materialised alone, patched and compared with trainer.lora_keys.lora_delta (tests/e2e/comfy_lora_probe.py, run in
ComfyUI's interpreter). Without COMFYUI_DIR this skips; tests/unit/test_klein_lora.py holds the same file's names
and shapes against BFL's architecture on CPU without ComfyUI.

A ComfyUI older than klein (such as the January 2026 snapshot these tests were run with) fixes FLUX.2 at 48 heads:
the real widths then skip, saying so, and the klein-4b@6144 case (klein's layout at that width) still runs.
About a minute per case on 2 busy cores: marked slow.
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
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that ignores alpha is off by 2x
PRESET = "all"
PROBE_TIMEOUT_S = 900
PATCH_ATOL = 1e-7  # as the dev test: float32 rounding of base + delta


OLD_COMFYUI = 'dit_config["num_heads"] = 48'
"""The line of comfy/model_detection.py by which a ComfyUI that predates klein fixes FLUX.2 at 48 heads (dev's 6144
width); ComfyUI with klein support derives the heads from the width."""
LAYOUT_CASE = "klein-4b@6144"
"""klein-4b's key layout (no guidance_in, txt_in from Qwen3-4B's 3 x 2560 features) at the one width such a ComfyUI
builds: 48 heads of 128. The klein-like size the e2e suite can always check."""


def _klein_lora(case: str, out: Path) -> dict:
    """A klein-width adapter (one block of each kind, built on meta, trained-looking values), saved as the trainer
    saves it; what the probe needs to know about it."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from peft.tuners.lora import LoraLayer

    from flux2_lora_pack.trainer.flavours import SPECS
    from flux2_lora_pack.trainer.lora import ADAPTER_NAME, apply_lora, lora_state_dict, lora_target_modules
    from flux2_lora_pack.trainer.lora_keys import diffusers_module_to_bfl, diffusers_to_comfy, lora_metadata, save_lora_file

    flavour, _, width = case.partition("@")
    config = dict(SPECS[flavour].transformer, num_layers=1, num_single_layers=1)
    if width:
        config["num_attention_heads"] = int(width) // config["attention_head_dim"]
    with init_empty_weights():
        transformer = Flux2Transformer2DModel(**config)
    parameters = sum(p.numel() for p in transformer.parameters())
    targets = lora_target_modules(transformer, preset=PRESET)
    apply_lora(transformer, preset=PRESET, rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(0)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            lora_a, lora_b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
            bound = 1.0 / math.sqrt(lora_a.in_features)
            lora_a.weight = torch.nn.Parameter((torch.rand(lora_a.weight.shape, generator=generator) * 2 - 1) * bound,
                                               requires_grad=False)
            lora_b.weight = torch.nn.Parameter(torch.randn(lora_b.weight.shape, generator=generator),
                                               requires_grad=False)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    comfy = diffusers_to_comfy(lora_state_dict(transformer), alpha=ALPHA, rank=RANK, hidden_size=hidden)
    metadata = lora_metadata(rank=RANK, alpha=ALPHA, targets=PRESET, base_model=f"FLUX.2-{flavour}", steps=0,
                             dataset_fingerprint="none")
    metadata["model_flavour"] = json.dumps(flavour)  # as trainer.loop.save_final_lora
    path = save_lora_file(out / f"{flavour}-{hidden}.safetensors", state=comfy, metadata=metadata, layout="comfyui")
    return {"path": path, "hidden": hidden, "context_dim": config["joint_attention_dim"], "keys": set(comfy),
            "parameters": parameters,
            "weights": {f"diffusion_model.{diffusers_module_to_bfl(m)[0]}.weight" for m in targets}}


@pytest.fixture(scope="module", params=["klein-4b", "klein-9b", LAYOUT_CASE])
def probed(request, comfyui_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp(f"stock_comfyui_{request.param}")
    lora = _klein_lora(request.param, out)
    detection = (comfyui_install.root / "comfy" / "model_detection.py").read_text(encoding="utf-8")
    if OLD_COMFYUI in detection and lora["hidden"] != 48 * 128:
        pytest.skip(f"this ComfyUI predates FLUX.2 klein: its FLUX.2 detection fixes 48 heads, so klein's real width "
                    f"{lora['hidden']} cannot be built in it ({comfyui_install.root}); the {LAYOUT_CASE} case checks "
                    "klein's key layout at the width it builds. Use a ComfyUI with klein support for this case.")
    report_path = out / "report.json"
    command = [str(comfyui_install.python), str(PROBE), "--comfyui-dir", str(comfyui_install.root),
               "--depth", "1", "--depth-single", "1", "--hidden", str(lora["hidden"]),
               "--context-dim", str(lora["context_dim"]), "--no-guidance-embed",
               "--lora", f"comfyui={lora['path']}", "--out", str(report_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the probe orders ComfyUI and the repo on sys.path itself
    try:
        done = subprocess.run(command, check=False, cwd=out, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ComfyUI LoRA probe ran past {PROBE_TIMEOUT_S} s: {' '.join(command)}\n"
                    f"{(exc.stdout or '')[-4000:]}\n{(exc.stderr or '')[-4000:]}")
    if done.returncode != 0:
        pytest.fail(f"the ComfyUI LoRA probe failed (exit {done.returncode}): {' '.join(command)}\n"
                    f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}")
    return json.loads(report_path.read_text()), lora


def test_comfyui_detects_klein_and_builds_it_on_meta(probed):
    report, lora = probed
    assert report["config_class"] == "Flux2" and report["model_class"] == "comfy.model_base.Flux2"
    assert report["diffusion_model_class"] == "comfy.ldm.flux.model.Flux"
    config = report["unet_config"]
    expected = {"image_model": "flux2", "hidden_size": lora["hidden"], "num_heads": lora["hidden"] // 128,
                "mlp_ratio": 3.0, "depth": 1, "depth_single_blocks": 1, "in_channels": 128,
                "context_in_dim": lora["context_dim"], "guidance_embed": False, "qkv_bias": False}
    assert {k: config.get(k) for k in expected} == expected
    assert report["redetected_same"] is True
    assert report["parameters"] == lora["parameters"]  # ComfyUI's klein and diffusers' klein: one architecture
    assert report["param_devices"] == ["meta"] and report["param_devices_after"] == ["meta"]


def test_klein_lora_loads_every_key_and_patches_base_plus_delta(probed):
    report, lora = probed
    run = report["runs"]["comfyui"]
    assert run["keys_in_file"] == len(lora["keys"]) == 3 * 10  # A, B, alpha for 10 BFL modules
    assert run["keys_not_loaded"] == [], f"stock ComfyUI logged 'lora key not loaded' for {run['keys_not_loaded']}"
    assert run["patches_not_applied"] == []
    assert set(run["patched_weights"]) == lora["weights"]
    assert set(run["patch_counts"].values()) == {1}
    for key, stats in run["weights"].items():
        assert stats["max_abs_delta"] > 1e-3, key
        assert stats["max_abs_diff_vs_lora_delta"] <= PATCH_ATOL, (key, stats["max_abs_diff_vs_lora_delta"])
        assert stats["unpatch_restores_base"] is True, key
