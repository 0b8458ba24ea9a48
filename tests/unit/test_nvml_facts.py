"""GPU facts from NVML (trainer/nvml_facts.py): the warm trainer's imports leave CUDA untouched on a GPU machine.

This machine has no GPU, so a fresh interpreter plays a CUDA build of torch: the two calls that initialise the CUDA
driver (cudaGetDeviceCount and torch.cuda's lazy init) are replaced by recorders, and the warm worker's real imports
run over them. Without the NVML answers those imports initialise CUDA (torchao's module-level capability checks),
which would make the worker refuse every fork; with them, nothing is initialised.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from flux2_lora_pack.trainer import nvml_facts
from flux2_lora_pack.trainer.launch import PACK_ROOT, trainer_env

_CUDA_BUILD_PROBE = textwrap.dedent("""
    import importlib, json, sys, traceback
    import torch, torch.cuda

    initialised = []

    def recorder(name, result=None, error=None):
        def call(*args, **kwargs):
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            initialised.append(f"{name} from {caller.filename.rsplit('site-packages/', 1)[-1]}:{caller.lineno}")
            if error:
                raise RuntimeError(error)
            return result
        return call

    # a CUDA build of torch with one GPU, as far as Python code can tell
    torch.cuda._is_compiled = lambda: True
    torch.version.cuda = "12.8"
    torch._C._cuda_getDeviceCount = recorder("cudaGetDeviceCount", 1)
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    torch.cuda._lazy_init = recorder("CUDA init", error="CUDA initialised")

    # the pack's trainer package as a cold trainer imports it (python -m trainer), named by the test
    nvml_facts, warm_worker = (importlib.import_module(f"{sys.argv[2]}.{name}") for name in ("nvml_facts", "warm_worker"))
    if sys.argv[1] == "nvml":  # what NVML says of one H100 (read_gpu_facts itself is tested below)
        warm_worker.read_gpu_facts = lambda: nvml_facts.GpuFacts(count=1, capability=(9, 0))
    try:
        warm_worker._preload()
    except Exception:  # an import that needed the (refused) CUDA init
        initialised.append("the imports failed")
    print(json.dumps({"initialised": initialised,
                      "restored": torch.cuda.get_device_capability.__module__ == "torch.cuda"}))
""")


def _imports_on_a_cuda_build(answers: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CUDA_BUILD_PROBE, answers, "trainer"], cwd=PACK_ROOT, env=trainer_env(),
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_warm_workers_imports_leave_cuda_uninitialised_on_a_gpu_machine():
    plain = _imports_on_a_cuda_build("cuda")
    assert any(call.startswith("CUDA init from torchao/") for call in plain["initialised"]), plain
    answered = _imports_on_a_cuda_build("nvml")
    assert answered == {"initialised": [], "restored": True}


class _FakeNvml:
    """libnvidia-ml's five calls used by nvml_facts, over a list of device capabilities."""

    def __init__(self, capabilities: list[tuple[int, int]], *, init_status: int = 0) -> None:
        self.capabilities, self.init_status, self.shut_down = capabilities, init_status, False

    def nvmlInit_v2(self) -> int:
        return self.init_status

    def nvmlShutdown(self) -> int:
        self.shut_down = True
        return 0

    def nvmlDeviceGetCount_v2(self, count) -> int:
        count._obj.value = len(self.capabilities)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: int, handle) -> int:
        handle._obj.value = index + 1
        return 0

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor) -> int:
        major._obj.value, minor._obj.value = self.capabilities[handle.value - 1]
        return 0


def _facts_with(monkeypatch, nvml: _FakeNvml, *, visible: int):
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: visible)
    monkeypatch.setattr(nvml_facts, "_open_nvml", lambda: nvml)
    return nvml_facts.read_gpu_facts()


def test_gpu_facts_are_read_only_when_every_gpu_agrees(monkeypatch):
    same = _FakeNvml([(9, 0), (9, 0), (9, 0), (9, 0)])
    assert _facts_with(monkeypatch, same, visible=2) == nvml_facts.GpuFacts(count=2, capability=(9, 0))
    assert same.shut_down
    assert _facts_with(monkeypatch, _FakeNvml([(9, 0), (8, 9)]), visible=2) is None  # device 0 would be ambiguous
    assert _facts_with(monkeypatch, _FakeNvml([(9, 0)], init_status=9), visible=1) is None  # NVML failed
    assert _facts_with(monkeypatch, _FakeNvml([(9, 0)]), visible=-1) is None  # MIG or unparsable visible devices
    assert _facts_with(monkeypatch, _FakeNvml([(9, 0)]), visible=0) == nvml_facts.GpuFacts(count=0, capability=(0, 0))


def test_gpu_facts_are_none_on_a_cpu_build():
    if torch.cuda._is_compiled():
        pytest.skip("a CUDA build of torch")
    assert nvml_facts.read_gpu_facts() is None


def test_answers_hold_only_inside_the_block():
    before = (torch.cuda.is_available, torch.cuda.device_count, torch.cuda.get_device_capability)
    with nvml_facts.answered_from_nvml(None):
        assert (torch.cuda.is_available, torch.cuda.device_count, torch.cuda.get_device_capability) == before
    with pytest.raises(KeyError):
        with nvml_facts.answered_from_nvml(nvml_facts.GpuFacts(count=2, capability=(8, 9))):
            assert torch.cuda.is_available() and torch.cuda.device_count() == 2
            assert torch.cuda.get_device_capability(1) == (8, 9)
            raise KeyError("an import failed")
    assert (torch.cuda.is_available, torch.cuda.device_count, torch.cuda.get_device_capability) == before
