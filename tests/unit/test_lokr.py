"""LyCORIS LoKr: SimpleTuner's lycoris_config, LyCORIS's layer rules, PEFT's LoKr layers, ComfyUI's key names.

The oracle for "what ComfyUI applies" is `_comfyui_patch_delta` below, written from ComfyUI's
comfy/weight_adapter/lokr.py rules (dim from the decomposed factor's _b, w2's last; scale alpha / dim, 1 when nothing
is decomposed), independently of trainer/lokr_keys.py; tests/e2e/test_stock_comfyui_lokr.py runs ComfyUI itself.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from flux2_lora_pack.trainer.config import PATH_KEYS, LoraConfig, TrainConfig
from flux2_lora_pack.trainer.lokr import (
    LokrOptions,
    adapted_lokr_names,
    apply_init_lokr_norm,
    apply_lokr,
    factorize,
    lokr_scales,
    plan_lokr,
    read_lycoris_config,
)
from flux2_lora_pack.trainer.lokr_keys import (
    adapter_type_of_file,
    comfy_lokr_modules,
    describe_adapter_file,
    load_adapter_file,
    lokr_delta,
    save_trained_lokr,
)
from flux2_lora_pack.trainer.lora import apply_lora, lora_target_modules
from flux2_lora_pack.trainer.lora_keys import bfl_module_to_diffusers, lora_metadata
from flux2_lora_pack.trainer.parallelize import DistEnv, full_lora_state
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import tiny_inputs  # noqa: E402

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# SimpleTuner's documented FLUX.2 LoKr config (documentation/LYCORIS.md, "Flux 2 (Klein) module targets"), verbatim.
SIMPLETUNER_FLUX2 = {
    "bypass_mode": True, "algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_dim": 10000,
    "linear_alpha": 1, "factor": 4,
    "apply_preset": {
        "target_module": ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"],
        "module_algo_map": {"Flux2FeedForward": {"factor": 4}, "Flux2Attention": {"factor": 2},
                            "Flux2ParallelSelfAttention": {"factor": 2}},
    },
}
DECOMPOSED = {"algo": "lokr", "multiplier": 1, "linear_dim": 4, "linear_alpha": 2, "factor": 4}
"""On the tiny model (hidden 256): w2 is (64 x 64) and more, so rank 4 decomposes it; scale 2 / 4."""


def _write(tmp_path: Path, data: dict, name: str = "lycoris_config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _tiny(seed: int = 0) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**TRANSFORMER_CONFIG).eval()


def _inputs() -> dict:
    return {**tiny_inputs(batch=1, h=4, w=4, text=8, reference=False), "return_dict": False}


def _randomize(transformer: torch.nn.Module, *, seed: int = 0, std: float = 0.3) -> None:
    """Trained-looking factors (LyCORIS starts w2 at zero: the delta would be zero and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lokr_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


def _comfyui_patch_delta(file_state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """What ComfyUI's LoKr adapter adds to `diffusion_model.<module>.weight` at strength 1."""
    t = {k.rsplit(".", 1)[1]: v.float() for k, v in file_state.items() if k.startswith(f"diffusion_model.{module}.")}
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = float(t["alpha"]) / dim if "alpha" in t and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


def _bfl_peft_delta(transformer: torch.nn.Module, bfl: str) -> torch.Tensor:
    """The trained delta of a BFL module from the PEFT layers (q, k, v stacked for a fused qkv)."""
    return torch.cat([transformer.get_submodule(n).get_delta_weight("default").float()
                      for n in bfl_module_to_diffusers(bfl)], dim=0)


# ------------------------------------------------------------------------------------------- LyCORIS's rules


@pytest.mark.parametrize(("dimension", "factor", "expected"), [
    (6144, 16, (16, 384)), (18432, 16, (16, 1152)), (3072, -1, (48, 64)), (127, -1, (1, 127)),
    (360, 16, (15, 24)),  # 16 does not divide 360: the largest divisor <= 16 and <= sqrt(360)
    (64, 16, (4, 16)),  # a dividing factor above sqrt is swapped (PEFT's own split gives (16, 4))
    (256, 0, (1, 256)), (256, -5, (16, 16)),
])
def test_factorize_follows_lycoris(dimension, factor, expected):
    assert factorize(dimension, factor) == expected


def test_factorize_agrees_with_peft_where_peft_follows_lycoris():
    from peft.tuners.lokr.layer import factorization

    for dimension in (256, 768, 1024, 1536, 2304, 3072, 4096, 6144, 9216, 12288, 18432, 55296, 1000, 97, 360):
        assert factorize(dimension, -1) == factorization(dimension, -1), dimension
        for factor in (1, 2, 3, 4, 8, 16, 32):
            if factor * factor <= dimension:
                assert factorize(dimension, factor) == factorization(dimension, factor), (dimension, factor)


def test_plan_lokr_follows_lycoris_lokrmodule():
    full = plan_lokr(6144, 6144, LokrOptions(dim=10000, alpha=1, factor=16))
    assert (full.out_split, full.in_split, full.w1_decomposed, full.w2_decomposed) == ((16, 384), (16, 384), False, False)
    assert full.scale == 1.0  # neither factor decomposed: scale 1 whatever linear_alpha says
    low = plan_lokr(6144, 6144, LokrOptions(dim=16, alpha=8, factor=16))
    assert (low.w1_decomposed, low.w2_decomposed, low.rank, low.scale) == (False, True, 16, 0.5)
    assert plan_lokr(6144, 6144, LokrOptions(dim=16, alpha=8, factor=16, full_matrix=True)).full
    assert plan_lokr(6144, 6144, LokrOptions(dim=16, alpha=8, factor=16, rs_lora=True)).scale == 8 / 4
    assert plan_lokr(6144, 6144, LokrOptions(dim=16, alpha=0, factor=16)).scale == 1.0  # alpha 0 means alpha = dim
    both = plan_lokr(6144, 6144, LokrOptions(dim=4, alpha=4, factor=64, decompose_both=True))
    assert (both.w1_decomposed, both.w2_decomposed) == (True, True)  # 4 < 64 / 2
    swapped = plan_lokr(18432, 6144, LokrOptions(dim=10000, alpha=1, factor=16, unbalanced_factorization=True))
    assert swapped.out_split == (1152, 16) and swapped.in_split == (16, 384)


# ---------------------------------------------------------------------------------------------- lycoris_config


def test_simpletuner_flux2_lokr_example_reads_as_documented(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, SIMPLETUNER_FLUX2))
    assert spec.algo == "lokr" and spec.path == str(tmp_path / "lycoris_config.json")
    assert spec.options == LokrOptions(dim=10000, alpha=1.0, factor=4, full_matrix=True)
    assert spec.target_classes == ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention")
    assert dict(spec.class_options) == {
        "Flux2FeedForward": LokrOptions(dim=10000, alpha=1.0, factor=4, full_matrix=True),
        "Flux2Attention": LokrOptions(dim=10000, alpha=1.0, factor=2, full_matrix=True),
        "Flux2ParallelSelfAttention": LokrOptions(dim=10000, alpha=1.0, factor=2, full_matrix=True),
    }
    assert json.loads(spec.document) == SIMPLETUNER_FLUX2


@pytest.mark.parametrize(("change", "match"), [
    ({"algo": None}, r"field 'algo' is missing; give \"algo\": \"lokr\""),
    ({"algo": "loha"}, r"field 'algo' is 'loha'; this trainer trains LyCORIS 'lokr' only"),
    ({"multiplier": 0.5}, r"field 'multiplier' is 0.5; only 1 is supported"),
    ({"linear_dim": None}, r"field 'linear_dim' is missing"),
    ({"linear_dim": 0}, r"field 'linear_dim' must be a whole number >= 1, got 0"),
    ({"linear_alpha": 0.5}, r"field 'linear_alpha' is 0.5; SimpleTuner truncates it to a whole number \(int\(\) "
                            r"gives 0\)"),
    ({"factor": "16"}, r"field 'factor' must be a whole number"),
    ({"full_matrix": "yes"}, r"field 'full_matrix' must be true or false"),
    ({"use_scalar": True}, r"field 'use_scalar' is True; this trainer implements it only at LyCORIS's default False"),
    ({"rank_dropout": 0.1}, r"field 'rank_dropout' is 0.1; .*only at LyCORIS's default 0"),
    ({"weight_decompose": True}, r"field 'weight_decompose' is True"),
    ({"conv_dim": "/home/me/x"}, r"field 'conv_dim' must be a number, got '/home/me/x'"),
    ({"lora_dim": 8}, r"field 'lora_dim' is not supported: it is not a LyCORIS LoKr setting .* Supported fields: "
                      r"algo, apply_preset, bypass_mode, decompose_both, factor, full_matrix, linear_alpha, linear_dim, "
                      r"multiplier, rs_lora, unbalanced_factorization\. Remove it\."),
    ({"preset": "attn-mlp"}, r"field 'preset' is not supported: LyCORIS's named presets target SD/SDXL class names"),
    ({"apply_preset": {"target_module": ["Attention", "FeedForward"]}},
     r"apply_preset.target_module names 'Attention', which is no FLUX.2 module class; use Flux2Attention, "
     r"Flux2FeedForward, Flux2ParallelSelfAttention, .*'Attention' and 'FeedForward' are the generic diffusers classes"),
    ({"apply_preset": {"name_algo_map": {"transformer_blocks.*": {"factor": 4}}}},
     r"field 'apply_preset.name_algo_map' is not supported \(name-based targeting is not supported"),
    ({"apply_preset": {"module_algo_map": {"Flux2Attention": {"factor": 2, "use_scalar": True}}}},
     r"field 'apply_preset.module_algo_map.Flux2Attention.use_scalar' is not supported"),
    ({"apply_preset": {"module_algo_map": {"Flux2Attention": {"algo": "loha"}}}},
     r"field 'apply_preset.module_algo_map.Flux2Attention.algo' is 'loha'; only 'lokr' is trained"),
])
def test_bad_lycoris_config_fields_are_refused_naming_the_file_and_field(tmp_path, change, match):
    data = {k: v for k, v in ({**DECOMPOSED, **change}).items() if v is not None}
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"^lycoris_config {path}: {match}"):
        read_lycoris_config(path)


