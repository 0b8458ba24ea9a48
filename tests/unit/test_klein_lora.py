"""FLUX.2 [klein] LoRA files: saved in ComfyUI/BFL names with BFL's shapes at the real klein widths, applied to
BFL-named weights exactly as PEFT merges them, converted by `convert-lora --to diffusers` into a file that
Flux2KleinPipeline loads with every module, applied by Apply LoRA to the distilled model of the same size ("train
on base, preview on distilled"), and refused by name on another FLUX.2 size.

Stock ComfyUI's own FLUX.2 classes at klein widths: tests/e2e/test_stock_comfyui_klein_lora.py (needs COMFYUI_DIR).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer.flavours import SPECS
from flux2_lora_pack.trainer.lora import adapted_module_names, apply_lora, lora_state_dict, lora_target_modules
from flux2_lora_pack.trainer.lora_keys import (
    apply_lora_to_comfy_state,
    bfl_module_to_diffusers,
    diffusers_to_comfy,
    load_lora_file,
    lora_delta,
    lora_metadata,
    save_lora_file,
)
from flux2_lora_pack.trainer.model_files import inspect_model_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import tiny_inputs  # noqa: E402

RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that ignores alpha is off by 2x
WIDTH, HEIGHT = 48, 32


def _make(tmp_path_factory, name: str, **kwargs) -> Path:
    from flux2_lora_pack.trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp(name) / "model", **kwargs)


@pytest.fixture(scope="module")
def klein4(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "klein4", seed=0, flavour="klein-4b")


@pytest.fixture(scope="module")
def klein4_distilled(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "klein4d", seed=2, flavour="klein-4b", distilled=True)


@pytest.fixture(scope="module")
def klein9(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "klein9", seed=0, flavour="klein-9b")


def _inputs() -> dict:
    inputs = tiny_inputs(batch=1, h=4, w=4, text=8, reference=False)
    inputs["guidance"] = None  # klein has no guidance embedding
    return {**inputs, "return_dict": False}


def _randomize_lora(transformer: torch.nn.Module, *, seed: int) -> None:
    """Trained-looking adapters: A as PEFT initialises it, B != 0 (PEFT starts B at zero: no delta)."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
            bound = 1.0 / math.sqrt(lora_a.in_features)
            lora_a.weight = torch.nn.Parameter((torch.rand(lora_a.weight.shape, generator=g) * 2 - 1) * bound)
            lora_b.weight = torch.nn.Parameter(torch.randn(lora_b.weight.shape, generator=g) * 0.2)


def _save_as_trainer(path: Path, transformer: torch.nn.Module, *, flavour: str) -> Path:
    """What trainer.loop.save_final_lora writes: ComfyUI/BFL layout, base_model and model_flavour in the header."""
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    comfy = diffusers_to_comfy(lora_state_dict(transformer), alpha=ALPHA, rank=RANK, hidden_size=hidden)
    metadata = lora_metadata(rank=RANK, alpha=ALPHA, targets="all", base_model=f"FLUX.2-{flavour}", steps=10,
                             dataset_fingerprint="sha256:0")
    metadata["model_flavour"] = json.dumps(flavour)
    return save_lora_file(path, state=comfy, metadata=metadata, layout="comfyui")


@pytest.fixture(scope="module")
def trained(klein4, tmp_path_factory):
    """(adapted transformer, its output on fixed inputs, base output, the klein-4b LoRA file as the trainer saves it)."""
    from diffusers import Flux2Transformer2DModel

    base = Flux2Transformer2DModel.from_pretrained(klein4 / "transformer").eval()
    adapted = copy.deepcopy(base)
    apply_lora(adapted, preset="all", rank=RANK, alpha=ALPHA)
    _randomize_lora(adapted, seed=0)
    with torch.no_grad():
        out, base_out = adapted(**_inputs())[0], base(**_inputs())[0]
    assert (out - base_out).abs().max() > 1e-2
    path = _save_as_trainer(tmp_path_factory.mktemp("lora") / "klein4.safetensors", adapted, flavour="klein-4b")
    return adapted, out, base_out, path


# ------------------------------------------------------------------------------------- BFL layout at klein sizes


