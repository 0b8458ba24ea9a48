"""fp8-torchao composes with FSDP2 (2 CPU processes, gloo, torchao's float8 emulation): the swapped block Linears keep
plain weights that fully_shard shards and gathers as usual, the float8 cast runs on the gathered weight, and the
sharded model's output and LoRA gradients equal one process's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from process_tools import free_port  # noqa: E402

pytest.importorskip("torchao", reason="fp8-torchao needs torchao (requirements-test.txt)")

WORLD = 2


def _build():
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_pack.trainer.lora import apply_lora
    from flux2_lora_pack.trainer.lowp_compute import apply_lowp_compute
    from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG).requires_grad_(False)
    names = apply_lowp_compute(model, precision="fp8-torchao", emulate=True)
    apply_lora(model, preset="all", rank=4, alpha=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train(), names


def _run(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from block_tools import tiny_inputs

    out = model(**tiny_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    grads = {n.replace("_fsdp_wrapped_module.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import conftest  # noqa: F401 - imports the pack as flux2_lora_pack
    from process_tools import gloo_group

    from torch.distributed.tensor import DTensor

    from flux2_lora_pack.trainer import parallelize
    from flux2_lora_pack.trainer.lowp_compute import Float8ComputeLinear

    with gloo_group(rank=rank, world_size=WORLD, port=port) as env:
        reference, _ = _build()
        expected = _run(reference)
        model, names = _build()
        parallelize.apply_fsdp(model, env=env, bf16=False)
        swapped = [model.get_submodule(n).get_base_layer() for n in names]  # under its PEFT lora.Linear
        result = {
            "swapped_kept": all(isinstance(m, Float8ComputeLinear) for m in swapped),
            "weights_sharded": all(isinstance(m.weight, DTensor) for m in swapped),
            "sharded": _run(model), "single": expected,
        }
        if rank == 0:
            torch.save(result, out)


def test_fp8_under_fsdp2_equals_one_process(tmp_path):
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=False)
    assert result["swapped_kept"] and result["weights_sharded"]
    (out_sharded, grads_sharded), (out_single, grads_single) = result["sharded"], result["single"]
    torch.testing.assert_close(out_sharded, out_single, rtol=1e-5, atol=1e-5)
    assert grads_sharded.keys() == grads_single.keys() and grads_single
    for name in grads_single:
        torch.testing.assert_close(grads_sharded[name], grads_single[name], rtol=1e-4, atol=1e-6)