def test_conv_only_fields_are_accepted_with_a_warning_and_off_values_silently(tmp_path, caplog):
    path = _write(tmp_path, {**DECOMPOSED, "conv_dim": 8, "use_tucker": True, "dropout": 0.0, "rank_dropout": 0,
                             "use_scalar": False})
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.lokr"):
        spec = read_lycoris_config(path)
    assert spec.options == LokrOptions(dim=4, alpha=2.0, factor=4)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("has no effect: it configures convolutions" in m for m in warned)
    assert "'conv_dim'" in warned[0] and "'use_tucker'" in warned[1]


def test_missing_or_unreadable_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"lycoris_config {tmp_path / 'nope.json'} does not exist"):
        read_lycoris_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=rf"lycoris_config {bad} cannot be read as UTF-8 JSON"):
        read_lycoris_config(bad)


# -------------------------------------------------------------------------------------------------- the config


def _config(tmp_path: Path, **keys) -> dict:
    model = tmp_path / "FLUX.2-dev"
    model.mkdir(exist_ok=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    return {"pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(manifest), **keys}


def test_config_reads_lycoris_config_when_it_is_read_and_round_trips(tmp_path):
    path = _write(tmp_path, SIMPLETUNER_FLUX2)
    config = TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(path), init_lokr_norm=1e-3))
    assert config.lora.lycoris == read_lycoris_config(path)
    assert (config.lora_type, config.lycoris_config, config.init_lokr_norm) == ("lycoris", str(path), 1e-3)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert "lycoris_config" in PATH_KEYS  # resolved like every path key (trainer/cli_config.py)
    assert TrainConfig.from_dict(_config(tmp_path)).lora.lycoris is None  # lora_type "standard" by default


