"""LoRA key conversion and files: exact q/k/v fusion, round trips, diffusers loading, metadata, bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import copy
import importlib
import json

import pytest
import torch

from flux2_lora_pack.trainer.lora import apply_lora, lora_state_dict
from flux2_lora_pack.trainer.lora_keys import (

    LORA_ADAPTER_METADATA_KEY,
    apply_lora_to_comfy_state,
    bfl_module_to_diffusers,
    comfy_to_diffusers,
    convert_lora_file,
    diffusers_lora_delta,
    diffusers_module_to_bfl,
    diffusers_to_comfy,
    load_lora_file,
    load_lora_for_diffusers,
    lora_delta,
    lora_metadata,
    save_lora_file,
    save_trained_lora,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import tiny_inputs  # noqa: E402

H = 256  # tiny model hidden size (2 heads x 128)
RANK, ALPHA = 4, 2.0  # alpha != rank on purpose: scale 0.5


# ---------------------------------------------------------------------------------------------
# helpers


def _inputs() -> dict:
    return {**tiny_inputs(batch=1, h=4, w=4, text=8, reference=False), "return_dict": False}


def _randomize_b(transformer: torch.nn.Module, *, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero B so that the LoRA delta is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


def _meta(**overrides) -> dict[str, str]:
    values = {
        "rank": RANK,
        "alpha": ALPHA,
        "targets": "all",
        "base_model": "tiny-flux2",
        "steps": 7,
        "dataset_fingerprint": "sha256:ab12",
    }
    return lora_metadata(**(values | overrides))


def _bfl_view(diffusers_weights: dict[str, torch.Tensor], bfl: str) -> torch.Tensor:
    """A BFL-layout weight built from diffusers module weights (q, k, v rows stacked; norm_out halves swapped)."""
    names = bfl_module_to_diffusers(bfl)
    if len(names) == 3:
        return torch.cat([diffusers_weights[n] for n in names], dim=0)
    w = diffusers_weights[names[0]]
    if names[0] == "norm_out.linear":
        scale, shift = w.chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0)
    return w


def _module_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = module.get_base_layer().weight.detach().clone()
        elif isinstance(module, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            out[name] = module.weight.detach().clone()
    return out


def _pipeline(model_dir):
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer

    pipe = Flux2Pipeline.from_pretrained(model_dir, tokenizer=None)
    pipe.register_modules(tokenizer=AutoTokenizer.from_pretrained(model_dir / "tokenizer"))
    return pipe


@pytest.fixture(scope="module")
def base_transformer(tiny_model_dir):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()


@pytest.fixture(scope="module")
def trained(base_transformer):
    """An 'all'-preset adapter (rank 4, alpha 2) with random non-zero B, and its output on fixed inputs."""
    transformer = copy.deepcopy(base_transformer)
    apply_lora(transformer, preset="all", rank=RANK, alpha=ALPHA)
    _randomize_b(transformer)
    x = _inputs()
    with torch.no_grad():
        out = transformer(**x)[0]
        base_out = base_transformer(**x)[0]
    assert (out - base_out).abs().max() > 1e-2  # the adapter really changes the output
    return transformer, lora_state_dict(transformer), out


# ---------------------------------------------------------------------------------------------
# name map and exact fusion (no model)


@pytest.mark.parametrize(
    ("diffusers", "bfl", "slot"),
    [
        ("transformer_blocks.3.attn.to_q", "double_blocks.3.img_attn.qkv", 0),
        ("transformer_blocks.3.attn.to_k", "double_blocks.3.img_attn.qkv", 1),
        ("transformer_blocks.3.attn.to_v", "double_blocks.3.img_attn.qkv", 2),
        ("transformer_blocks.0.attn.add_q_proj", "double_blocks.0.txt_attn.qkv", 0),
        ("transformer_blocks.0.attn.add_k_proj", "double_blocks.0.txt_attn.qkv", 1),
        ("transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", 2),
        ("transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj", None),
        ("transformer_blocks.1.attn.to_add_out", "double_blocks.1.txt_attn.proj", None),
        ("transformer_blocks.1.ff.linear_in", "double_blocks.1.img_mlp.0", None),
        ("transformer_blocks.1.ff.linear_out", "double_blocks.1.img_mlp.2", None),
        ("transformer_blocks.1.ff_context.linear_in", "double_blocks.1.txt_mlp.0", None),
        ("transformer_blocks.1.ff_context.linear_out", "double_blocks.1.txt_mlp.2", None),
        ("single_transformer_blocks.47.attn.to_qkv_mlp_proj", "single_blocks.47.linear1", None),
        ("single_transformer_blocks.47.attn.to_out", "single_blocks.47.linear2", None),
        ("x_embedder", "img_in", None),
        ("context_embedder", "txt_in", None),
        ("proj_out", "final_layer.linear", None),
        ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
        ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer", None),
        ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None),
        ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
        ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin", None),
        ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin", None),
        ("single_stream_modulation.linear", "single_stream_modulation.lin", None),
        ("norm_out.linear", "final_layer.adaLN_modulation.1", None),
    ],
)
def test_name_map_matches_the_design_table(diffusers, bfl, slot):
    assert diffusers_module_to_bfl(diffusers) == (bfl, slot)
    assert diffusers in bfl_module_to_diffusers(bfl)


def test_every_linear_of_the_tiny_model_has_a_bfl_name(base_transformer):
    linears = [n for n, m in base_transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 41
    for name in linears:
        bfl, _ = diffusers_module_to_bfl(name)
        assert name in bfl_module_to_diffusers(bfl)


def _adapter(out_f: int, in_f: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def _qkv_state(names=("to_q", "to_k", "to_v"), *, h=8, in_f=5, rank=RANK) -> dict[str, torch.Tensor]:
    state = {}
    for i, name in enumerate(names):
        a, b = _adapter(h, in_f, rank, seed=i)
        state[f"transformer_blocks.0.attn.{name}.lora_A.weight"] = a
        state[f"transformer_blocks.0.attn.{name}.lora_B.weight"] = b
    return state


def test_qkv_fusion_is_exact_block_diagonal_with_three_times_alpha():
    state = _qkv_state()
    comfy = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=8)
    prefix = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert set(comfy) == {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", f"{prefix}.alpha"}
    a, b = comfy[f"{prefix}.lora_A.weight"], comfy[f"{prefix}.lora_B.weight"]
    assert a.shape == (3 * RANK, 5) and b.shape == (3 * 8, 3 * RANK)
    assert comfy[f"{prefix}.alpha"].item() == 3 * ALPHA and comfy[f"{prefix}.alpha"].shape == ()
    names = ("to_q", "to_k", "to_v")
    assert torch.equal(a, torch.cat([state[f"transformer_blocks.0.attn.{n}.lora_A.weight"] for n in names]))
    assert torch.equal(b, torch.block_diag(*[state[f"transformer_blocks.0.attn.{n}.lora_B.weight"] for n in names]))
    expected = torch.cat(
        [
            (ALPHA / RANK)
            * state[f"transformer_blocks.0.attn.{n}.lora_B.weight"]
            @ state[f"transformer_blocks.0.attn.{n}.lora_A.weight"]
            for n in names
        ]
    )
    torch.testing.assert_close(lora_delta(comfy, "double_blocks.0.img_attn.qkv"), expected, rtol=1e-6, atol=1e-6)


def test_partial_qkv_is_filled_with_zero_blocks():
    state = _qkv_state(("add_q_proj", "add_v_proj"))
    comfy = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=8)
    delta = lora_delta(comfy, "diffusion_model.double_blocks.0.txt_attn.qkv")
    assert delta.shape == (24, 5)
    assert comfy["diffusion_model.double_blocks.0.txt_attn.qkv.alpha"].item() == 3 * ALPHA
    for i, name in ((0, "add_q_proj"), (2, "add_v_proj")):
        a = state[f"transformer_blocks.0.attn.{name}.lora_A.weight"]
        b = state[f"transformer_blocks.0.attn.{name}.lora_B.weight"]
        torch.testing.assert_close(delta[i * 8 : (i + 1) * 8], (ALPHA / RANK) * b @ a, rtol=1e-6, atol=1e-6)
    assert not delta[8:16].any()


def test_norm_out_halves_are_swapped():
    a, b = _adapter(2 * 8, 8, RANK, seed=3)
    comfy = diffusers_to_comfy(
        {"norm_out.linear.lora_A.weight": a, "norm_out.linear.lora_B.weight": b}, alpha=ALPHA, rank=RANK, hidden_size=8
    )
    delta = lora_delta(comfy, "final_layer.adaLN_modulation.1")
    scale, shift = ((ALPHA / RANK) * b @ a).chunk(2)
    torch.testing.assert_close(delta, torch.cat([shift, scale]), rtol=1e-6, atol=1e-6)
    back, _ = comfy_to_diffusers(comfy)
    assert torch.equal(back["transformer.norm_out.linear.lora_B.weight"], b)


@pytest.mark.parametrize(
    "key",
    [
        "transformer_blocks.0.attn.norm_q.lora_A.weight",  # not a Linear we map
        "transformer_blocks.0.norm1.linear.lora_A.weight",  # FLUX.1 per-block modulation
        "transformer_blocks.0.attn.to_q.lora_down.weight",  # kohya suffix
        "transformer_blocks.0.attn.to_q.lora_B.bias",
    ],
)
def test_unknown_diffusers_key_is_named(key):
    state = _qkv_state() | {key: torch.zeros(4, 5)}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=8)


def test_wrong_rank_or_hidden_size_is_refused():
    with pytest.raises(ValueError, match="has rank 4 but the adapter config says 8"):
        diffusers_to_comfy(_qkv_state(), alpha=ALPHA, rank=8, hidden_size=8)
    with pytest.raises(ValueError, match="do not fit hidden_size=16"):
        diffusers_to_comfy(_qkv_state(), alpha=ALPHA, rank=RANK, hidden_size=16)


# ---------------------------------------------------------------------------------------------
# round trips


def test_diffusers_comfy_diffusers_is_bitwise(trained):
    _, state, _ = trained
    comfy = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=H)
    back, config = comfy_to_diffusers(comfy, hidden_size=H)
    assert back.keys() == {f"transformer.{k}" for k in state}
    for key, value in state.items():
        assert torch.equal(back[f"transformer.{key}"], value), key
    # Block-diagonal B is split back into rank-r blocks with alpha / 3: uniform config.
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert set(config["target_modules"]) == {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}


def test_comfy_diffusers_comfy_is_bitwise(trained):
    _, state, _ = trained
    comfy = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=H)
    back, config = comfy_to_diffusers(comfy)
    again = diffusers_to_comfy(
        back,
        alpha=config["lora_alpha"],
        rank=config["r"],
        hidden_size=H,
        alpha_pattern=config["alpha_pattern"],
        rank_pattern=config["rank_pattern"],
    )
    assert again.keys() == comfy.keys()
    for key, value in comfy.items():
        assert torch.equal(again[key], value), key


def test_foreign_fused_qkv_splits_exactly_at_full_rank():
    """A fused adapter that is not block-diagonal: q/k/v each get the full A (rank 3r) and a row slice of B."""
    a, b = _adapter(3 * 8, 8, 6, seed=5)
    comfy = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": a,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": b,
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(3.0),
        "diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.randn(2, 8),
        "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.randn(8, 2),
        "diffusion_model.single_blocks.0.linear2.alpha": torch.tensor(1.0),
    }
    back, config = comfy_to_diffusers(comfy, hidden_size=8)
    fused = lora_delta(comfy, "double_blocks.0.img_attn.qkv")
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        module = f"transformer_blocks.0.attn.{name}"
        assert back[f"transformer.{module}.lora_A.weight"].shape == (6, 8)
        torch.testing.assert_close(
            diffusers_lora_delta(back, module, adapter_config=config), fused[i * 8 : (i + 1) * 8], rtol=1e-6, atol=1e-6
        )
    assert config["r"] == 6 and config["lora_alpha"] == 3.0
    assert config["rank_pattern"] == {r"^single_transformer_blocks\.0\.attn\.to_out": 2}
    assert config["alpha_pattern"] == {r"^single_transformer_blocks\.0\.attn\.to_out": 1.0}
    # Back to ComfyUI: the shared A is recognised, so the fused adapter is restored bitwise.
    again = diffusers_to_comfy(
        back,
        alpha=config["lora_alpha"],
        rank=config["r"],
        hidden_size=8,
        alpha_pattern=config["alpha_pattern"],
        rank_pattern=config["rank_pattern"],
    )
    for key, value in comfy.items():
        assert torch.equal(again[key], value), key


# ---------------------------------------------------------------------------------------------
# files against the real loaders


def test_diffusers_file_loads_in_flux2_pipeline_with_the_same_output(tiny_model_dir, trained, tmp_path):
    _, state, expected = trained
    path = save_lora_file(tmp_path / "lora.safetensors", state=state, metadata=_meta(), layout="diffusers")
    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(path)
    with torch.no_grad():
        out = pipe.transformer(**_inputs())[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    # Without the adapter metadata diffusers silently uses scale 1: the metadata is what makes it right.
    plain = tmp_path / "no_meta.safetensors"
    from safetensors.torch import save_file

    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(plain))
    pipe2 = _pipeline(tiny_model_dir)
    pipe2.load_lora_weights(plain)
    with torch.no_grad():
        wrong = pipe2.transformer(**_inputs())[0]
    assert (wrong - expected).abs().max() > 1e-3


def test_comfy_file_applied_to_bfl_weights_equals_the_merged_model(trained, tmp_path):
    transformer, state, _ = trained
    path = save_lora_file(
        tmp_path / "lora.safetensors",
        state=diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=H),
        metadata=_meta(),
        layout="comfyui",
    )
    loaded, _, layout = load_lora_file(path)
    assert layout == "comfyui"
    base = _module_weights(transformer)
    merged_model = copy.deepcopy(transformer)
    from peft.tuners.lora import LoraLayer

    for module in merged_model.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # PEFT's own W + scale * B @ A
    merged = _module_weights(merged_model)

    bfl_modules = sorted(
        {k[len("diffusion_model.") : -len(".lora_A.weight")] for k in loaded if k.endswith(".lora_A.weight")}
    )
    assert len(bfl_modules) == 2 * 8 + 3 * 2  # q/k/v fused: 8 BFL modules per double block
    bfl_base = {f"diffusion_model.{m}.weight": _bfl_view(base, m) for m in bfl_modules}
    patched = apply_lora_to_comfy_state(bfl_base, loaded, strength=1.0)
    for m in bfl_modules:
        expected = _bfl_view(merged, m)
        torch.testing.assert_close(
            bfl_base[f"diffusion_model.{m}.weight"] + lora_delta(loaded, m), expected, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(patched[f"diffusion_model.{m}.weight"], expected, rtol=1e-5, atol=1e-6)


def test_converted_foreign_comfy_file_loads_in_diffusers_exactly(tiny_model_dir, base_transformer, tmp_path):
    """Mixed ranks and a non-block-diagonal qkv: rank_pattern/alpha_pattern must reach diffusers intact."""
    g = torch.Generator().manual_seed(9)
    comfy = {}
    for module, (out_f, in_f, rank, alpha) in {
        "double_blocks.1.txt_attn.qkv": (3 * H, H, 6, 3.0),
        "double_blocks.0.img_mlp.2": (H, 3 * H, 4, 8.0),
        "single_blocks.2.linear1": (9 * H, H, 2, 1.0),
        "final_layer.adaLN_modulation.1": (2 * H, H, 4, 2.0),
    }.items():
        comfy[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
        comfy[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        comfy[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    src = save_lora_file(tmp_path / "foreign.safetensors", state=comfy, metadata={}, layout="comfyui")
    dst = convert_lora_file(src, tmp_path / "foreign_diffusers.safetensors", to="diffusers")

    # Expected: base weights plus the ComfyUI deltas mapped back to diffusers rows by hand.
    expected_model = copy.deepcopy(base_transformer)
    with torch.no_grad():
        for key in comfy:
            if not key.endswith(".lora_A.weight"):
                continue
            bfl = key[len("diffusion_model.") : -len(".lora_A.weight")]
            delta = lora_delta(comfy, bfl)
            names = bfl_module_to_diffusers(bfl)
            pieces = delta.chunk(3) if len(names) == 3 else [delta]
            if names == ["norm_out.linear"]:
                shift, scale = delta.chunk(2)
                pieces = [torch.cat([scale, shift])]
            for name, piece in zip(names, pieces):
                expected_model.get_submodule(name).weight += piece
        expected = expected_model(**_inputs())[0]

    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(dst)
    with torch.no_grad():
        out = pipe.transformer(**_inputs())[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_trained_lora_in_either_layout_reloads_with_the_same_output(base_transformer, trained, tmp_path, layout):
    """save_trained_lora -> load_lora_for_diffusers -> load_lora_adapter reproduces the in-memory adapter."""
    _, state, expected = trained
    path = save_trained_lora(
        tmp_path / f"{layout}.safetensors",
        state=state,
        rank=RANK,
        alpha=ALPHA,
        hidden_size=H,
        layout=layout,
        metadata=_meta(),
    )
    assert load_lora_file(path)[2] == layout
    loaded_state, config = load_lora_for_diffusers(path)
    transformer = copy.deepcopy(base_transformer)
    transformer.load_lora_adapter(
        loaded_state, adapter_name="reloaded", metadata={f"transformer.{k}": v for k, v in config.items()}
    )
    with torch.no_grad():
        out = transformer(**_inputs())[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="metadata rank=8 does not match the adapter's rank=4"):
        save_trained_lora(
            tmp_path / "bad.safetensors",
            state=state,
            rank=RANK,
            alpha=ALPHA,
            hidden_size=H,
            layout=layout,
            metadata=_meta(rank=8),
        )


def test_diffusers_flux2_loader_on_our_comfy_file(tiny_model_dir, base_transformer, tmp_path):
    """What diffusers 0.42's Flux2 loader does with our ComfyUI-layout file (documented behaviour).

    It takes `diffusion_model.` keys for the ai-toolkit layout and converts them, but its converter
    does not know `.alpha` keys and raises. The same keys without `.alpha` do load, split the way
    `comfy_to_diffusers` does it (full fused A per q/k/v, B row slice), but at scale 1: right only
    when alpha == rank. Users of diffusers should take the diffusers layout (or convert-lora).
    """
    transformer = copy.deepcopy(base_transformer)
    apply_lora(transformer, preset="all", rank=RANK, alpha=float(RANK))  # scale 1
    _randomize_b(transformer, seed=4)
    with torch.no_grad():
        expected = transformer(**_inputs())[0]
    comfy = diffusers_to_comfy(lora_state_dict(transformer), alpha=float(RANK), rank=RANK, hidden_size=H)
    path = save_lora_file(
        tmp_path / "comfy.safetensors", state=comfy, metadata=_meta(alpha=float(RANK)), layout="comfyui"
    )

    with pytest.raises(ValueError, match="original_state_dict.*should be empty.*alpha"):
        _pipeline(tiny_model_dir).load_lora_weights(path)

    from safetensors.torch import save_file

    no_alpha = tmp_path / "comfy_no_alpha.safetensors"
    save_file({k: v for k, v in comfy.items() if not k.endswith(".alpha")}, str(no_alpha))
    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(no_alpha)
    with torch.no_grad():
        out = pipe.transformer(**_inputs())[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# metadata, bad files, conversion of files, CLI


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_metadata_reads_back_exactly(trained, tmp_path, layout):
    from safetensors import safe_open

    _, state, _ = trained
    meta = _meta()
    if layout == "comfyui":
        state = diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=H)
    path = save_lora_file(tmp_path / "lora.safetensors", state=state, metadata=meta, layout=layout)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    extra = {"format"} | ({LORA_ADAPTER_METADATA_KEY} if layout == "diffusers" else set())
    assert set(stored) == set(meta) | extra
    assert {k: stored[k] for k in meta} == meta
    assert json.loads(stored["rank"]) == RANK and json.loads(stored["alpha"]) == ALPHA
    assert json.loads(stored["trainer_version"]) == importlib.import_module("flux2_lora_pack.trainer").__version__
    if layout == "diffusers":
        adapter = json.loads(stored[LORA_ADAPTER_METADATA_KEY])
        assert adapter["transformer.r"] == RANK and adapter["transformer.lora_alpha"] == ALPHA
    assert not any(v.startswith('"/') for v in stored.values())  # no absolute paths unless passed
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temp file


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="only .safetensors LoRA files are loaded.*never unpickled"):
        load_lora_file(tmp_path / "lora.ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        load_lora_file(tmp_path / "missing.safetensors")

    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        },
        str(sdxl),
    )
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"):
        load_lora_file(sdxl)

    flux1 = tmp_path / "flux1.safetensors"
    save_file(
        {
            "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(4, 8),
            "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(8, 4),
        },
        str(flux1),
    )
    with pytest.raises(
        ValueError, match=r"diffusion_model\.double_blocks\.0\.img_mod\.lin\.lora_[AB]\.weight.*names no FLUX.2 module"
    ):
        load_lora_file(flux1)

    mismatched = tmp_path / "mismatched.safetensors"
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": torch.zeros(4, 8),
            "transformer.x_embedder.lora_B.weight": torch.zeros(8, 3),
        },
        str(mismatched),
    )
    with pytest.raises(ValueError, match=r"'transformer\.x_embedder' has lora_A \(4, 8\) and lora_B \(8, 3\)"):
        load_lora_file(mismatched)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora_file(garbage)


def test_convert_lora_file_round_trip_and_refusals(trained, tmp_path):
    _, state, _ = trained
    src = save_lora_file(
        tmp_path / "a.safetensors",
        state=diffusers_to_comfy(state, alpha=ALPHA, rank=RANK, hidden_size=H),
        metadata=_meta(),
        layout="comfyui",
    )
    mid = convert_lora_file(src, tmp_path / "b.safetensors", to="diffusers")
    end = convert_lora_file(mid, tmp_path / "c.safetensors", to="comfyui")
    a, meta_a, _ = load_lora_file(src)
    b, meta_b, layout_b = load_lora_file(mid)
    c, meta_c, layout_c = load_lora_file(end)
    assert (layout_b, layout_c) == ("diffusers", "comfyui")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert b.keys() == {f"transformer.{k}" for k in state} and all(
        torch.equal(b[f"transformer.{k}"], v) for k, v in state.items()
    )
    assert meta_a == meta_c and {k: meta_b[k] for k in meta_a} == meta_a

    with pytest.raises(ValueError, match="exists; choose another output path"):
        convert_lora_file(src, mid, to="diffusers")
    with pytest.raises(ValueError, match="already in the comfyui layout"):
        convert_lora_file(src, tmp_path / "d.safetensors", to="comfyui")
    with pytest.raises(ValueError, match="layout must be one of comfyui, diffusers"):
        convert_lora_file(src, tmp_path / "e.safetensors", to="kohya")


def test_cli_convert_and_inspect(trained, tmp_path, capsys):
    from flux2_lora_pack.trainer.__main__ import main

    _, state, _ = trained
    src = save_lora_file(tmp_path / "d.safetensors", state=state, metadata=_meta(), layout="diffusers")
    assert main(["convert-lora", str(src), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 0
    capsys.readouterr()
    assert main(["inspect-lora", str(tmp_path / "c.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "comfyui" and report["num_modules"] == 2 * 8 + 3 * 2
    assert report["modules"]["double_blocks.0.img_attn.qkv"] == {
        "rank": 3 * RANK,
        "alpha": 3 * ALPHA,
        "scale": ALPHA / RANK,
    }
    assert report["modules"]["single_blocks.0.linear1"] == {"rank": RANK, "alpha": ALPHA, "scale": ALPHA / RANK}
    assert report["metadata"]["rank"] == RANK and report["metadata"]["targets"] == "all"
    # User errors: one line on stderr and exit code 2.
    assert main(["convert-lora", str(src), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 2
    assert "exists" in capsys.readouterr().err


def test_diffusers_file_without_adapter_metadata_converts_at_scale_one(trained, tmp_path):
    """diffusers applies such a file with alpha = rank (scale 1); the conversion keeps that meaning."""
    from safetensors.torch import save_file

    _, state, _ = trained
    src = tmp_path / "plain.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(src))
    dst = convert_lora_file(src, tmp_path / "comfy.safetensors", to="comfyui")
    comfy, _, _ = load_lora_file(dst)
    assert comfy["diffusion_model.double_blocks.0.img_attn.qkv.alpha"].item() == 3 * RANK
    assert comfy["diffusion_model.single_blocks.0.linear1.alpha"].item() == RANK
    a = state["single_transformer_blocks.0.attn.to_out.lora_A.weight"]
    b = state["single_transformer_blocks.0.attn.to_out.lora_B.weight"]
    torch.testing.assert_close(lora_delta(comfy, "single_blocks.0.linear2"), b @ a, rtol=1e-6, atol=1e-6)
