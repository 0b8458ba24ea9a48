"""trainer/throughput.py: the GPU table looked up by device name, the efficiency measured on an H200 and what it
predicts for the other measured steps, and the time estimate of a run (never a refusal)."""

from __future__ import annotations

import pytest
from flux2_lora_pack.trainer import flops, throughput


@pytest.mark.parametrize("device, entry", [
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"), ("NVIDIA A40", "A40"),
    ("NVIDIA RTX A6000", "RTX A6000"), ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"), ("NVIDIA GeForce RTX 5090", "GeForce RTX 5090"),
    # Other clocks or unit counts than the datasheet's, or an ambiguous name: no entry, so no estimate.
    ("NVIDIA GeForce RTX 4090 D", None), ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("NVIDIA H100", None), ("AMD Instinct MI300X", None),
])
def test_device_names_find_their_table_entry(device, entry):
    found = throughput.lookup_peak(device)
    assert (found.name if found else None) == entry


def test_every_entry_cites_its_source_and_bench_documents_it():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "bench" / "GPU_THROUGHPUT.md").read_text(encoding="utf-8")
    for gpu in throughput.GPU_PEAKS:
        assert gpu.source.startswith("NVIDIA ") and gpu.bf16_tflops > 0
        assert f"| {gpu.name} |" in doc and f"{gpu.bf16_tflops:g}" in doc, gpu.name


# bench/RESULTS.md, "Full-width FLUX.2 slice on a GPU" (NVIDIA H200, 2026-11-27): median step per variant.
MEASURED_MS = {"off": 158.5, "tread": 123.2, "ckpt": 226.8, "tread_ckpt": 178.4}


def test_efficiency_from_the_h200_step_predicts_its_tread_and_checkpointing_steps():
    from flux2_lora_pack.trainer import tread

    step = throughput.MEASURED_STEP
    assert step.seconds * 1e3 == MEASURED_MS["off"]
    assert throughput.EFFICIENCY == pytest.approx(0.412, abs=5e-4)
    shape = flops.TransformerShape.from_config(step.transformer)
    lora = flops.LoraShape.preset("all", rank=16)
    routed = ((2, 4, tread.kept_count(4096, selection_ratio=0.5)),)  # TREAD 0.5 over blocks 2..-2 of 6
    rate = throughput.lookup_peak(step.device).bf16_tflops * 1e12 * throughput.EFFICIENCY
    for variant, settings in {"tread": {"routes": routed}, "ckpt": {"checkpoint_every": 1},
                              "tread_ckpt": {"routes": routed, "checkpoint_every": 1}}.items():
        work = flops.sample_flops(shape, lora=lora, image_tokens=4096, text_tokens=512, **settings)
        assert work.total / rate * 1e3 == pytest.approx(MEASURED_MS[variant], rel=0.05), variant


def test_estimate_needs_a_listed_gpu_and_bf16():
    work = flops.Flops(forward=1e15, backward=1e15)
    h200 = throughput.estimate_time(work, device_name="NVIDIA H200", steps=100, compute_dtype="bf16",
                                    validation_flops=4e15, caveats=("communication between the 2 processes",))
    rate = 989.5e12 * throughput.EFFICIENCY
    assert h200.seconds_per_step == pytest.approx(2e15 / rate)
    assert h200.total_seconds == pytest.approx(100 * 2e15 / rate + 4e15 / rate)
    assert h200.summary().startswith("estimated time: ~4.9 s/step, ~") and "an estimate" in h200.summary()
    assert h200.summary().endswith("not counted: communication between the 2 processes")
    for device, dtype, why in [("cpu", "bf16", "training on the CPU"),
                               ("NVIDIA GeForce RTX 4090 D", "bf16", "not in bench/GPU_THROUGHPUT.md"),
                               ("NVIDIA H200", "fp32", "fp32 compute")]:
        none = throughput.estimate_time(work, device_name=device, steps=100, compute_dtype=dtype)
        assert none.seconds_per_step is None and none.total_seconds is None
        assert none.summary().startswith(f"no time estimate for {device}: ") and why in none.summary()
        assert none.short() == f"no time estimate for {device}"


