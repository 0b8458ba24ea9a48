"""Our FLUX.2 LoKr files in stock ComfyUI: its own FLUX.2 model class, its own LoRA loader, its LoKr adapter.

As tests/e2e/test_stock_comfyui_lora.py does for LoRA: ComfyUI's checkpoint detection builds its FLUX.2 model
(comfy.model_base.Flux2) at FLUX.2-dev's full width with one double and one single block, on the meta device. LoKr
adapters are trained-shaped exactly as the trainer makes them (trainer.lokr.apply_lokr on diffusers'
Flux2Transformer2DModel at the same width: LyCORIS's shapes, q/k/v sharing w2) and saved as the trainer saves them
(trainer.loop.save_final_lora: full_lora_state -> lokr_scales -> save_trained_lokr). Each file goes through
comfy.utils.load_torch_file and comfy.sd.load_lora_for_models; every weight ComfyUI patches is materialised alone,
patched by ModelPatcher.patch_weight_to_device and compared with the file's Kronecker product
(trainer.lokr_keys.lokr_delta_rows: alpha / dim * kron(w1, w2) row by row). Two files cover ComfyUI's two scale
branches: full factors (SimpleTuner's linear_dim 10000: no alpha, scale 1) and decomposed ones (w1_a/w1_b fused
block-diagonally for q/k/v, w2_a/w2_b shared: alpha / dim with dim taken from w2_b).

About 2-3 minutes on 2 busy cores, peak about 6 GB (four float32 copies of the largest weight): marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from comfyui_harness import ComfyInstall

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROBE = Path(__file__).resolve().parent / "comfy_lora_probe.py"
DEPTH = 1
DEPTH_SINGLE = 1
PRESET = "all"
PROBE_TIMEOUT_S = 900
PATCH_ATOL = 1e-7  # float32(base + delta) - base for |delta| < 0.2, as in the LoRA test
CONFIGS = {
    # SimpleTuner's FLUX.2 LoKr: nothing decomposed, so ComfyUI applies scale 1 whatever linear_alpha says.
    "full": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
             "full_matrix": True},
    # Both factors low-rank (rank 4 < 16 / 2): scale linear_alpha / linear_dim = 0.5.
    "decomposed": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "factor": 16,
                   "decompose_both": True},
}


def _trained_lokr(config_path: Path, *, seed: int):
    """(state in PEFT names, scales, targets, hidden, parameter count) of a full-width FLUX.2-dev-shaped
    Flux2Transformer2DModel (DEPTH / DEPTH_SINGLE blocks, meta) with our LoKr given trained-looking factors."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from flux2_lora_pack.trainer.lokr import (
        adapted_lokr_names,
        apply_lokr,
        lokr_scales,
        read_lycoris_config,
    )
    from flux2_lora_pack.trainer.lora import lora_target_modules
    from flux2_lora_pack.trainer.parallelize import DistEnv, full_lora_state

    with init_empty_weights():
        transformer = Flux2Transformer2DModel(num_layers=DEPTH, num_single_layers=DEPTH_SINGLE)
    parameters = sum(p.numel() for p in transformer.parameters())
    targets = lora_target_modules(transformer, preset=PRESET)
    apply_lokr(transformer, spec=read_lycoris_config(config_path), preset=PRESET)
    assert adapted_lokr_names(transformer) == set(targets)
    # The factors sit on meta with their base layers: give them values (w2 != 0), keeping q/k/v's shared w2 shared.
    generator = torch.Generator().manual_seed(seed)
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in transformer.modules():
        for attr in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            table = getattr(module, attr, None)
            if table is None or "default" not in table:
                continue
            old = table["default"]
            if id(old) not in replaced:
                values = torch.randn(old.shape, generator=generator) * 0.1  # |delta| < 0.2: PATCH_ATOL holds
                replaced[id(old)] = torch.nn.Parameter(values, requires_grad=False)
            table["default"] = replaced[id(old)]
    state = full_lora_state(transformer, env=DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return state, lokr_scales(transformer), targets, hidden, parameters


@pytest.fixture(scope="module")
def lokr_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flux2_lora_pack.trainer.lokr_keys import save_trained_lokr
    from flux2_lora_pack.trainer.lora_keys import lora_metadata

    out = tmp_path_factory.mktemp("stock_comfyui_lokr")
    files: dict = {"out": out, "keys": {}}
    for seed, (label, config) in enumerate(CONFIGS.items()):
        config_path = out / f"{label}.json"
        config_path.write_text(json.dumps(config))
        state, scales, targets, hidden, parameters = _trained_lokr(config_path, seed=seed)
        metadata = lora_metadata(rank=config["linear_dim"], alpha=config["linear_alpha"], targets=PRESET,
                                 base_model="FLUX.2-dev", steps=0, dataset_fingerprint="none",
                                 extra={"lycoris_config": config})
        path = save_trained_lokr(out / f"lokr_{label}.safetensors", state=state, scales=scales, metadata=metadata)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            files["keys"][label] = set(handle.keys())
        files[label] = path
        files.update(targets=targets, hidden=hidden, parameters=parameters)
    return files


@pytest.fixture(scope="module")
def probe_report(comfyui_install: ComfyInstall, lokr_files: dict) -> dict:
    """Run the probe once in ComfyUI's interpreter for both files; its JSON report."""
    report_path = lokr_files["out"] / "report.json"
    command = [
        str(comfyui_install.python), str(PROBE),
        "--comfyui-dir", str(comfyui_install.root),
        "--depth", str(DEPTH), "--depth-single", str(DEPTH_SINGLE), "--hidden", str(lokr_files["hidden"]),
        *[arg for label in CONFIGS for arg in ("--lora", f"{label}={lokr_files[label]}")],
        "--out", str(report_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the probe orders ComfyUI and the repo on sys.path itself
    try:
        done = subprocess.run(command, check=False, cwd=lokr_files["out"], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ComfyUI LoKr probe ran past {PROBE_TIMEOUT_S} s: {' '.join(command)}\n"
                    f"{(exc.stdout or '')[-4000:]}\n{(exc.stderr or '')[-4000:]}")
    if done.returncode != 0:
        pytest.fail(f"the ComfyUI LoKr probe failed (exit {done.returncode}): {' '.join(command)}\n"
                    f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}")
    return json.loads(report_path.read_text())


def _bfl_weight(module: str) -> str:
    from flux2_lora_pack.trainer.lora_keys import diffusers_module_to_bfl

    return f"diffusion_model.{diffusers_module_to_bfl(module)[0]}.weight"


def test_comfyui_builds_its_full_width_flux2(probe_report: dict, lokr_files: dict):
    assert (probe_report["config_class"], probe_report["model_class"]) == ("Flux2", "comfy.model_base.Flux2")
    config = probe_report["unet_config"]
    assert (config["hidden_size"], config["num_heads"], config["depth"], config["depth_single_blocks"]) == \
        (6144, 48, DEPTH, DEPTH_SINGLE)
    assert probe_report["parameters"] == lokr_files["parameters"]  # the same architecture as diffusers'


@pytest.mark.parametrize("label", list(CONFIGS))
def test_comfyui_loads_every_lokr_key_and_patches_the_files_kronecker_product(probe_report: dict, lokr_files: dict,
                                                                             label: str):
    run = probe_report["runs"][label]
    keys = lokr_files["keys"][label]
    decomposed = label == "decomposed"
    modules = {_bfl_weight(m).removesuffix(".weight") for m in lokr_files["targets"]}
    assert len(modules) == 8 * DEPTH + 2 * DEPTH_SINGLE  # q/k/v fused: one LoKr per BFL module
    expected_suffixes = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha") if decomposed else \
        ("lokr_w1", "lokr_w2")
    assert keys == {f"{m}.{s}" for m in modules for s in expected_suffixes}
    assert run["layout"] == "comfyui" and run["keys_in_file"] == len(keys)
    assert run["keys_not_loaded"] == [], f"stock ComfyUI logged 'lora key not loaded' for {run['keys_not_loaded']}"
    assert run["keys_loaded"] == run["keys_in_file"]
    assert run["patches_not_applied"] == []
    assert set(run["patched_weights"]) == {f"{m}.weight" for m in modules}
    assert set(run["patch_counts"].values()) == {1}
    for key, stats in run["weights"].items():
        assert stats["max_abs_delta"] > 1e-3, f"{key}: the LoKr changed nothing, the comparison would prove nothing"
        assert stats["max_abs_diff_vs_lora_delta"] <= PATCH_ATOL, (
            f"{key}: ComfyUI's patched - base differs from the file's scaled Kronecker product by "
            f"{stats['max_abs_diff_vs_lora_delta']:.3g} (tolerance {PATCH_ATOL})")
        assert stats["unpatch_restores_base"] is True, f"{key}: unpatch_model did not restore the base weight"
    worst = max(s["max_abs_diff_vs_lora_delta"] for s in run["weights"].values())
    print(f"\nLoKr ({label}): {run['keys_in_file']} keys in file, {run['keys_loaded']} loaded, "
          f"{len(run['keys_not_loaded'])} not loaded; {len(run['patched_weights'])} weights patched, "
          f"max |patched - base - kron delta| = {worst:.3g}; probe peak RSS {probe_report['peak_rss_gb']:.2f} GiB")


def test_the_files_kronecker_product_is_the_trained_delta_at_full_width(lokr_files: dict):
    """What the probe compared against: the file's delta equals the trained PEFT LoKr's delta (q/k/v stacked), here
    for the fused qkv (its first rows: q's) and the single block's linear1, at full width."""
    import torch
    from flux2_lora_pack.trainer.lokr_keys import load_adapter_file, lokr_delta_rows

    for label in CONFIGS:
        config_path = lokr_files["out"] / f"{label}.json"
        state, scales, *_ = _trained_lokr(config_path, seed=list(CONFIGS).index(label))
        file_state = load_adapter_file(lokr_files[label])[0]
        for bfl, prefix in (("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q"),
                            ("single_blocks.0.linear1", "single_transformer_blocks.0.attn.to_qkv_mlp_proj")):
            t = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == prefix}  # q holds the w2
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            rows = torch.kron(w1[:1], w2[:64]) * scales[prefix]  # the first 64 rows of the trained delta
            torch.testing.assert_close(lokr_delta_rows(file_state, bfl, 0, 64), rows, rtol=1e-5, atol=1e-6)