def _bfl_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every BFL/ComfyUI weight the `all` preset adapts in one double and one single block, from BFL's
    FLUX.2 architecture (flux2 src/flux2/model.py: SwiGLU MLP of width 3 x hidden, fused qkv; single blocks fuse
    qkv with the MLP input in linear1 and the attention output with the MLP output in linear2), not from diffusers."""
    mlp = 3 * hidden
    return {
        "double_blocks.0.img_attn.qkv": (3 * hidden, hidden), "double_blocks.0.txt_attn.qkv": (3 * hidden, hidden),
        "double_blocks.0.img_attn.proj": (hidden, hidden), "double_blocks.0.txt_attn.proj": (hidden, hidden),
        "double_blocks.0.img_mlp.0": (2 * mlp, hidden), "double_blocks.0.img_mlp.2": (hidden, mlp),
        "double_blocks.0.txt_mlp.0": (2 * mlp, hidden), "double_blocks.0.txt_mlp.2": (hidden, mlp),
        "single_blocks.0.linear1": (3 * hidden + 2 * mlp, hidden), "single_blocks.0.linear2": (hidden, hidden + mlp),
    }


@pytest.mark.parametrize("flavour", ["klein-4b", "klein-9b"])
def test_saved_lora_has_bfl_names_and_shapes_at_real_klein_width(flavour, tmp_path):
    """The real klein width (3072 / 4096, head dim 128), one block of each kind built on the meta device, adapters
    of rank 4 filled in: every key of the saved file is a ComfyUI/BFL weight name of BFL's shape, with its alpha."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    config = dict(SPECS[flavour].transformer, num_layers=1, num_single_layers=1)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    with init_empty_weights():
        transformer = Flux2Transformer2DModel(**config)
    apply_lora(transformer, preset="all", rank=RANK, alpha=ALPHA)
    _randomize_lora(transformer, seed=1)
    path = _save_as_trainer(tmp_path / "lora.safetensors", transformer, flavour=flavour)
    state, metadata, layout = load_lora_file(path)
    assert layout == "comfyui" and json.loads(metadata["model_flavour"]) == flavour
    expected = _bfl_shapes(hidden)
    assert hidden == {"klein-4b": 3072, "klein-9b": 4096}[flavour]
    assert set(state) == {f"diffusion_model.{m}.{part}" for m in expected
                          for part in ("lora_A.weight", "lora_B.weight", "alpha")}
    for module, (out_features, in_features) in expected.items():
        prefix = f"diffusion_model.{module}"
        fused = module.endswith(".qkv")  # q, k, v fused: rank 3r, alpha 3 x alpha (same scale)
        assert state[f"{prefix}.lora_A.weight"].shape == ((3 if fused else 1) * RANK, in_features), module
        assert state[f"{prefix}.lora_B.weight"].shape == (out_features, (3 if fused else 1) * RANK), module
        assert state[f"{prefix}.alpha"].item() == (3 if fused else 1) * ALPHA, module
        assert lora_delta(state, module).shape == (out_features, in_features)


def _bfl_view(weights: dict[str, torch.Tensor], bfl: str) -> torch.Tensor:
    names = bfl_module_to_diffusers(bfl)
    return torch.cat([weights[n] for n in names]) if len(names) == 3 else weights[names[0]]