def test_run_estimate_follows_the_config_and_never_refuses(tiny_model_dir, tmp_path, monkeypatch):
    from flux2_lora_pack.trainer import memory, preflight
    from flux2_lora_pack.trainer.config import TrainConfig

    monkeypatch.setattr(throughput, "visible_device_name", lambda: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(memory, "accelerator_memory_gb", lambda: None)
    (tmp_path / "backend.json").write_text("[]")  # a SimpleTuner dataset, built when the run starts
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
            "data_backend_config": str(tmp_path / "backend.json"), "max_train_steps": 10_000_000}

    def estimate(**overrides):
        return preflight.run_preflight(TrainConfig.from_dict(base | overrides), num_processes=2, enforce=True).time

    plain = estimate()
    assert plain.seconds_per_step > 0 and plain.steps == 10_000_000  # days of training: shown, not refused
    assert "the dataset's sizes (not built yet: 1024x1024 assumed)" in plain.caveats
    assert "communication between the 2 processes" in plain.caveats
    accumulated = estimate(gradient_accumulation_steps=3, train_batch_size=2)
    assert accumulated.flops_per_step.total == pytest.approx(6 * plain.flops_per_step.total)
    checkpointed = estimate(gradient_checkpointing_interval=2)
    assert checkpointed.flops_per_step.recompute > 0 and plain.flops_per_step.recompute > 0  # default: on
    assert estimate(gradient_checkpointing=False).flops_per_step.recompute == 0
    rolled = estimate(scheduled_sampling_max_step_offset=4, scheduled_sampling_probability=0.5)
    assert rolled.flops_per_step.no_grad > 0 and rolled.inputs["rollout_forwards_per_micro_batch"] > 0
    routed = estimate(tread_config={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]})
    assert routed.flops_per_step.total < plain.flops_per_step.total
    quantized = estimate(base_model_precision="int8-quanto", distributed="ddp")
    assert "int8-quanto's dequantization" in quantized.caveats
    assert estimate(mixed_precision="no").seconds_per_step is None


def test_the_estimates_count_the_interval_gradient_checkpointing_auto_picks(tiny_model_dir, tmp_path, monkeypatch):
    """The ranks resolve gradient_checkpointing_auto from their GPU's memory; the preflight's memory and time
    estimates resolve it the same way, so they count the blocks that will be checkpointed, not the written
    interval."""
    from flux2_lora_pack.trainer import memory, preflight
    from flux2_lora_pack.trainer.config import TrainConfig

    monkeypatch.setattr(throughput, "visible_device_name", lambda: "NVIDIA GeForce RTX 4090")
    (tmp_path / "backend.json").write_text("[]")
    config = TrainConfig.from_dict({
        "pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
        "data_backend_config": str(tmp_path / "backend.json"), "gradient_checkpointing": True,
        "gradient_checkpointing_interval": 1, "gradient_checkpointing_auto": True})

    def checked(device_gb):
        monkeypatch.setattr(memory, "accelerator_memory_gb", lambda: device_gb)
        return preflight.run_preflight(config, num_processes=1, enforce=False)

    roomy, tight, cpu = checked(1000.0), checked(0.5), checked(None)
    assert roomy.time.flops_per_step.recompute == 0  # the tiny model fits 1000 GB: auto checkpoints nothing
    assert tight.time.flops_per_step.recompute > 0  # nothing fits 0.5 GB: every block, as written
    assert cpu.time.flops_per_step.recompute == tight.time.flops_per_step.recompute  # no GPU: the written interval
    assert roomy.gpu_memory_gb["activations"] > tight.gpu_memory_gb["activations"]
