"""Host RAM: the estimate per process against how the model loads and against the slopes bench/load_memory.py
measured, Train LoRA's refusal when the estimate exceeds what the machine has, and the allocator setting that
gives freed tensors back to the operating system."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flux2_lora_pack.trainer.memory import (
    FLUX2_DEV_TRANSFORMER_CONFIG,
    GB,
    PROCESS_HOST_GB,
    count_transformer,
    estimate_host_memory,
    estimate_peak_memory,
)
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]

MEASURED_SLOPES = {"fsdp2": (0.52, 0.59), "none": (1.04, 1.17), "ddp": (None, 1.20), "int8": (0.50, 0.66)}
"""(while loading, while training): peak RSS per process against the transformer's bf16 bytes, measured with
`python bench/load_memory.py` on 2026-12-02 (2 CPU cores, torch 2.13.0+cpu; bench/MEMORY.md): hidden 1024,
2 double and 4 vs 16 single blocks, LoRA "all" rank 16, 2 steps. DDP's loading slope (1.18) is not compared:
its start-up broadcast copies parameters into flat buckets of up to 250 MB, which the estimate counts as one
bucket (measured: 256 and 298 MB above the built model), a constant that no slope shows."""


def _dev(**settings):
    return estimate_host_memory(FLUX2_DEV_TRANSFORMER_CONFIG, **settings)


def test_flux2_dev_host_ram_follows_how_each_mode_loads():
    bf16_bytes = count_transformer(FLUX2_DEV_TRANSFORMER_CONFIG, lora_rank=1, lora_target="all").total * 2 / GB
    assert 60 < bf16_bytes < 61  # 32.2B parameters
    process = PROCESS_HOST_GB["cuda"]
    plain, fsdp, int8 = _dev(), _dev(distributed="fsdp2", world_size=8), _dev(base_model_precision="int8-quanto")
    offload, single_file = _dev(group_offload=True), _dev(single_file=True)
    # Straight to the GPU: one tensor in transit, nothing stays on the host.
    assert plain.steady_gb == pytest.approx(process) and plain.load_gb < process + 1
    # FSDP2: each rank fills its bf16 eighth on the CPU before moving it.
    assert fsdp.load_gb == pytest.approx(process + 1.1 * (bf16_bytes / 8 + 6144 * 55296 * 2 / GB), rel=0.02)
    assert fsdp.steady_gb == pytest.approx(process)
    # int8: quantized block by block, so loading holds one bf16 block and the small rest, never the model.
    assert process + 2 < int8.load_gb < process + bf16_bytes / 6 and int8.steady_gb == pytest.approx(process)
    # Group offload keeps the blocks in host RAM while training; a single file loads whole twice first.
    assert offload.steady_gb > process + bf16_bytes and offload.load_gb > offload.steady_gb
    assert single_file.load_gb == pytest.approx(process + 1.1 * 2 * bf16_bytes, rel=0.01)
    assert "for 8 processes" in fsdp.summary(processes=8)


@pytest.mark.parametrize("mode", sorted(MEASURED_SLOPES))
def test_the_cpu_host_estimate_reproduces_the_measured_slopes(mode):
    settings = {"fsdp2": dict(distributed="fsdp2", world_size=2), "none": {},
                "ddp": dict(distributed="ddp", world_size=2), "int8": dict(base_model_precision="int8-quanto")}[mode]
    estimates, sizes = [], []
    for single in (4, 16):
        config = TRANSFORMER_CONFIG | {"num_attention_heads": 8, "num_layers": 2, "num_single_layers": single}
        device = estimate_peak_memory(config, device="cpu", lora_rank=16, resolution=(32, 32), text_tokens=16,
                                      **settings)
        estimates.append(estimate_host_memory(config, device="cpu", device_estimate=device, **settings))
        sizes.append(count_transformer(config, lora_rank=1, lora_target="all").total * 2 / GB)
    small, large = estimates
    load = (large.load_gb - small.load_gb) / (sizes[1] - sizes[0])
    training = (large.steady_gb - small.steady_gb) / (sizes[1] - sizes[0])
    measured_load, measured_training = MEASURED_SLOPES[mode]
    assert training == pytest.approx(measured_training, rel=0.1)
    if measured_load is not None:
        assert load == pytest.approx(measured_load, rel=0.1)


def test_train_lora_refuses_a_run_whose_host_ram_estimate_exceeds_what_is_available(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    from flux2_lora_pack.trainer import memory, preflight
    from flux2_lora_pack.trainer.config import TrainConfig

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    config = TrainConfig.from_dict({"pretrained_model_name_or_path": str(tiny_model_dir),
                                    "output_dir": str(tmp_path / "o"), "dataset_manifest": str(manifest)})
    monkeypatch.setattr(memory, "accelerator_memory_gb", lambda: None)  # this machine: CPU training
    summary = preflight.check_memory(config, num_processes=2, enforce=True)
    assert "GB host RAM per process" in summary and "for 2 processes" in summary
    monkeypatch.setattr(memory, "available_host_memory_gb", lambda: 0.25)
    with pytest.raises(ValueError, match=r"Train LoRA: [\d.]+ GB host RAM per process \(loading [\d.]+, training "
                                         r"[\d.]+\), [\d.]+ GB for 2 processes, more than the 0\.2 GB of host RAM "
                                         r"this machine has available now\. .*fsdp2"):
        preflight.check_memory(config, num_processes=2, enforce=True)
    assert preflight.check_memory(config, num_processes=2, enforce=False)  # export: the run goes elsewhere


def test_available_host_memory_is_read_from_the_system():
    from flux2_lora_pack.trainer.memory import available_host_memory_gb

    free = available_host_memory_gb()
    assert free is None or 0 < free < 1 << 20


def _probe(script: str, mode: str) -> int:
    """Run an allocator probe in a fresh interpreter (allocator settings are per process); its printed number."""
    out = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT), mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip())


_ALLOCATOR_PROBE = textwrap.dedent("""
    import importlib.util
    import sys

    # the module alone, by file (it imports nothing of the pack): this interpreter must not import the pack
    spec = importlib.util.spec_from_file_location("host_allocator", sys.argv[1] + "/trainer/host_allocator.py")
    host_allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_allocator)
    if sys.argv[2] == "trainer":
        assert host_allocator.return_freed_memory_to_os()
    import torch

    def rss_mb():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) // 1024 for l in fh if l.startswith("VmRSS"))

    big = torch.ones(28 << 20, dtype=torch.uint8)
    del big  # one large block freed: glibc raises its threshold to 28 MiB
    before = rss_mb()
    held, pins = [], []
    for _ in range(10):  # 200 MiB below that threshold, each followed by a small live tensor on the heap:
        held.append(torch.ones(20 << 20, dtype=torch.uint8))  # freed, they are holes glibc cannot trim away
        pins.append(torch.ones(64 << 10, dtype=torch.uint8))
    del held
    if sys.argv[2] == "trim":
        host_allocator.release_freed_memory()
    print(rss_mb() - before)