def test_config_refuses_lycoris_without_a_file_and_conflicting_settings(tmp_path):
    with pytest.raises(ValueError, match=r'lora_type "lycoris" needs lycoris_config: the path of a LyCORIS JSON'):
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris"))
    with pytest.raises(ValueError, match=r"lycoris_config .*does not exist"):
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(tmp_path / "missing.json")))
    path = _write(tmp_path, SIMPLETUNER_FLUX2)
    with pytest.raises(ValueError, match=r"apply_preset.target_module \['Flux2Attention', 'Flux2FeedForward', "
                                         r"'Flux2ParallelSelfAttention'\] and flux_lora_target 'tiny' both choose"):
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(path), flux_lora_target="tiny"))
    both = _write(tmp_path, {**DECOMPOSED, "decompose_both": True}, "both.json")
    with pytest.raises(ValueError, match=r"init_lokr_norm needs full LoKr factors, but lycoris_config .*both.json sets "
                                         r"decompose_both"):
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(both), init_lokr_norm=1e-3))
    with pytest.raises(ValueError, match=r"init_lokr_norm must be > 0"):
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(path), init_lokr_norm=0))


def test_settings_the_adapter_type_ignores_are_warned_about(tmp_path, caplog):
    path = _write(tmp_path, DECOMPOSED)
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.lokr"):
        TrainConfig.from_dict(_config(tmp_path, lycoris_config=str(path), init_lokr_norm=1e-3))
        TrainConfig.from_dict(_config(tmp_path, lora_type="lycoris", lycoris_config=str(path), lora_rank=8))
    messages = [r.getMessage() for r in caplog.records]
    assert any("lycoris_config=" in m and "no effect because lora_type is 'standard'" in m for m in messages)
    assert any("init_lokr_norm=0.001 has no effect because lora_type is 'standard'" in m for m in messages)
    assert any("lora_rank has no effect with lora_type 'lycoris'" in m for m in messages)


