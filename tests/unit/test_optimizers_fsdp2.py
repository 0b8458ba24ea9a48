"""The new optimizers and the LoRA EMA on FSDP2 DTensor weights (2 CPU processes, gloo): each rank steps its shard,
the gathered weights, optimizer state and EMA equal one process's, and a checkpoint round trip resumes exactly."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from process_tools import free_port  # noqa: E402

pytest.importorskip("optimi", reason="optimi-lion needs torch-optimi (requirements-test.txt)")

WORLD = 2


class Toy(torch.nn.Module):
    """Two LoRA-named linears whose rows do not split evenly over 2 ranks (6 and 5)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lora_A = torch.nn.Linear(8, 6, bias=False, dtype=dtype)
        self.lora_B = torch.nn.Linear(6, 5, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))


def _steps(model, optimizer, ema, *, first: int, count: int, dtype: torch.dtype) -> None:
    for step in range(first, first + count):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        optimizer.zero_grad(set_to_none=True)
        (model(x).float() ** 2).mean().backward()
        optimizer.step()
        ema.update(step=step + 1)


def _full(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import conftest  # noqa: F401 - imports the pack as flux2_lora_pack
    from process_tools import gloo_group

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flux2_lora_pack.trainer import checkpoint, parallelize
    from flux2_lora_pack.trainer.ema import EmaConfig, LoraEma
    from flux2_lora_pack.trainer.optimizers import OptimizerConfig, build_optimizer

    with gloo_group(rank=rank, world_size=WORLD, port=port) as env:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for name, dtype in (("adamw_bf16", torch.bfloat16), ("optimi-lion", torch.float32), ("adamw", torch.float32)):
            optim = OptimizerConfig(optimizer=name, learning_rate=1e-2)
            settings = EmaConfig(enabled=True, decay=0.9)

            def build(sharded: bool):
                model = Toy(dtype)
                if sharded:
                    fully_shard(model.lora_A, mesh=mesh)
                    fully_shard(model.lora_B, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                holder = SimpleNamespace(module=model, inner=model)
                return model, build_optimizer(holder, optim=optim), LoraEma(holder, settings=settings,
                                                                             device=torch.device("cpu"))

            ref, ref_opt, ref_ema = build(sharded=False)
            _steps(ref, ref_opt, ref_ema, first=0, count=5, dtype=dtype)
            model, opt, ema = build(sharded=True)
            _steps(model, opt, ema, first=0, count=3, dtype=dtype)
            # checkpoint as loop.save_training_checkpoint writes it, restored into fresh sharded objects
            full = parallelize.full_optimizer_state(model, opt, env=env)  # rank 0's file: every rank reads it
            lora, ema_state = parallelize.full_lora_state(model, env=env), ema.full_state(env=env)
            saved = [checkpoint.flatten_optimizer_state(full) if rank == 0 else None]
            torch.distributed.broadcast_object_list(saved, src=0)
            state = checkpoint.unflatten_optimizer_state(*saved[0])
            model, opt, ema = build(sharded=True)
            parallelize.load_full_state(model, opt, lora_state=lora, optimizer_state=state, env=env)
            ema.load_full_state(ema_state)
            _steps(model, opt, ema, first=3, count=2, dtype=dtype)
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(99)).to(dtype)
            with torch.no_grad():
                trained = model(x)
                with ema.applied(SimpleNamespace(inner=model)):
                    averaged = model(x)
                after = model(x)
                ref_trained = ref(x)
                with ref_ema.applied(SimpleNamespace(inner=ref)):
                    ref_averaged = ref(x)
            results[name] = {
                "weights": (_full(model), _full(ref)),
                "ema": (ema.full_state(env=env), ref_ema.full_state(env=env)),
                "outputs": (trained, ref_trained, averaged, ref_averaged, after),
                "state_dtypes": sorted({str(v.dtype) for s in opt.state.values() for k, v in s.items()
                                        if isinstance(v, torch.Tensor) and k != "step"}),
                "triton": opt.param_groups[0].get("triton"),
            }
        if rank == 0:
            torch.save(results, out)


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2") / "results.pt"
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", ["adamw_bf16", "optimi-lion", "adamw"])
def test_sharded_steps_resume_and_ema_equal_one_process(sharded_results, name: str) -> None:
    result = sharded_results[name]
    sharded, single = result["weights"]
    for key in single:  # sharding changes no arithmetic: the same numbers, elementwise
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=0)
    ema_sharded, ema_single = result["ema"]
    assert ema_sharded.keys() == ema_single.keys() == {"lora_A.weight", "lora_B.weight"}
    for key in ema_single:
        torch.testing.assert_close(ema_sharded[key], ema_single[key], rtol=0, atol=0)
        assert ema_single[key].dtype == torch.float32
    trained, ref_trained, averaged, ref_averaged, after = result["outputs"]
    torch.testing.assert_close(trained, ref_trained, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(averaged, ref_averaged, rtol=1e-6, atol=1e-6)
    assert not torch.equal(averaged, trained)  # the EMA is another set of weights ...
    torch.testing.assert_close(after, trained, rtol=0, atol=0)  # ... and the trained ones come back (resharded)


def test_adamw_bf16_state_keeps_fp32_moments_after_resume(sharded_results) -> None:
    assert sharded_results["adamw_bf16"]["state_dtypes"] == ["torch.bfloat16", "torch.float32"]


def test_optimi_lion_steps_dtensor_shards_without_its_triton_kernels(sharded_results) -> None:
    assert sharded_results["optimi-lion"]["triton"] is False  # Triton kernels take plain tensors, not DTensors
