"""trainer/compile_blocks.py: regional torch.compile of the transformer blocks.

The numerical test compiles with dynamo's "aot_eager" backend (dynamo + AOTAutograd, eager kernels): the
graph capture, the autograd split and the recompiles are the ones inductor gets, in seconds instead of minutes
of C++ compilation on 2 cores. Inductor itself works on this machine (g++ is installed); bench/RESULTS.md has its
measurement.
"""

from __future__ import annotations

import pytest
import torch
from block_tools import tiny_inputs, tiny_transformer, with_block_forward
from diffusers import Flux2Transformer2DModel
from flux2_lora_pack.trainer import compile_blocks, tread
from flux2_lora_pack.trainer.compile_blocks import CompileConfig

SPANNING = tread.Route(start=1, end=3, selection_ratio=0.5)  # crosses the double/single boundary of the tiny model


@pytest.mark.parametrize(("backend", "device", "precision", "offload", "expected"), [
    ("auto", "cuda", "no_change", None, "inductor"),
    ("auto", "cpu", "no_change", None, None),
    ("auto", "cuda", "int8-quanto", None, None),
    ("auto", "cuda", "no_change", "leaf_level", None),
    ("auto", "cuda", "no_change", "block_level", "inductor"),
    ("no", "cuda", "no_change", None, None),
    ("aot_eager", "cpu", "no_change", None, "aot_eager"),
    ("inductor", "cpu", "int8-quanto", "block_level", "inductor"),
])
def test_resolve_turns_auto_on_for_cuda_only(backend, device, precision, offload, expected):
    got, why = CompileConfig(backend=backend).resolve(device=device, base_model_precision=precision,
                                                      offload_type=offload)
    assert got == expected and why


def test_an_explicit_backend_with_leaf_level_offload_is_refused():
    with pytest.raises(ValueError, match="group_offload_type 'leaf_level'"):
        CompileConfig(backend="inductor").resolve(device="cuda", offload_type="leaf_level")


def test_apply_compile_makes_one_compiled_forward_per_block_class():
    model = tiny_transformer()
    keys = list(model.state_dict())
    compiled = compile_blocks.apply_compile(model, backend="aot_eager")
    assert set(compiled) == {type(model.transformer_blocks[0]), type(model.single_transformer_blocks[0])}
    assert all(compile_blocks.is_compiled(b) for b in compile_blocks.transformer_blocks(model))
    assert type(model) is Flux2Transformer2DModel and list(model.state_dict()) == keys
    assert torch._dynamo.config.recompile_limit >= compile_blocks.RECOMPILE_LIMIT
    with pytest.raises(RuntimeError, match="before hooks"):  # twice, or after something replaced a forward
        compile_blocks.apply_compile(model, backend="aot_eager")


def _step(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    gens = [torch.Generator().manual_seed(s) for s in range(inputs["hidden_states"].shape[0])]
    out = model(**inputs, return_dict=False, tread_generators=gens)[0]
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_compiled_blocks_match_eager_with_checkpointing_and_tread_and_recompile_once_per_bucket_shape():
    """Loss and LoRA grads equal the eager model's with checkpointing (every other block) and a TREAD route, on
    two aspect buckets; the second bucket recompiles each graph once with a dynamic token count, a third none."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = with_block_forward(tiny_transformer().train(), routes=(SPANNING,), checkpoint_every=2)
    compiled = with_block_forward(tiny_transformer().train(), routes=(SPANNING,), checkpoint_every=2)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks.apply_compile(compiled, backend=counter)
    graphs = []
    for h, w in ((4, 4), (4, 6), (6, 6)):  # 16, 24, 36 image tokens
        inputs = tiny_inputs(h=h, w=w, reference=False)
        loss_a, grads_a = _step(eager, inputs)
        loss_b, grads_b = _step(compiled, inputs)
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
        assert set(grads_b) == set(grads_a)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
        graphs.append(counter.frame_count)
    # 2 block classes x (plain, routed: another processor and a per-sample rotary table) = 4 static graphs; the
    # second bucket recompiles some of them with a dynamic token count (measured: 2), a third bucket nothing.
    assert graphs[0] == 4 and graphs[0] < graphs[1] <= 2 * graphs[0] and graphs[2] == graphs[1]


def test_build_model_compiles_the_blocks_as_the_settings_resolve(tiny_model_dir, caplog):
    """auto leaves the CPU uncompiled; an explicit backend compiles every block after the block forward, with
    save_attention wired into the plan; the log says which and why."""
    from flux2_lora_pack.trainer.checkpointing import SelectiveCheckpointConfig
    from flux2_lora_pack.trainer.config import (
        LoraConfig,
        MemoryConfig,
        ParallelismConfig,
    )
    from flux2_lora_pack.trainer.model import build_model
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.parallelize import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.0, init="default", target="all")
    folder = inspect_model_folder(tiny_model_dir)
    for backend, compiled in (("auto", False), ("aot_eager", True)):
        memory = MemoryConfig(mixed_precision="no", compile=CompileConfig(backend=backend),
                              checkpointing=SelectiveCheckpointConfig(save_attention=True))
        with caplog.at_level("INFO", logger="flux2_lora_pack.trainer.model"):
            model = build_model(folder, lora=lora, memory=memory, parallelism=ParallelismConfig(distributed="none"),
                                seed=0, env=env)
        assert [compile_blocks.is_compiled(b) for b in compile_blocks.transformer_blocks(model.inner)] == [compiled] * 5
        assert model.block_forward.save_attention and model.block_forward.checkpoint_every == 1
        assert ("compiled with torch.compile backend 'aot_eager'" if compiled else "not compiled") in caplog.text