""")



@pytest.mark.skipif(not Path("/proc/self/status").is_file() or sys.platform != "linux", reason="Linux glibc only")
def test_freed_tensors_go_back_to_the_operating_system():
    def grown(allocator: str) -> int:
        return _probe(_ALLOCATOR_PROBE, allocator)

    assert grown("glibc") > 150  # glibc's adaptive threshold: the freed 200 MiB stay resident
    assert grown("trainer") < 20  # the training process's fixed threshold: returned at once
    assert grown("trim") < 20  # release_freed_memory (malloc_trim), as quantizing does after each layer


_STEP_PROBE = textwrap.dedent("""
    import ctypes
    import importlib.util
    import resource
    import sys

    spec = importlib.util.spec_from_file_location("host_allocator", sys.argv[1] + "/trainer/host_allocator.py")
    host_allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_allocator)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
    assert host_allocator.return_freed_memory_to_os()  # loading
    if sys.argv[2] == "steps":
        assert host_allocator.keep_step_tensors_on_the_heap()
    else:  # the mmap threshold alone: glibc's trim threshold stays at its 128 KiB default
        assert libc.mallopt(-3, host_allocator.STEP_MMAP_THRESHOLD_BYTES) == 1

    def step():  # an activation below the step threshold: allocated, written, freed at the top of the heap
        block = libc.malloc(4 << 20)
        ctypes.memset(block, 1, 4 << 20)
        libc.free(block)

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")



@pytest.mark.skipif(not Path("/proc/self/status").is_file() or sys.platform != "linux", reason="Linux glibc only")
def test_cpu_steps_reuse_their_freed_activations_without_page_faults():
    def faults(mode: str) -> int:
        return _probe(_STEP_PROBE, mode)

    pages = 10 * (4 << 20) // 4096  # 1024 pages per step
    assert faults("mmap-threshold-only") > pages // 2  # trimmed after each step, faulted in by the next
    assert faults("steps") < pages // 20  # keep_step_tensors_on_the_heap keeps them mapped


def test_a_user_chosen_malloc_threshold_is_left_alone(monkeypatch):
    from flux2_lora_pack.trainer.host_allocator import return_freed_memory_to_os

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory_to_os() is False


def test_a_freed_encoder_costs_a_gc_pass_only_when_it_survives_its_last_name(monkeypatch):
    """cache_fill frees the VAE and the text encoder before the next model loads. A model without reference cycles
    is gone when its last name is deleted; only one that survives gets a full gc pass (0.3-0.7 s at start-up)."""
    import gc
    import weakref

    import torch

    from flux2_lora_pack.trainer import cache_fill

    passes = []
    monkeypatch.setattr(gc, "collect", lambda *args: passes.append(args) or 0)
    model = torch.nn.Linear(4, 4)
    freed = weakref.ref(model)
    del model
    cache_fill._free_memory(freed, "cpu")
    assert freed() is None and passes == []
    model = torch.nn.Linear(4, 4)
    model.__dict__["cycle"] = model  # a reference cycle: only the collector frees it
    survivor = weakref.ref(model)
    del model
    cache_fill._free_memory(survivor, "cpu")
    assert len(passes) == 1
    monkeypatch.undo()
    gc.collect()
    assert survivor() is None