def test_validation_lycoris_strength_one_is_accepted_and_others_refused(tmp_path):
    TrainConfig.from_dict(_config(tmp_path, validation_lycoris_strength=1.0))
    with pytest.raises(ValueError, match=r"'validation_lycoris_strength' is 0.5; .*validation renders the adapter as it "
                                         r"is trained, at strength 1"):
        TrainConfig.from_dict(_config(tmp_path, validation_lycoris_strength=0.5))


# ----------------------------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("preset", ["all", "attention", "mlp", "tiny"])
def test_presets_adapt_exactly_the_layers_they_adapt_for_lora(tmp_path, preset):
    spec = read_lycoris_config(_write(tmp_path, DECOMPOSED))
    model = _tiny()
    apply_lokr(model, spec=spec, preset=preset)
    assert adapted_lokr_names(model) == set(lora_target_modules(_tiny(), preset=preset))


@pytest.mark.parametrize(("classes", "preset"), [
    (["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"], "all"),
    (["Flux2TransformerBlock", "Flux2SingleTransformerBlock"], "all"),
    (["Flux2Attention", "Flux2ParallelSelfAttention"], "attention"),
    (["Flux2FeedForward"], "mlp"),
])
def test_apply_preset_target_classes_map_to_the_presets(tmp_path, classes, preset):
    spec = read_lycoris_config(_write(tmp_path, {**DECOMPOSED, "apply_preset": {"target_module": classes}}))
    model = _tiny()
    apply_lokr(model, spec=spec, preset="all")
    assert adapted_lokr_names(model) == set(lora_target_modules(_tiny(), preset=preset))


def test_module_algo_map_sets_the_factor_of_the_layers_inside_a_class(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, SIMPLETUNER_FLUX2))
    plans = apply_lokr(_tiny(), spec=spec, preset="all")
    assert plans["transformer_blocks.0.attn.to_q"].out_split == (2, 128)  # Flux2Attention: factor 2
    assert plans["transformer_blocks.0.ff.linear_in"].out_split == (4, 384)  # Flux2FeedForward: factor 4
    assert plans["single_transformer_blocks.0.attn.to_out"].in_split == (2, 512)  # Flux2ParallelSelfAttention: 2
    assert all(plan.full and plan.scale == 1.0 for plan in plans.values())  # full_matrix


