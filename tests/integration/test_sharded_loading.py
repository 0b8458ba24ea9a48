"""FSDP2 loads each rank's shard straight from the safetensors files (no rank holds the whole transformer), with
the frozen base stored in bf16 under bf16 mixed precision: the same loss, LoRA and gradients as loading it whole
in fp32 and sharding that (the path before), on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _probe(model_dir: Path, precision: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "tests" / "integration" / "sharded_load_probe.py"), str(model_dir), precision, str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


@pytest.mark.parametrize(("precision", "base_dtype", "tolerance"), [("no", "torch.float32", 0.0),
                                                                   ("bf16", "torch.bfloat16", 0.0)])
def test_sharded_loading_matches_loading_whole_then_sharding(tiny_model_dir, tmp_path, precision, base_dtype,
                                                             tolerance):
    ranks = _probe(tiny_model_dir, precision, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["base_dtypes"] == [base_dtype] and r["lora_dtypes"] == ["torch.float32"]
        assert 0.45 < r["local_base_fraction"] < 0.55  # each rank holds about half of the frozen weights
        assert r["same_names"]
        assert r["max_lora_diff"] == 0.0  # the same initial adapter, bit for bit
        new, old = r["loss"]
        assert abs(new - old) <= tolerance * max(1.0, abs(old)), r
        assert r["max_grad_diff"] <= tolerance, r
