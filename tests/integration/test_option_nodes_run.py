"""Train LoRA with a chain of option nodes: their keys reach the run's run.json; a clash is refused before launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WIDGETS = {
    "max_train_steps": 4, "learning_rate": 1e-3, "lora_rank": 4, "lora_alpha": 2.0, "flux_lora_target": "all",
    "train_batch_size": 1, "gradient_accumulation_steps": 1, "mixed_precision": "no", "gradient_checkpointing": True,
    "flux_guidance_value": 1.0, "caption_dropout_probability": 0.0, "seed": 3, "checkpointing_steps": 2,
    "checkpoints_total_limit": 2, "validation_prompt": "", "validation_steps": 0, "distributed": "none",
    "output_name": "options_test", "num_processes": 1,
}


def _node(pack, node_id, options=None, **changes):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    defaults = {name: entry[1]["default"] for name, entry in cls.INPUT_TYPES()["required"].items()}
    return cls().build(options, **{**defaults, **changes})[0]


def _chain(pack):
    chain = _node(pack, "Flux2LoraMemoryOptions", gradient_checkpointing_interval=2)
    chain = _node(pack, "Flux2LoraSpeedOptions", chain, selection_ratio=0.25, start_layer_idx=0, end_layer_idx=-1)
    chain = _node(pack, "Flux2LoraScheduleOptions", chain, lr_scheduler="cosine", lr_warmup_steps=1, max_grad_norm=1.0)
    return _node(pack, "Flux2LoraValidationOptions", chain, user_prompt_library="prompts.json",
                 validation_resolution="64", validation_num_inference_steps=2, validation_guidance=3.5)


def test_train_lora_with_an_options_chain_writes_their_keys_into_run_json(pack, nodes, model_spec, dataset, comfy_root):
    (comfy_root / "input").mkdir(exist_ok=True)
    (comfy_root / "input" / "prompts.json").write_text(json.dumps({"fox": "a red fox"}))
    out = nodes.Flux2TrainLora().train(model_spec, dataset, launch="export", options=_chain(pack), **WIDGETS)
    assert out["result"][0].path == ""  # export: nothing launched
    [run_dir] = (comfy_root / "output" / "flux2_lora" / "runs").iterdir()
    config = json.loads((run_dir / "run.json").read_text())
    assert {k: config[k] for k in ("gradient_checkpointing_interval", "lr_scheduler", "lr_warmup_steps",
                                   "max_grad_norm", "validation_resolution", "validation_num_inference_steps",
                                   "validation_guidance", "user_prompt_library")} == {
        "gradient_checkpointing_interval": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "max_grad_norm": 1.0,
        "validation_resolution": "64", "validation_num_inference_steps": 2, "validation_guidance": 3.5,
        "user_prompt_library": str(comfy_root / "input" / "prompts.json")}
    assert config["tread_config"] == {"routes": [{"selection_ratio": 0.25, "start_layer_idx": 0, "end_layer_idx": -1}]}
    # Train LoRA's own widgets are still there, and the options chain is part of the run's identity.
    assert config["learning_rate"] == 1e-3 and config["max_train_steps"] == 4
    plain = nodes.Flux2TrainLora().train(model_spec, dataset, launch="export", **WIDGETS)
    assert Path(plain["result"][2].splitlines()[0].split(": ", 1)[1]).parent != run_dir


def test_an_option_key_also_in_extra_config_json_is_refused_before_launch(pack, nodes, model_spec, dataset,
                                                                         comfy_root):
    chain = _node(pack, "Flux2LoraScheduleOptions")
    with pytest.raises(ValueError, match=r"max_grad_norm is set twice: by Schedule Options \(FLUX.2\) and by "
                                         r"extra_config_json"):
        nodes.Flux2TrainLora().train(model_spec, dataset, launch="export", options=chain,
                                     extra_config_json='{"max_grad_norm": 0.5}', **WIDGETS)
    runs = comfy_root / "output" / "flux2_lora" / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_a_two_step_run_trains_with_the_options(pack, nodes, model_spec, dataset, comfy_root):
    """The chain's settings are accepted by the trainer itself: TREAD, the checkpoint interval and the schedule run."""
    from flux2_lora_pack.trainer.events import read_events

    chain = _node(pack, "Flux2LoraMemoryOptions", gradient_checkpointing_interval=2)
    chain = _node(pack, "Flux2LoraSpeedOptions", chain, selection_ratio=0.5, start_layer_idx=0, end_layer_idx=-1)
    chain = _node(pack, "Flux2LoraScheduleOptions", chain, lr_scheduler="constant_with_warmup", lr_warmup_steps=2)
    out = nodes.Flux2TrainLora().train(model_spec, dataset, launch="run", options=chain,
                                       **{**WIDGETS, "max_train_steps": 2, "checkpointing_steps": 100})
    lora, history, _ = out["result"]
    assert Path(lora.path).is_file() and len(history) == 2
    run_dir = Path(lora.path).parent
    config = json.loads((run_dir / "run.json").read_text())
    assert (config["gradient_checkpointing_interval"], config["lr_scheduler"], config["lr_warmup_steps"]) == (
        2, "constant_with_warmup", 2)
    assert config["tread_config"]["routes"] == [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]
    steps = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]
    # Two warm-up steps from Schedule Options: half of Train LoRA's learning_rate, then all of it.
    assert [(e["step"], e["lr"]) for e in steps] == [(1, pytest.approx(5e-4)), (2, pytest.approx(1e-3))]