def test_only_the_lokr_factors_train_and_qkv_share_w2(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, DECOMPOSED))
    model = _tiny()
    plans = apply_lokr(model, spec=spec, preset="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lokr_w" in n and n.endswith(".default") for n in trainable)
    for block in range(TRANSFORMER_CONFIG["num_layers"]):
        for triple in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            layers = [model.get_submodule(f"transformer_blocks.{block}.attn.{n}") for n in triple]
            for key in ("lokr_w2_a", "lokr_w2_b"):
                shared = [getattr(layer, key)["default"] for layer in layers]
                assert shared[0] is shared[1] is shared[2]
            assert len({id(layer.lokr_w1["default"]) for layer in layers}) == 3
    # Every layer of the tiny model: w1 full (4 x 4), w2 decomposed at rank 4, scale alpha / dim = 0.5.
    assert all(not p.w1_decomposed and p.w2_decomposed and p.scale == 0.5 for p in plans.values())
    shared = 2 * TRANSFORMER_CONFIG["num_layers"] * 2 * (64 * 4 + 4 * 64)  # two w2 fewer per q/k/v triple
    expected = sum(16 + (p.out_split[1] + p.in_split[1]) * 4 for p in plans.values()) - shared
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_fresh_lokr_is_a_no_op_and_each_delta_is_the_planned_kronecker_product(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, DECOMPOSED))
    base, model = _tiny(), _tiny()
    plans = apply_lokr(model, spec=spec, preset="all")
    with torch.no_grad():
        assert torch.equal(model(**_inputs())[0], base(**_inputs())[0])
    _randomize(model)
    layer = model.get_submodule("single_transformer_blocks.1.attn.to_qkv_mlp_proj")
    w1 = layer.lokr_w1["default"]
    w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    assert w1.shape == (4, 4) and w2.shape == (576, 64)
    plan = plans["single_transformer_blocks.1.attn.to_qkv_mlp_proj"]
    assert_close(layer.get_delta_weight("default"), torch.kron(w1, w2) * plan.scale, rtol=0, atol=0)
    with torch.no_grad():
        x = torch.randn(3, 256)
        assert_close(layer(x), layer.get_base_layer()(x) + x @ (torch.kron(w1, w2) * 0.5).T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- saved files


def _trained(tmp_path: Path, data: dict, *, preset: str = "all", seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A tiny model with a randomized LoKr, saved as the trainer saves it (loop.save_final_lora)."""
    spec = read_lycoris_config(_write(tmp_path, data, f"lycoris_{seed}.json"))
    model = _tiny()
    apply_lokr(model, spec=spec, preset=preset)
    _randomize(model, seed=seed)
    metadata = lora_metadata(rank=spec.options.dim, alpha=spec.options.alpha, targets=preset, base_model="FLUX.2-dev",
                             steps=3, dataset_fingerprint="none", extra={"lycoris_config": json.loads(spec.document)})
    path = save_trained_lokr(tmp_path / f"lokr_{seed}.safetensors", state=full_lora_state(model, env=CPU),
                             scales=lokr_scales(model), metadata=metadata)
    return model, path


@pytest.mark.parametrize("data", [DECOMPOSED, {**DECOMPOSED, "decompose_both": True, "factor": 16, "linear_dim": 2},
                                  {**DECOMPOSED, "linear_dim": 9, "rs_lora": True, "full_matrix": True}],
                         ids=["w2-decomposed", "both-decomposed", "full-rs-lora"])
def test_comfyui_applies_exactly_the_trained_delta_to_every_bfl_module(tmp_path, data):
    model, path = _trained(tmp_path, data)
    state = load_file(str(path))
    modules = sorted({k[len("diffusion_model."):].rsplit(".", 1)[0] for k in state})
    assert len(modules) == 2 * 8 + 3 * 2  # 8 BFL modules per double block (q/k/v fused), 2 per single block
    suffixes = {k.rsplit(".", 1)[1] for k in state}
    assert suffixes <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    full = data.get("full_matrix", False)
    assert ("alpha" in suffixes) is not full  # alpha only where ComfyUI reads it (a decomposed factor)
    for module in modules:
        expected = _bfl_peft_delta(model, module)
        assert expected.abs().max() > 1e-4, module
        assert_close(_comfyui_patch_delta(state, module), expected, rtol=1e-5, atol=1e-7)
        assert_close(lokr_delta(state, module), expected, rtol=1e-5, atol=1e-7)
    if full:  # rs_lora with full factors trains scale sqrt(9) = 3, ComfyUI applies 1: folded into w1
        layer = model.get_submodule("single_transformer_blocks.0.attn.to_out")
        assert layer.scaling["default"] == 3.0
        assert_close(state["diffusion_model.single_blocks.0.linear2.lokr_w1"], layer.lokr_w1["default"] * 3.0)
    # The fused qkv: w1 stacks q, k and v's rows; w2 is the one they share.
    qkv = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("diffusion_model.double_blocks.1.txt_attn.qkv.")}
    q = model.get_submodule("transformer_blocks.1.attn.add_q_proj")
    rows = (q.lokr_w1["default"] if "default" in q.lokr_w1 else q.lokr_w1_a["default"]).shape[0]
    assert (qkv["lokr_w1"] if "lokr_w1" in qkv else qkv["lokr_w1_a"]).shape[0] == 3 * rows


def test_file_metadata_says_the_adapter_type_and_describe_reports_it(tmp_path):
    _, path = _trained(tmp_path, DECOMPOSED)
    assert adapter_type_of_file(path) == "lokr"
    _, metadata, layout, kind = load_adapter_file(path)
    assert (layout, kind, json.loads(metadata["adapter_type"])) == ("comfyui", "lokr", "lokr")
    assert json.loads(metadata["lycoris_config"]) == DECOMPOSED and json.loads(metadata["rank"]) == 4
    report = describe_adapter_file(path)
    assert report["adapter_type"] == "lokr" and report["num_modules"] == 22
    assert report["modules"]["double_blocks.0.img_attn.qkv"] == {"w1": [12, 4], "w2": [64, 64], "scale": 0.5,
                                                                 "w1_rank": None, "w2_rank": 4}
    lora = tmp_path / "lora.safetensors"
    plain = _tiny()
    apply_lora(plain, preset="tiny", rank=2, alpha=2)
    from flux2_lora_pack.trainer.lora_keys import save_trained_lora
    save_trained_lora(lora, state=full_lora_state(plain, env=CPU), rank=2, alpha=2, hidden_size=256, layout="comfyui",
                      metadata=lora_metadata(rank=2, alpha=2, targets="tiny", base_model="x", steps=1,
                                             dataset_fingerprint="none"))
    assert adapter_type_of_file(lora) == "lora" and load_adapter_file(lora)[3] == "lora"
    assert describe_adapter_file(lora)["adapter_type"] == "lora"


def test_inspect_lora_cli_describes_a_lokr_file(tmp_path, capsys):
    from flux2_lora_pack.trainer.__main__ import main

    _, path = _trained(tmp_path, DECOMPOSED)
    assert main(["inspect-lora", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter_type"] == "lokr" and report["metadata"]["adapter_type"] == "lokr"


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s | {"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 256)},
     r"key 'diffusion_model.single_blocks.0.linear1.lora_A.weight' is no LoKr key .* may not mix LoKr with LoRA"),
    (lambda s: s | {"diffusion_model.single_blocks.0.linear1.lokr_t2": torch.zeros(2, 2, 1, 1)},
     r"is a Tucker core, which LoKr uses only for convolutions"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("diffusion_model.single_blocks.0.linear2.lokr_w2")},
     r"'diffusion_model.single_blocks.0.linear2' lacks w2: it needs lokr_w2, or lokr_w2_a and lokr_w2_b"),
    (lambda s: {k.replace("single_blocks.0.", "single_blocks.0.mlp."): v for k, v in s.items()},
     r"names no FLUX.2 module in the ComfyUI/BFL layout"),
    (lambda s: s | {"diffusion_model.single_blocks.0.linear2.lokr_w1": torch.zeros(4, 4, 1)},
     r"lokr_w1 has shape \(4, 4, 1\); FLUX.2's layers are Linear"),
])
def test_broken_lokr_files_are_refused_naming_the_key(tmp_path, edit, match):
    _, path = _trained(tmp_path, DECOMPOSED)
    broken = tmp_path / "broken.safetensors"
    save_file(edit(load_file(str(path))), str(broken))
    with pytest.raises(ValueError, match=match):
        load_adapter_file(broken)


# ------------------------------------------------------------------------------------------ applying a file


def test_attached_lokr_file_reproduces_the_trained_model_and_detaches_cleanly(tmp_path):
    from flux2_lora_pack.trainer.inference import LoraRef
    from flux2_lora_pack.trainer.lora_adapters import attached_loras

    trained, path = _trained(tmp_path, DECOMPOSED)
    base = _tiny()
    with torch.no_grad():
        expected, plain = trained(**_inputs())[0], base(**_inputs())[0]
        with attached_loras(base, loras=[LoraRef(path=str(path), strength=1.0)]):
            ours = base(**_inputs())[0]
        assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert (ours - plain).abs().max() > 1e-3
        after = base(**_inputs())[0]
    assert torch.equal(after, plain) and not adapted_lokr_names(base, "flux2lora_0")
    assert not any(".lokr_" in n for n, _ in base.named_parameters())  # the LoKr layers are unwrapped again


def test_strength_scales_the_attached_delta_and_mixes_with_a_lora(tmp_path):
    """W + s * delta (ComfyUI's rule) on every adapted weight, with a LoRA attached beside the LoKr."""
    from flux2_lora_pack.trainer.inference import LoraRef
    from flux2_lora_pack.trainer.lora_adapters import attached_loras
    from flux2_lora_pack.trainer.lora_keys import save_trained_lora

    _, path = _trained(tmp_path, DECOMPOSED)
    lora_model = _tiny()
    apply_lora(lora_model, preset="tiny", rank=2, alpha=2)
    with torch.no_grad():
        for n, p in lora_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    lora_path = save_trained_lora(tmp_path / "lora.safetensors", state=full_lora_state(lora_model, env=CPU), rank=2,
                                  alpha=2, hidden_size=256, layout="comfyui",
                                  metadata=lora_metadata(rank=2, alpha=2, targets="tiny", base_model="x", steps=1,
                                                         dataset_fingerprint="none"))
    state = load_file(str(path))
    merged = copy.deepcopy(lora_model)
    with torch.no_grad():
        for name in comfy_lokr_modules(state):
            targets = bfl_module_to_diffusers(name)
            delta = _comfyui_patch_delta(state, name) * 0.5
            for i, target in enumerate(targets):
                layer = merged.get_submodule(target)
                layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                layer.weight += delta[i * layer.out_features:(i + 1) * layer.out_features]
        expected = merged(**_inputs())[0]
        base = _tiny()
        refs = [LoraRef(path=str(lora_path), strength=1.0), LoraRef(path=str(path), strength=0.5)]
        with attached_loras(base, loras=refs):
            ours = base(**_inputs())[0]
        assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        with attached_loras(base, loras=[LoraRef(path=str(path), strength=0.0)]):
            assert torch.equal(base(**_inputs())[0], _tiny()(**_inputs())[0])


def test_apply_lora_node_takes_a_lokr_file_and_refuses_one_for_another_model(pack, comfy_root, tiny_model_dir,
                                                                            tmp_path):
    import importlib

    from flux2_lora_pack.trainer.inference import Flux2ModelSpec
    from flux2_lora_pack.trainer.model_files import inspect_model_folder

    nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    _, path = _trained(tmp_path, DECOMPOSED)
    model = Flux2ModelSpec(folder=inspect_model_folder(tiny_model_dir), precision="fp32")
    with_lokr, native = nodes.Flux2ApplyLora().apply(model, nodes.TrainedLora(path=str(path)), 0.75)
    assert native is None and model.loras == () and [r.path for r in with_lokr.loras] == [str(path)]
    wrong = load_file(str(path))
    wrong["diffusion_model.single_blocks.1.linear2.lokr_w1"] = torch.zeros(4, 8)  # 4 x 2048 input: not this model's
    bad = tmp_path / "wrong.safetensors"
    save_file(wrong, str(bad), metadata={"adapter_type": '"lokr"'})
    with pytest.raises(ValueError, match=r"LoKr file 'wrong.safetensors' adapts 'single_transformer_blocks.1.attn.to_out' "
                                         r"as a 256 x 2048 layer; this model has it as 256 x 1024"):
        nodes.Flux2ApplyLora().apply(model, nodes.TrainedLora(path=str(bad)), 1.0)
    (saved,) = nodes.Flux2SaveLora().save(nodes.TrainedLora(path=str(path)), "flux2/my_lokr")["result"]
    assert Path(saved).read_bytes() == path.read_bytes() and adapter_type_of_file(saved) == "lokr"


def test_a_fused_qkv_that_does_not_split_in_thirds_is_refused_for_diffusers(tmp_path):
    from flux2_lora_pack.trainer.lokr_keys import lokr_to_diffusers

    state = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.ones(16, 16),
             "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.ones(48, 16)}  # LyCORIS on a fused 768 x 256
    with pytest.raises(ValueError, match=r"double_blocks.0.img_attn.qkv's w1 has 16 rows, not a multiple of 3, so its "
                                         r"Kronecker product does not split .* Load it in ComfyUI"):
        lokr_to_diffusers(comfy_lokr_modules(state))


# --------------------------------------------------------------------------------------------- init_lokr_norm


def test_init_lokr_norm_draws_w2_like_the_base_weight(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, SIMPLETUNER_FLUX2))
    model = _tiny()
    apply_lokr(model, spec=spec, preset="all", init_lokr_norm=1e-3)
    apply_init_lokr_norm(model, scale=1e-3, seed=5)
    for names in (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
                  ["single_transformer_blocks.2.attn.to_qkv_mlp_proj"]):
        layers = [model.get_submodule(n) for n in names]
        base = torch.cat([layer.get_base_layer().weight.detach().double().flatten() for layer in layers])
        w2 = layers[0].lokr_w2["default"].detach().double() / 1e-3
        assert math.isclose(w2.mean().item(), base.mean().item(), rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(w2.std().item(), base.std().item(), rel_tol=1e-6)
        assert all(torch.equal(layer.lokr_w1["default"], torch.ones_like(layer.lokr_w1["default"])) for layer in layers)
    again = _tiny()
    apply_lokr(again, spec=spec, preset="all", init_lokr_norm=1e-3)
    apply_init_lokr_norm(again, scale=1e-3, seed=5)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full_lora_state(model, env=CPU).items(),
                                                            full_lora_state(again, env=CPU).items()))
    with torch.no_grad():  # SimpleTuner: "init_lokr_norm slightly changes the validation images at step 0"
        assert (model(**_inputs())[0] - _tiny()(**_inputs())[0]).abs().max() > 0


def test_init_lokr_norm_refuses_a_decomposed_factor_before_weights_load(tmp_path):
    spec = read_lycoris_config(_write(tmp_path, DECOMPOSED))
    with pytest.raises(ValueError, match=r"init_lokr_norm needs full LoKr factors, but transformer_blocks.0.attn.to_q "
                                         r"\(256 x 256\) gets a decomposed one .* raise linear_dim or set full_matrix"):
        apply_lokr(_tiny(), spec=spec, preset="all", init_lokr_norm=1e-3)


# ------------------------------------------------------------------------------------- with the trainer's model


def test_lokr_on_an_int8_quanto_base_trains_only_its_factors(tiny_model_dir, tmp_path):
    """build_model: quanto quantizes the base, LoKr wraps the QLinear layers, init_lokr_norm dequantizes for its
    statistics, and a backward reaches every LoKr factor (and nothing else)."""
    from flux2_lora_pack.trainer.config import (
        MemoryConfig,
        ParallelismConfig,
        QuantizationConfig,
    )
    from flux2_lora_pack.trainer.model import build_model
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.quantize import quantized_module_names

    path = _write(tmp_path, SIMPLETUNER_FLUX2)
    lora = LoraConfig(lora_type="lycoris", lycoris_config=path, init_lokr_norm=1e-3)
    model = build_model(inspect_model_folder(tiny_model_dir), lora=lora,
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU,
                        quantization=QuantizationConfig(base_model_precision="int8-quanto", base_model_default_dtype="fp32",
                                                        quantize_via="cpu"))
    targets = lora_target_modules(_tiny(), preset="all")
    assert quantized_module_names(model.inner) == {f"{t}.base_layer" for t in targets}
    trainable = {n: p for n, p in model.inner.named_parameters() if p.requires_grad}
    assert trainable and all(".lokr_w" in n for n in trainable)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in trainable.items() if ".lokr_w1." in n)
    loss = model.module(**_inputs())[0].float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_lokr_under_group_offload_gives_the_same_loss_and_gradients(tiny_model_dir, tmp_path):
    """Group offload moves only the frozen block weights (the LoKr factors stay put): same loss, same gradients."""
    from flux2_lora_pack.trainer.config import (
        MemoryConfig,
        OffloadConfig,
        ParallelismConfig,
    )
    from flux2_lora_pack.trainer.model import build_model
    from flux2_lora_pack.trainer.model_files import inspect_model_folder

    lora = LoraConfig(lora_type="lycoris", lycoris_config=_write(tmp_path, SIMPLETUNER_FLUX2), init_lokr_norm=1e-2)
    results = []
    for offload in (None, OffloadConfig(enabled=True, offload_type="block_level", blocks_per_group=2)):
        model = build_model(inspect_model_folder(tiny_model_dir), lora=lora,
                            memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True),
                            parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, offload=offload)
        loss = model.module(**_inputs())[0].pow(2).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.inner.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=0)


