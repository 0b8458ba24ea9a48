"""Loading the transformer with one copy of its weights: the plain-read safetensors reader, load_transformer
against diffusers' from_pretrained, and quantization while loading against quantizing a loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_lora_pack.trainer import model_files
from flux2_lora_pack.trainer.model_files import inspect_model_folder, load_transformer
from flux2_lora_pack.trainer.quantize import apply_quantization, load_quantized_transformer, quantized_module_names
from flux2_lora_pack.trainer.safetensors_reader import SafetensorsFile


@pytest.fixture
def tensors_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {"w_bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16), "w_f32": torch.randn(6, 3, generator=g),
               "w_i8": torch.randint(-128, 127, (4, 9), generator=g, dtype=torch.int8),
               "bias": torch.randn(11, generator=g), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_reader_reads_what_safetensors_reads_rows_and_dtype_conversion_included(tensors_file):
    path, tensors = tensors_file
    with SafetensorsFile(path) as reader, safe_open(path, framework="pt") as reference:
        assert set(reader.tensors) == set(reference.keys())
        for name, tensor in tensors.items():
            info = reader.tensors[name]
            assert (info.dtype, info.shape) == (tensor.dtype, tuple(tensor.shape))
            whole = torch.empty_like(tensor)
            reader.read_rows(name, start=0, out=whole)
            assert torch.equal(whole, reference.get_tensor(name))
        rows = torch.empty(3, 5, dtype=torch.bfloat16)
        reader.read_rows("w_bf16", start=4, out=rows)  # the last 3 rows, straight into `rows`
        assert torch.equal(rows, tensors["w_bf16"][4:])
        upcast = torch.empty(2, 5, dtype=torch.float32)
        reader.read_rows("w_bf16", start=1, out=upcast)  # through one bf16 buffer, then converted
        assert torch.equal(upcast, tensors["w_bf16"][1:3].float())
        strided = torch.empty(3, 6).t()  # not contiguous: read into a buffer, then copied
        reader.read_rows("w_f32", start=0, out=strided)
        assert torch.equal(strided, tensors["w_f32"])
        with pytest.raises(ValueError, match=r"cannot read rows 5\.\.8 of 'w_bf16' \[7, 5\]"):
            reader.read_rows("w_bf16", start=5, out=torch.empty(3, 5, dtype=torch.bfloat16))


def test_reader_refuses_a_truncated_or_foreign_file_naming_it(tensors_file, tmp_path):
    path, _ = tensors_file
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{truncated}: tensor .* does not fit its byte range or the file is "
                                         "truncated; re-download it"):
        SafetensorsFile(truncated)
    pickle_like = tmp_path / "model.safetensors"
    pickle_like.write_bytes(b"\x80\x04\x95" + bytes(64))
    with pytest.raises(ValueError, match=rf"{pickle_like} is not a safetensors file"):
        SafetensorsFile(pickle_like)
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes((5).to_bytes(8, "little") + b"{oops" + bytes(8))
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        SafetensorsFile(bad_header)


def _assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Same names, dtypes and values; quanto weights compared dequantized (int data and scales both count)."""
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key], theirs[key]
        a, b = (a.dequantize(), b.dequantize()) if hasattr(a, "dequantize") else (a, b)
        assert a.dtype == b.dtype and torch.equal(a, b), key


def _mappings_of(paths: set[str]) -> list[str]:
    """This process's memory mappings of these files (lines of /proc/self/maps)."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if line.split()[-1] in paths]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_load_transformer_equals_from_pretrained_and_maps_no_weight_file(tiny_model_dir, precision):
    from diffusers import Flux2Transformer2DModel

    folder = inspect_model_folder(tiny_model_dir)
    weights = {str(p) for p in folder.transformer_dir.glob("*.safetensors")}
    linux = Path("/proc/self/maps").is_file()
    before = _mappings_of(weights) if linux else []  # other tests' models may still map the shared tiny model
    mapped_during = []
    original = model_files.fill_from_safetensors

    def spy(model, folder, **kwargs):
        result = original(model, folder, **kwargs)
        mapped_during.append(_mappings_of(weights) if linux else [])
        return result

    model_files.fill_from_safetensors = spy
    try:
        model = load_transformer(folder, precision=precision)
    finally:
        model_files.fill_from_safetensors = original
    reference = Flux2Transformer2DModel.from_pretrained(folder.transformer_dir, torch_dtype=model_files.torch_dtype(precision))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if linux:  # the weights were read, never mapped into this process by the load
        assert mapped_during == [before]


def test_a_weight_file_that_does_not_match_the_config_is_refused_before_reading(tiny_model_dir, tmp_path):
    import shutil

    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_single_layers"] += 1  # a block the file does not hold
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the transformer weights have no tensor 'single_transformer_blocks\.\d+\."):
        load_transformer(inspect_model_folder(root))


def test_quantizing_while_loading_equals_quantizing_the_loaded_model_one_block_at_a_time(tiny_model_dir,
                                                                                        monkeypatch):
    folder = inspect_model_folder(tiny_model_dir)
    expected = load_transformer(folder, precision="bf16")
    apply_quantization(expected, precision="int8-quanto", default_dtype="bf16", quantize_via="cpu")

    read: list[str] = []
    original = SafetensorsFile.read_rows
    monkeypatch.setattr(SafetensorsFile, "read_rows",
                        lambda self, name, **kw: (read.append(name), original(self, name, **kw))[1])
    seen: list[tuple[str, list[str]]] = []
    model = load_quantized_transformer(folder, precision="int8-quanto", default_dtype="bf16", quantize_via="cpu",
                                       on_block=lambda name, block: seen.append((name, list(read))))
    blocks = [name for name, _ in seen]
    assert blocks == [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(3)]
    for i, (name, read_so_far) in enumerate(seen):
        assert any(k.startswith(name + ".") for k in read_so_far)
        # quantized before any later block was read: only one block is ever unquantized in memory
        assert not any(k.startswith(later + ".") for later in blocks[i + 1:] for k in read_so_far)
    assert quantized_module_names(model) == quantized_module_names(expected)
    _assert_same_weights(model, expected)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("via", ["cpu", "accelerator"])
def test_the_text_encoder_quantized_while_loading_equals_quantizing_the_loaded_one(tiny_model_dir, via):
    from flux2_lora_pack.trainer.model_files import load_text_encoder
    from flux2_lora_pack.trainer.quantize import (
        apply_text_encoder_quantization,
        load_quantized_text_encoder,
        text_encoder_quantization_targets,
    )

    folder = inspect_model_folder(tiny_model_dir)
    expected = load_text_encoder(folder, precision="bf16")
    apply_text_encoder_quantization(expected, precision="int8-quanto", quantize_via="cpu")
    model = load_quantized_text_encoder(folder, precision="bf16", quantization="int8-quanto", quantize_via=via)
    # exactly the decoder-layer Linears: the vision tower, projector and lm_head stay in bf16
    assert quantized_module_names(model) == set(text_encoder_quantization_targets(model)) == \
        quantized_module_names(expected)
    _assert_same_weights(model, expected)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
