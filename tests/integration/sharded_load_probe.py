"""Run under torchrun (2 CPU processes): FSDP2 built through build_model's sharded loading against the same model
loaded whole in fp32 and then sharded (the path before sharded loading), on one batch. Each rank writes its
figures to rank<N>.json in the output folder (one stdout shared by two ranks can interleave lines).

argv: model folder, mixed precision ("bf16" or "no"), output folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, before this folder's own conftest
import conftest  # noqa: E402,F401 - registers the pack as flux2_lora_pack, as in every test
from flux2_lora_pack.trainer import flux2, parallelize
from flux2_lora_pack.trainer.blocks import apply_block_forward
from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ParallelismConfig
from flux2_lora_pack.trainer.lora import apply_lora
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder, load_transformer


def whole_then_sharded(folder, *, lora: LoraConfig, bf16: bool, env: parallelize.DistEnv) -> torch.nn.Module:
    transformer = load_transformer(folder, precision="fp32", device="cpu")
    torch.manual_seed(0)
    apply_lora(transformer, preset=lora.target, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init)
    apply_block_forward(transformer, checkpoint_every=1)
    transformer.train()
    return parallelize.apply_fsdp(transformer, env=env, bf16=bf16)


def step(module: torch.nn.Module, *, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    inputs = {"hidden_states": torch.randn(1, 16, 128, generator=g),
              "encoder_hidden_states": torch.randn(1, 512, 96, generator=g),
              "timestep": torch.full((1,), 0.4), "guidance": torch.ones(1),
              "img_ids": flux2.image_position_ids(1, 4, 4), "txt_ids": flux2.text_position_ids(1, 512),
              "return_dict": False}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module(**inputs)[0].float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in module.named_parameters() if p.requires_grad}
    return float(loss), grads


def main() -> None:
    folder, precision = inspect_model_folder(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    env = parallelize.DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_rank(),
                              device=torch.device("cpu"))
    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.0, init="gaussian")  # gaussian: B stays zero, A non-trivial
    new = build_model(folder, lora=lora, memory=MemoryConfig(mixed_precision=precision),
                      parallelism=ParallelismConfig(distributed="fsdp2"), seed=0, env=env)
    old = whole_then_sharded(folder, lora=lora, bf16=precision == "bf16", env=env)
    with torch.no_grad():  # a non-zero B so that every LoRA weight gets a gradient
        for module in (new.module, old):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.to_local().fill_(0.01)
    base_dtypes = sorted({str(p.dtype) for p in new.module.parameters() if not p.requires_grad})
    lora_dtypes = sorted({str(p.dtype) for p in new.module.parameters() if p.requires_grad})
    local_base = sum(p.to_local().numel() for p in new.module.parameters() if not p.requires_grad)
    total_base = sum(p.numel() for p in new.module.parameters() if not p.requires_grad)
    new_loss, new_grads = step(new.module, autocast=False)
    old_loss, old_grads = step(old, autocast=False)
    lora_new = {n: p.full_tensor() for n, p in new.module.named_parameters() if p.requires_grad}
    lora_old = {n: p.full_tensor() for n, p in old.named_parameters() if p.requires_grad}
    (Path(sys.argv[3]) / f"rank{env.rank}.json").write_text(json.dumps({
        "rank": env.rank, "base_dtypes": base_dtypes, "lora_dtypes": lora_dtypes,
        "local_base_fraction": local_base / total_base, "loss": [new_loss, old_loss],
        "max_grad_diff": max(float((new_grads[n] - old_grads[n]).abs().max()) for n in new_grads),
        "max_lora_diff": max(float((lora_new[n] - lora_old[n]).abs().max()) for n in lora_new),
        "same_names": sorted(new_grads) == sorted(old_grads),
    }), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