def test_bfl_weights_plus_file_equal_the_peft_merged_klein(trained):
    """What ComfyUI's loader does with our file (patched = W + scale B A on BFL-named weights), without ComfyUI."""
    from peft.tuners.lora import LoraLayer

    adapted, *_, path = trained
    state, _, _ = load_lora_file(path)
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in adapted.named_modules() if isinstance(m, LoraLayer)}
    merged_model = copy.deepcopy(adapted)
    for module in merged_model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {n: m.get_base_layer().weight.detach() for n, m in merged_model.named_modules() if isinstance(m, LoraLayer)}
    bfl_modules = sorted({k[len("diffusion_model."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    assert len(bfl_modules) == 8 * 5 + 2 * 20  # every module of klein-4b's 5 double and 20 single blocks
    patched = apply_lora_to_comfy_state({f"diffusion_model.{m}.weight": _bfl_view(base, m) for m in bfl_modules},
                                        state, strength=1.0)
    for m in bfl_modules:
        assert_close(patched[f"diffusion_model.{m}.weight"], _bfl_view(merged, m), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- diffusers


def test_converted_lora_loads_into_flux2_klein_pipeline_with_every_module(trained, klein4, tmp_path):
    from diffusers import Flux2KleinPipeline
    from peft.tuners.lora import LoraLayer

    from flux2_lora_pack.trainer.__main__ import main

    adapted, expected, _, path = trained
    converted = tmp_path / "klein4_diffusers.safetensors"
    assert main(["convert-lora", "--to", "diffusers", str(path), str(converted)]) == 0
    pipe = Flux2KleinPipeline.from_pretrained(klein4)
    pipe.set_progress_bar_config(disable=True)
    render = dict(prompt="a red cube", height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=4.0,
                  output_type="pt")
    before = pipe(**render, generator=torch.Generator().manual_seed(0)).images
    every = set(lora_target_modules(pipe.transformer, preset="all"))
    assert len(every) == 12 * 5 + 2 * 20  # klein-4b's blocks: 12 linears per double block, 2 per single block
    pipe.load_lora_weights(converted)
    loaded = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert loaded == adapted_module_names(adapted) == every
    with torch.no_grad():
        out = pipe.transformer(**_inputs())[0]
    assert_close(out, expected, rtol=1e-5, atol=1e-5)  # alpha / rank kept: the trained scale, not 1
    after = pipe(**render, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- Apply LoRA


@pytest.fixture
def nodes(pack, comfy_root):
    train_nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    yield train_nodes, model_nodes, inference
    inference.release_all()


def test_train_on_base_preview_on_distilled(nodes, trained, klein4_distilled, tmp_path):
    """Apply LoRA puts a klein-4b base LoRA on the distilled klein-4b; FLUX.2 Sample (4 steps, no CFG) renders
    what Flux2KleinPipeline renders with the converted file on the same distilled model."""
    from diffusers import Flux2KleinPipeline

    from flux2_lora_pack.trainer import flux2, sampling
    from flux2_lora_pack.trainer.lora_keys import convert_lora_file

    train_nodes, model_nodes, inference = nodes
    *_, path = trained
    distilled = inference.Flux2ModelSpec(folder=inspect_model_folder(klein4_distilled), precision="fp32")
    assert distilled.folder.is_distilled and distilled.folder.flavour == "klein-4b"
    with_lora, native = train_nodes.Flux2ApplyLora().apply(distilled, train_nodes.TrainedLora(path=str(path)), 1.0)
    assert native is None and distilled.loras == () and len(with_lora.loras) == 1  # the input is not changed

    pipe = Flux2KleinPipeline.from_pretrained(klein4_distilled)
    pipe.set_progress_bar_config(disable=True)
    embeds = flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a red cube"], flavour="klein-4b")
    sample = model_nodes.Flux2Sample()
    (plain,) = sample.sample(distilled, [[embeds, {}]], WIDTH, HEIGHT, 4, 1.0, 3)
    (ours,) = sample.sample(with_lora, [[embeds, {}]], WIDTH, HEIGHT, 4, 1.0, 3)
    pipe.load_lora_weights(convert_lora_file(path, tmp_path / "d.safetensors", to="diffusers"))
    noise = sampling.initial_noise(batch_size=1, height_px=HEIGHT, width_px=WIDTH, seed=3)
    expected = pipe(prompt_embeds=embeds, latents=noise, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                    output_type="pt").images.permute(0, 2, 3, 1)
    assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3


def _dev_lora(tiny_model_dir: Path, path: Path) -> Path:
    from diffusers import Flux2Transformer2DModel

    dev = Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    apply_lora(dev, preset="all", rank=RANK, alpha=ALPHA)
    return _save_as_trainer(path, dev, flavour="dev")


@pytest.mark.parametrize(("lora_of", "model_of", "names"), [
    ("klein-4b", "klein-9b", r"FLUX.2 \[klein\] 4B \(model_flavour 'klein-4b'\), but this model is FLUX.2 \[klein\] 9B "
                             r"\(base; .*\) \(model_flavour 'klein-9b'\)"),
    ("dev", "klein-4b", r"FLUX.2 \[dev\] \(model_flavour 'dev'\), but this model is FLUX.2 \[klein\] 4B \(base; .*"
                        r"\(model_flavour 'klein-4b'\)"),
    ("klein-4b", "dev", r"FLUX.2 \[klein\] 4B \(model_flavour 'klein-4b'\), but this model is FLUX.2 \[dev\] \(.*\) "
                        r"\(model_flavour 'dev'\)"),
])
def test_apply_lora_refuses_another_size_naming_both_flavours(nodes, trained, klein4, klein9, tiny_model_dir,
                                                              tmp_path, lora_of, model_of, names):
    train_nodes, _, inference = nodes
    path = trained[-1] if lora_of == "klein-4b" else _dev_lora(tiny_model_dir, tmp_path / "dev.safetensors")
    folder = {"klein-4b": klein4, "klein-9b": klein9, "dev": tiny_model_dir}[model_of]
    model = inference.Flux2ModelSpec(folder=inspect_model_folder(folder), precision="fp32")
    with pytest.raises(ValueError, match=rf"^Apply LoRA: '{path.name}' was trained on {names}\. A LoRA fits only the "
                                         r"FLUX.2 size it was trained on; base and distilled of one size share LoRAs"):
        train_nodes.Flux2ApplyLora().apply(model, train_nodes.TrainedLora(path=str(path)), 1.0)


def test_a_lora_without_flavour_header_is_refused_by_shape_naming_the_model(nodes, klein4, klein9, tmp_path):
    """A klein-9b LoRA from elsewhere (no header) on klein-4b: klein-9b's blocks beyond 4b's 5 + 20 do not exist there
    (the first in sorted order is named)."""
    from diffusers import Flux2Transformer2DModel

    train_nodes, _, inference = nodes
    nine = Flux2Transformer2DModel.from_pretrained(klein9 / "transformer")
    apply_lora(nine, preset="tiny", rank=RANK, alpha=ALPHA)
    comfy = diffusers_to_comfy(lora_state_dict(nine), alpha=ALPHA, rank=RANK, hidden_size=128)
    path = save_lora_file(tmp_path / "foreign.safetensors", state=comfy, metadata={}, layout="comfyui")
    model = inference.Flux2ModelSpec(folder=inspect_model_folder(klein4), precision="fp32")
    with pytest.raises(ValueError, match=r"^LoRA file 'foreign.safetensors' adapts 'single_transformer_blocks.20.attn.to_qkv_mlp_proj', "
                                         r"which this FLUX.2 model does not have \(it has 5 double and 20 single "
                                         r"blocks: FLUX.2 \[klein\] 4B\)"):
        train_nodes.Flux2ApplyLora().apply(model, train_nodes.TrainedLora(path=str(path)), 1.0)