def test_train_lora_node_reads_lycoris_config_from_comfyuis_input_folder_only(pack, comfy_root, tmp_path_factory):
    """extra_config_json's lycoris_config is a file the trainer reads: relative means ComfyUI's input folder, and a
    path outside the allowed folders is refused, as for user_prompt_library."""
    import importlib

    nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    extra = {"lora_type": "lycoris", "lycoris_config": "lokr/flux2.json"}
    nodes.check_extra_paths(extra)
    assert extra["lycoris_config"] == str(comfy_root / "input" / "lokr" / "flux2.json")
    outside = tmp_path_factory.mktemp("outside") / "lycoris.json"
    with pytest.raises(ValueError, match=r"lycoris_config .* outside the folders"):
        nodes.check_extra_paths({"lycoris_config": str(outside)})


def test_an_edited_lycoris_config_changes_the_run_identity(tiny_model_dir, tmp_path):
    from flux2_lora_pack.trainer.inference import Flux2ModelSpec
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.run import run_identity

    model = Flux2ModelSpec(folder=inspect_model_folder(tiny_model_dir), precision="fp32")
    path = _write(tmp_path, DECOMPOSED)
    settings = {"lora_type": "lycoris", "lycoris_config": str(path)}
    first = run_identity(model=model, fingerprints=["f"], settings=settings, num_processes=1)
    assert run_identity(model=model, fingerprints=["f"], settings=settings, num_processes=1) == first
    _write(tmp_path, {**DECOMPOSED, "factor": 8})
    assert run_identity(model=model, fingerprints=["f"], settings=settings, num_processes=1) != first
