"""TrainConfig reads SimpleTuner-style config.json files, refuses every bad or unsupported key by name,
and every choice it offers reaches the grouped settings the trainer reads."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import math
import typing
from pathlib import Path
from typing import Any, Callable

import pytest

from flux2_lora_pack.trainer import config as config_module
from flux2_lora_pack.trainer.config import (
    ALIASES,
    CHOICES,
    KNOWN_KEYS,
    UNSUPPORTED_KEYS,
    TrainConfig,
    TreadConfig,
    TreadRoute,
    parse_resolution,
)


@dataclasses.dataclass
class Paths:
    model: Path
    manifest: Path
    output: Path
    library: Path
    root: Path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    model = tmp_path / "FLUX.2-dev"
    model.mkdir()
    manifest = tmp_path / "dataset" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    library = tmp_path / "user_prompt_library.json"
    library.write_text(json.dumps({
        "portrait_subject": "a professional portrait photograph of <subject>, studio lighting, high detail",
        "cinematic_subject": "a cinematic shot of <subject>, dramatic lighting, film grain",
    }))
    return Paths(model=model, manifest=manifest, output=tmp_path / "out", library=library, root=tmp_path)


def base(p: Paths, **overrides: Any) -> dict[str, Any]:
    return {
        "pretrained_model_name_or_path": str(p.model),
        "output_dir": str(p.output),
        "dataset_manifest": str(p.manifest),
        **overrides,
    }


# --- loading, defaults, round trip -------------------------------------------------------------------


def test_minimal_config_uses_documented_defaults(paths: Paths) -> None:
    cfg = TrainConfig.from_dict(base(paths))
    assert (cfg.model_type, cfg.model_family, cfg.model_flavour) == ("lora", "flux2", "dev")
    assert cfg.lora == config_module.LoraConfig(rank=16, alpha=16.0, dropout=0.1, init="default", target="all")
    assert cfg.schedule == config_module.ScheduleConfig(scheduler="constant", warmup_steps=0, total_steps=1000)
    assert cfg.objective.guidance == config_module.GuidanceConfig(mode="constant", value=1.0, minimum=0.0, maximum=4.0)
    assert cfg.objective.shift == 3.0 and cfg.objective.auto_shift is False
    assert cfg.validation.size == (1024, 1024)
    assert cfg.validation.seed == cfg.seed == 42
    assert cfg.validation.enabled is False
    assert cfg.tread is None
    assert cfg.quantization.base_quantized is False
    assert cfg.model.root == paths.model and cfg.model.transformer_file is None
    assert cfg.checkpoint == config_module.CheckpointConfig(output_dir=paths.output, every_steps=500, total_limit=5,
                                                              resume_from=None)


def _full_config(p: Paths) -> dict[str, Any]:
    """Every key away from its default where a choice allows it."""
    transformer = p.root / "flux2-dev.safetensors"
    transformer.write_bytes(b"")
    (p.output / "checkpoint-4").mkdir(parents=True)
    return base(
        p,
        pretrained_transformer_model_name_or_path=str(transformer),
        output_name="my_lora-2",
        vae_batch_size=2, train_batch_size=3, gradient_accumulation_steps=4, caption_dropout_probability=0.25,
        lora_rank=8, lora_alpha=4.0, lora_dropout=0.0, lora_init_type="gaussian", flux_lora_target="attention",
        learning_rate=3e-5, adam_beta1=0.8, adam_beta2=0.99, adam_weight_decay=0.0, adam_epsilon=1e-6,
        max_grad_norm=0.0, lr_scheduler="cosine", lr_warmup_steps=10, max_train_steps=40, seed=7,
        flux_guidance_mode="random-range", flux_guidance_min=1.0, flux_guidance_max=5.0,
        flow_schedule_shift=1.0, flow_schedule_auto_shift=True, mixed_precision="no",
        gradient_checkpointing=True, gradient_checkpointing_interval=2,
        checkpointing_steps=2, checkpoints_total_limit=None, resume_from_checkpoint="checkpoint-4",
        validation_prompt="a photo of <subject> on a beach", user_prompt_library=str(p.library),
        validation_subject="sks dog", validation_steps=0, validation_resolution="1024x768",
        validation_num_inference_steps=8, validation_guidance=3.5, validation_seed=123,
        distributed="ddp", nan_policy="skip_batch",
        tread_config={"routes": [{"selection_ratio": 0.25, "start_layer_idx": 2, "end_layer_idx": -2}]},
        base_model_precision="int8-quanto", text_encoder_1_precision="int4-quanto", base_model_default_dtype="fp32",
        quantize_via="cpu", offload_during_startup=True,
    )


def test_json_round_trip_is_exact(paths: Paths, tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(_full_config(paths))
    as_dict = cfg.to_dict()
    assert set(as_dict) == KNOWN_KEYS
    json.dumps(as_dict, allow_nan=False)  # plain JSON types only
    assert TrainConfig.from_dict(as_dict) == cfg
    cfg.to_json(tmp_path / "run.json")
    again = TrainConfig.from_json(tmp_path / "run.json")
    assert again == cfg and hash(again) == hash(cfg)
    assert json.loads((tmp_path / "run.json").read_text())["tread_config"] == {
        "routes": [{"selection_ratio": 0.25, "start_layer_idx": 2, "end_layer_idx": -2}]
    }


def test_group_offload_round_trip(paths: Paths) -> None:
    cfg = TrainConfig.from_dict(base(
        paths, enable_group_offload=True, group_offload_type="leaf_level", group_offload_blocks_per_group=3,
        group_offload_use_stream=True, group_offload_text_encoder=True, group_offload_vae=True,
    ))
    assert cfg.offload == config_module.OffloadConfig(enabled=True, offload_type="leaf_level", blocks_per_group=3,
                                                        use_stream=True, text_encoder=True, vae=True,
                                                        during_startup=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# --- every choice reaches the settings the trainer reads ---------------------------------------------

VIEWS: dict[str, Callable[[TrainConfig], Any]] = {
    "model_type": lambda c: c.model_type,
    "model_family": lambda c: c.model_family,
    "model_flavour": lambda c: c.model.flavour,
    "lora_init_type": lambda c: c.lora.init,
    "flux_lora_target": lambda c: c.lora.target,
    "lora_type": lambda c: "lycoris" if c.lora.lycoris is not None else "standard",
    "optimizer": lambda c: c.optim.optimizer,
    "lr_scheduler": lambda c: c.schedule.scheduler,
    "flux_guidance_mode": lambda c: c.objective.guidance.mode,
    "mixed_precision": lambda c: c.memory.mixed_precision,
    "dynamo_backend": lambda c: c.memory.compile.backend,
    "distributed": lambda c: c.parallelism.distributed,
    "nan_policy": lambda c: c.nan_policy,
    "base_model_precision": lambda c: c.quantization.base_model_precision,
    "text_encoder_1_precision": lambda c: c.quantization.text_encoder_precision,
    "base_model_default_dtype": lambda c: c.quantization.base_model_default_dtype,
    "quantize_via": lambda c: c.quantization.quantize_via,
    "group_offload_type": lambda c: c.offload.offload_type,
    "reference_timestep": lambda c: c.objective.reference_timestep,
    "tracker_image_layout": lambda c: c.trackers.image_layout,
    "ema_validation": lambda c: c.ema.validation,
    "ema_device": lambda c: c.ema.device,
    "scheduled_sampling_ramp_shape": lambda c: c.objective.scheduled_sampling.ramp_shape,
    "scheduled_sampling_strategy": lambda c: c.objective.scheduled_sampling.strategy,
    "scheduled_sampling_sampler": lambda c: c.objective.scheduled_sampling.sampler,
}
def _klein_folder(flavour: str) -> Callable[[Paths], dict[str, Any]]:
    """A klein flavour is checked against its folder when the config is read: the JSON a klein folder shows."""
    def companion(p: Paths) -> dict[str, Any]:
        from flux2_lora_pack.trainer.flavours import SPECS

        folder = p.root / flavour
        (folder / "transformer").mkdir(parents=True, exist_ok=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
        double, single = SPECS[flavour].block_counts
        (folder / "transformer" / "config.json").write_text(json.dumps({"num_layers": double, "num_single_layers": single}))
        return {"pretrained_model_name_or_path": str(folder)}
    return companion


def _lycoris_file(p: Paths) -> dict[str, Any]:
    """lora_type "lycoris" reads its LyCORIS JSON when the config is read."""
    path = p.root / "lycoris_config.json"
    path.write_text(json.dumps({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16}))
    return {"lycoris_config": str(path)}


# What a choice needs beside it to be valid (quantized weights cannot be FSDP2-sharded; klein needs its folder).
COMPANIONS: dict[tuple[str, str], dict[str, Any] | Callable[[Paths], dict[str, Any]]] = {
    ("base_model_precision", "int8-quanto"): {"distributed": "ddp"},
    ("base_model_precision", "int4-quanto"): {"distributed": "ddp"},
    ("group_offload_type", "leaf_level"): {"enable_group_offload": True},
    ("model_flavour", "klein-4b"): _klein_folder("klein-4b"),
    ("model_flavour", "klein-9b"): _klein_folder("klein-9b"),
    ("lr_scheduler", "sine"): {"lr_warmup_steps": 10},  # the half-period of its wave
    ("lora_type", "lycoris"): _lycoris_file,
}


def _companion(p: Paths, key: str, choice: str) -> dict[str, Any]:
    companion = COMPANIONS.get((key, choice), {})
    return companion(p) if callable(companion) else companion


def test_every_enumeration_has_a_view() -> None:
    assert set(VIEWS) == set(CHOICES)


@pytest.mark.parametrize(("key", "choice"), [(k, c) for k, cs in CHOICES.items() for c in cs])
def test_every_choice_changes_the_resolved_config(paths: Paths, key: str, choice: str) -> None:
    cfg = TrainConfig.from_dict(base(paths, **{key: choice}, **_companion(paths, key, choice)))
    assert VIEWS[key](cfg) == choice
    for other in CHOICES[key]:
        if other != choice:
            other_cfg = TrainConfig.from_dict(base(paths, **{key: other}, **_companion(paths, key, other)))
            assert VIEWS[key](other_cfg) != VIEWS[key](cfg)


# --- key spelling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "closest"), [
    ("learning_rat", "learning_rate"),
    ("--lora_rnk", "lora_rank"),
    ("flux_guidance_maximum", "flux_guidance_max"),
    ("validation_seeds", "validation_seed"),
    ("checkpoint_total_limit", "checkpoints_total_limit"),
])
def test_unknown_key_names_the_closest_known_key(paths: Paths, key: str, closest: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown config key '{key}'; did you mean '{closest}'\?"):
        TrainConfig.from_dict(base(paths, **{key: 1}))


@pytest.mark.parametrize("key", ["webhook_config", "push_to_hub", "--hub_model_id", "num_train_epochs",
                                 "grad_clip_method", "validation_negative_prompt", "init_lora_ema", "resolution",
                                 "sdnq_use_hadamard"])
def test_simpletuner_keys_we_do_not_implement_are_refused_by_name(paths: Paths, key: str) -> None:
    with pytest.raises(ValueError, match=rf"'{key}' is a SimpleTuner .*not support"):
        TrainConfig.from_dict(base(paths, **{key: "none"}))


def test_simpletuner_keys_that_say_what_this_trainer_does_are_accepted_and_others_refused(paths: Paths) -> None:
    # the FSDP2 settings this trainer always uses are read as nothing (report_to: tests/unit/test_trackers.py)
    config = TrainConfig.from_dict(base(paths, report_to="none", fsdp_enable=True, fsdp_version=2,
                                        fsdp_reshard_after_forward=True, fsdp_state_dict_type="SHARDED_STATE_DICT"))
    assert config.parallelism.distributed == "fsdp2"
    assert TrainConfig.from_dict(base(paths, **{"--fsdp_enable": "false"})).parallelism.distributed == "ddp"
    with pytest.raises(ValueError, match=r"config key 'fsdp_version' is 1; .*only FSDP2 is implemented"):
        TrainConfig.from_dict(base(paths, fsdp_version=1))
    with pytest.raises(ValueError, match=r"'fsdp_enable' \(True\) and 'distributed' \('ddp'\) disagree"):
        TrainConfig.from_dict(base(paths, fsdp_enable=True, distributed="ddp"))


def test_subject_placeholder_without_validation_subject_is_sent_as_written_with_a_warning(paths: Paths, caplog) -> None:
    # SimpleTuner's quickstart prompt library uses <subject> and SimpleTuner fills nothing in
    config = TrainConfig.from_dict(base(paths, validation_prompt="a photo of <subject>"))
    assert config.validation.prompts() == {"validation_prompt": "a photo of <subject>"}
    assert "validation prompts contain <subject> and validation_subject is unset" in caplog.text
    replaced = TrainConfig.from_dict(base(paths, validation_prompt="a photo of <subject>", validation_subject="sks dog"))
    assert replaced.validation.prompts() == {"validation_prompt": "a photo of sks dog"}


def test_validation_settings_without_a_validation_prompt_warn_that_they_do_nothing(paths: Paths, caplog) -> None:
    TrainConfig.from_dict(base(paths, validation_resolution="1024x1024", validation_num_inference_steps=20))
    assert caplog.text.count("has no effect because there is no validation prompt") == 1  # 20 is the default
    assert "config: validation_resolution='1024x1024' has no effect because there is no validation prompt." in caplog.text


def test_unsupported_keys_are_not_known_keys() -> None:
    assert not (set(UNSUPPORTED_KEYS) & KNOWN_KEYS)
    assert not (set(ALIASES) & KNOWN_KEYS) and set(ALIASES.values()) <= KNOWN_KEYS


def test_dash_prefixed_keys_and_string_values_match_plain_ones(paths: Paths) -> None:
    plain = TrainConfig.from_dict(base(paths, learning_rate=1e-4, gradient_checkpointing=False, lora_rank=32,
                                       validation_num_inference_steps=20, flux_lora_target="mlp"))
    dashed = TrainConfig.from_dict({
        "--pretrained_model_name_or_path": str(paths.model),
        "--output_dir": str(paths.output),
        "--dataset_manifest": str(paths.manifest),
        "--learning_rate": "1e-4",
        "--gradient_checkpointing": "false",
        "--lora_rank": "32",
        "--validation_num_inference_steps": "20",
        "--flux_lora_target": "mlp",
    })
    assert dashed == plain
    assert dashed.learning_rate == 1e-4 and dashed.gradient_checkpointing is False and dashed.lora_rank == 32


def test_simpletuner_current_names_are_aliases(paths: Paths) -> None:
    cfg = TrainConfig.from_dict(base(paths, **{"--checkpoint_step_interval": 250, "validation_step_interval": 50}))
    assert (cfg.checkpointing_steps, cfg.validation_steps) == (250, 50)
    assert "checkpoint_step_interval" not in cfg.to_dict()


@pytest.mark.parametrize(("extra", "match"), [
    ({"--seed": 1, "seed": 2}, r"'--seed' and 'seed' both set seed"),
    ({"checkpointing_steps": 1, "checkpoint_step_interval": 2}, r"both set checkpointing_steps"),
])
def test_one_key_given_twice_is_refused(paths: Paths, extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(base(paths, **extra))


# --- bad values --------------------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, Callable[[Paths], dict[str, Any]], str]] = [
    ("lr-text", lambda p: {"learning_rate": "abc"}, r"learning_rate must be a number, got 'abc'"),
    ("lr-nan", lambda p: {"learning_rate": math.nan}, r"learning_rate must be a finite number"),
    ("lr-inf-string", lambda p: {"learning_rate": "inf"}, r"learning_rate must be a finite number"),
    ("lr-zero", lambda p: {"learning_rate": 0}, r"learning_rate must be > 0"),
    ("lr-negative", lambda p: {"learning_rate": -1e-4}, r"learning_rate must be > 0"),
    ("lr-null", lambda p: {"learning_rate": None}, r"learning_rate must be a number, got null; remove the key"),
    ("batch-zero", lambda p: {"train_batch_size": 0}, r"train_batch_size must be >= 1"),
    ("batch-bool", lambda p: {"train_batch_size": True}, r"train_batch_size must be a whole number, got True"),
    ("batch-fraction", lambda p: {"train_batch_size": 1.5}, r"train_batch_size must be a whole number"),
    ("accum-float-string", lambda p: {"gradient_accumulation_steps": "2.0"}, r"gradient_accumulation_steps must be a whole number"),
    ("gc-int", lambda p: {"gradient_checkpointing": 1}, r"gradient_checkpointing must be true or false"),
    ("gc-word", lambda p: {"gradient_checkpointing": "yes"}, r"gradient_checkpointing must be true or false"),
    ("gc-interval-zero", lambda p: {"gradient_checkpointing_interval": 0}, r"gradient_checkpointing_interval must be >= 1"),
    ("steps-zero", lambda p: {"max_train_steps": 0}, r"max_train_steps must be >= 1"),
    ("rank-zero", lambda p: {"lora_rank": 0}, r"lora_rank must be >= 1"),
    ("alpha-zero", lambda p: {"lora_alpha": 0}, r"lora_alpha must be > 0"),
    ("dropout-one", lambda p: {"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ("caption-dropout", lambda p: {"caption_dropout_probability": 1.5}, r"caption_dropout_probability must be in \[0, 1\]"),
    ("beta2-one", lambda p: {"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
    ("eps-zero", lambda p: {"adam_epsilon": 0.0}, r"adam_epsilon must be > 0"),
    ("grad-norm-negative", lambda p: {"max_grad_norm": -1}, r"max_grad_norm must be >= 0"),
    ("seed-negative", lambda p: {"seed": -1}, r"seed must be >= 0"),
    ("seed-too-big", lambda p: {"seed": 2**31}, r"seed must be <= 2147483647"),
    ("val-seed-text", lambda p: {"validation_seed": "x"}, r"validation_seed must be a whole number"),
    ("shift-zero", lambda p: {"flow_schedule_shift": 0}, r"flow_schedule_shift must be > 0"),
    ("res-garbage", lambda p: {"validation_resolution": "1024x"}, r"validation_resolution '1024x' is not a size"),
    ("res-megapixel", lambda p: {"validation_resolution": "1.0"}, r"validation_resolution '1.0' is not a size"),
    ("res-not-16", lambda p: {"validation_resolution": "1000"}, r"validation_resolution '1000': width 1000 must be a positive multiple of 16"),
    ("res-height-not-16", lambda p: {"validation_resolution": "1024x770"}, r"validation_resolution .*height 770"),
    ("res-list", lambda p: {"validation_resolution": "1024,768"}, r"validation_resolution .*several sizes"),
    ("val-steps-negative", lambda p: {"validation_steps": -1}, r"validation_steps must be >= 0"),
    ("val-infer-zero", lambda p: {"validation_num_inference_steps": 0}, r"validation_num_inference_steps must be >= 1"),
    ("val-guidance-zero", lambda p: {"validation_guidance": 0}, r"validation_guidance must be > 0"),
    ("guidance-min-above-max", lambda p: {"flux_guidance_mode": "random-range", "flux_guidance_min": 5.0,
                                          "flux_guidance_max": 1.0}, r"flux_guidance_min 5.0 is above flux_guidance_max 1.0"),
    ("guidance-negative", lambda p: {"flux_guidance_value": -1}, r"flux_guidance_value must be >= 0"),
    ("scheduler-unknown", lambda p: {"lr_scheduler": "cosine_with_min_lr"}, r"lr_scheduler must be one of \['constant'"),
    ("polynomial-lr-end", lambda p: {"lr_scheduler": "polynomial", "lr_end": 1e-3}, r"lr_end 0.001 must be smaller"),
    ("optimizer-config-key", lambda p: {"optimizer": "prodigy", "optimizer_config": "d_coeff=2"},
     r"optimizer_config key 'd_coeff' is not taken by optimizer 'prodigy'"),
    ("precision-fp8", lambda p: {"mixed_precision": "fp8"}, r"mixed_precision must be one of .*fp8 training is not implemented"),
    ("optimizer-other", lambda p: {"optimizer": "optimi-adamw"}, r"optimizer must be one of .*implements adamw_bf16"),
    ("flavour-klein", lambda p: {"model_flavour": "klein-9b"}, r"model_flavour .*Qwen3"),
    ("model-type-full", lambda p: {"model_type": "full"}, r"model_type must be one of \['lora'\]"),
    ("model-family-flux", lambda p: {"model_family": "flux"}, r"model_family must be one of \['flux2'\]"),
    ("target-unknown", lambda p: {"flux_lora_target": "context"}, r"flux_lora_target must be one of"),
    ("init-pissa", lambda p: {"lora_init_type": "pissa"}, r"lora_init_type must be one of"),
    ("target-not-string", lambda p: {"flux_lora_target": 3}, r"flux_lora_target must be one of"),
    ("distributed-unknown", lambda p: {"distributed": "deepspeed"}, r"distributed must be one of"),
    ("nan-policy-unknown", lambda p: {"nan_policy": "ignore"}, r"nan_policy must be one of"),
    ("quant-sdnq", lambda p: {"base_model_precision": "int8-sdnq"}, r"base_model_precision must be one of .*quanto"),
    ("quanto-offload", lambda p: {"base_model_precision": "int4-quanto", "distributed": "ddp",
                                  "enable_group_offload": True}, r"base_model_precision .*enable_group_offload"),
    ("offload-blocks-zero", lambda p: {"group_offload_blocks_per_group": 0}, r"group_offload_blocks_per_group must be >= 1"),
    ("warmup-over-steps", lambda p: {"lr_scheduler": "cosine", "lr_warmup_steps": 11, "max_train_steps": 10},
     r"lr_warmup_steps 11 is more than max_train_steps 10"),
    ("ckpt-limit-zero", lambda p: {"checkpoints_total_limit": 0}, r"checkpoints_total_limit must be >= 1.*null"),
    ("ckpt-steps-zero", lambda p: {"checkpointing_steps": 0}, r"checkpointing_steps must be >= 1"),
    ("resume-missing", lambda p: {"resume_from_checkpoint": "checkpoint-7"}, r"resume_from_checkpoint 'checkpoint-7': no checkpoint folder"),
    ("model-hub-id", lambda p: {"pretrained_model_name_or_path": "black-forest-labs/FLUX.2-dev"},
     r"pretrained_model_name_or_path 'black-forest-labs/FLUX.2-dev' is not an existing local folder.*cannot download"),
    ("model-is-file", lambda p: {"pretrained_model_name_or_path": str(p.manifest)}, r"pretrained_model_name_or_path .* is a file"),
    ("transformer-not-safetensors", lambda p: {"pretrained_transformer_model_name_or_path": str(p.manifest)},
     r"pretrained_transformer_model_name_or_path .* is not a \.safetensors file"),
    ("output-dir-blank", lambda p: {"output_dir": "  "}, r"output_dir is empty"),
    ("output-name", lambda p: {"output_name": "my lora!"}, r"output_name 'my lora!' may hold only"),
    ("manifest-missing", lambda p: {"dataset_manifest": str(p.root / "nope.json")}, r"dataset_manifest .* does not exist"),
    ("two-datasets", lambda p: {"data_backend_config": str(p.manifest)}, r"dataset_manifest and data_backend_config are both set"),
    ("library-missing", lambda p: {"user_prompt_library": str(p.root / "nope.json")}, r"user_prompt_library .* does not exist"),
    ("tread-ratio-one", lambda p: {"tread_config": {"routes": [{"selection_ratio": 1.0, "start_layer_idx": 0, "end_layer_idx": 1}]}},
     r"tread_config\.routes\[0\]\.selection_ratio must be in \[0, 1\)"),
    ("tread-index-text", lambda p: {"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": "2", "end_layer_idx": 4}]}},
     r"tread_config\.routes\[0\]\.start_layer_idx must be a whole number"),
    ("tread-reversed", lambda p: {"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 5, "end_layer_idx": 2}]}},
     r"tread_config\.routes\[0\]: start_layer_idx 5 is after end_layer_idx 2"),
    ("tread-route-key", lambda p: {"tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer": 1, "end_layer_idx": 2}]}},
     r"tread_config\.routes\[0\] has unknown key\(s\) \['start_layer'\]; did you mean 'start_layer_idx'"),
    ("tread-no-routes", lambda p: {"tread_config": {}}, r"tread_config needs 'routes'"),
    ("tread-bad-json", lambda p: {"tread_config": "{routes"}, r"tread_config is a string that is not valid JSON"),
]


@pytest.mark.parametrize(("make", "match"), [pytest.param(m, r, id=i) for i, m, r in BAD_VALUES])
def test_bad_value_raises_naming_the_key(paths: Paths, make: Callable[[Paths], dict[str, Any]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(base(paths, **make(paths)))


def test_a_quantized_base_with_fsdp2_is_refused_only_for_several_processes(paths: Paths) -> None:
    """One process has nothing to shard: the seed's recipe (int8-quanto, fsdp2) runs as 'none' there. (fsdp2 was the
    default before distributed 'auto', which picks ddp for quantized weights: tests/unit/test_distributed_choice.py.)"""
    cfg = TrainConfig.from_dict(base(paths, base_model_precision="int8-quanto", distributed="fsdp2"))
    assert (cfg.parallelism.distributed, cfg.quantization.base_model_precision) == ("fsdp2", "int8-quanto")
    cfg.check_processes(1)
    with pytest.raises(ValueError, match=r"base_model_precision 'int8-quanto' cannot be combined with distributed "
                                         r"'fsdp2' over 2 processes.*set distributed to 'ddp'"):
        cfg.check_processes(2)


@pytest.mark.parametrize("key", ["pretrained_model_name_or_path", "output_dir"])
def test_missing_required_key_is_named(paths: Paths, key: str) -> None:
    data = base(paths)
    del data[key]
    with pytest.raises(ValueError, match=rf"missing required key\(s\) \['{key}'\]"):
        TrainConfig.from_dict(data)


def test_missing_dataset_is_named(paths: Paths) -> None:
    data = base(paths)
    del data["dataset_manifest"]
    with pytest.raises(ValueError, match=r"dataset_manifest or data_backend_config is required"):
        TrainConfig.from_dict(data)


def test_direct_construction_is_strict_and_normalises_numbers(paths: Paths) -> None:
    with pytest.raises(ValueError, match=r"learning_rate must be a number, got '1e-4'"):
        config_module.OptimizerConfig(learning_rate="1e-4")
    groups = dict(model=config_module.ModelConfig(root=paths.model),
                  data=config_module.DataConfig(dataset_manifest=str(paths.manifest)),
                  checkpoint=config_module.CheckpointConfig(output_dir=paths.output))
    with pytest.raises(ValueError, match=r"tread_config must be a TreadConfig"):
        TrainConfig(**groups, tread={"routes": []})
    cfg = TrainConfig(**groups, lora=config_module.LoraConfig(alpha=8), optim=config_module.OptimizerConfig(learning_rate=1))
    assert isinstance(cfg.lora_alpha, float) and cfg.lora.alpha == 8.0 and cfg.learning_rate == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora_rank = 4  # type: ignore[misc]


# --- files -------------------------------------------------------------------------------------------


def test_bad_json_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"learning_rate": 1e-4,}')
    with pytest.raises(ValueError, match=rf"config file {bad} is not valid JSON: .* line 1"):
        TrainConfig.from_json(bad)
    with pytest.raises(ValueError, match=r"cannot read config file"):
        TrainConfig.from_json(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"config file {bad}: the config must be a JSON object"):
        TrainConfig.from_json(bad)


def test_errors_from_a_file_name_the_file_and_the_key(paths: Paths, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base(paths, lora_rank=-2)))
    with pytest.raises(ValueError, match=rf"config file {path}: lora_rank must be >= 1"):
        TrainConfig.from_json(path)


def test_simpletuner_flux2_quickstart_config_loads(paths: Paths, tmp_path: Path) -> None:
    """Modelled on SimpleTuner's documentation/quickstart/FLUX2.md, with local paths and only keys we implement."""
    simpletuner_config = {
        "model_type": "lora",
        "model_family": "flux2",
        "model_flavour": "dev",
        "pretrained_model_name_or_path": str(paths.model),
        "output_dir": str(paths.output),
        "data_backend_config": str(paths.manifest),
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "max_train_steps": 10000,
        "validation_resolution": "1024x1024",
        "validation_num_inference_steps": 20,
        "flux_guidance_mode": "constant",
        "flux_guidance_value": 1.0,
        "lora_rank": 16,
        "--flux_lora_target": "all",
        "base_model_precision": "int8-quanto",
        "text_encoder_1_precision": "int8-quanto",
        "base_model_default_dtype": "bf16",
        "--distributed": "ddp",
        "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]},
        "--quantize_via": "cpu",
        "--offload_during_startup": "true",
        "--vae_batch_size": 1,
        "--max_grad_norm": 1.0,
        "--checkpoint_step_interval": 500,
        "--checkpoints_total_limit": 5,
        "--validation_step_interval": 500,
        "--validation_seed": 42,
        "--validation_guidance": 4.0,
        "--resume_from_checkpoint": "latest",
        "user_prompt_library": str(paths.library),
        "validation_subject": "a corgi",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(simpletuner_config, indent=2))
    cfg = TrainConfig.from_json(path)
    assert cfg.data.data_backend_config == paths.manifest and cfg.data.dataset_manifests == ()
    assert cfg.quantization == config_module.QuantizationConfig(
        base_model_precision="int8-quanto", text_encoder_precision="int8-quanto",
        base_model_default_dtype="bf16", quantize_via="cpu")
    assert cfg.tread == TreadConfig(routes=(TreadRoute(selection_ratio=0.5, start_layer_idx=2, end_layer_idx=-2),))
    assert cfg.tread.resolved_routes(8 + 48) == ((0.5, 2, 54),)
    assert cfg.offload.during_startup is True and cfg.data.vae_batch_size == 1
    assert (cfg.checkpointing_steps, cfg.validation_steps, cfg.checkpoint.resume_from) == (500, 500, "latest")
    assert cfg.validation.prompts() == {
        "portrait_subject": "a professional portrait photograph of a corgi, studio lighting, high detail",
        "cinematic_subject": "a cinematic shot of a corgi, dramatic lighting, film grain",
    }
    assert cfg.validation.enabled and (cfg.validation.width, cfg.validation.height) == (1024, 1024)


# --- derived values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [("1024", (1024, 1024)), ("1024x768", (1024, 768)), (512, (512, 512)),
                                             (" 768X1344 ", (768, 1344)), ("16x32", (16, 32))])
def test_validation_size_is_width_by_height(paths: Paths, value: str | int, size: tuple[int, int]) -> None:
    cfg = TrainConfig.from_dict(base(paths, validation_resolution=value))
    assert cfg.validation.size == size == parse_resolution(value)
    assert (cfg.validation.width, cfg.validation.height) == size


def test_validation_prompts_put_the_single_prompt_first_and_fill_the_subject(paths: Paths) -> None:
    cfg = TrainConfig.from_dict(base(paths, validation_prompt="<subject> in the snow", validation_subject="sks cat",
                                     user_prompt_library=str(paths.library)))
    prompts = cfg.validation.prompts()
    assert list(prompts) == ["validation_prompt", "portrait_subject", "cinematic_subject"]
    assert prompts["validation_prompt"] == "sks cat in the snow"
    assert all("<subject>" not in p for p in prompts.values())


@pytest.mark.parametrize(("library", "match"), [
    ("{not json", r"user_prompt_library .* is not valid JSON"),
    ('{"a": 3}', r"user_prompt_library .*entry 'a' must be a non-empty prompt string"),
    ("{}", r"user_prompt_library .* must be a non-empty JSON object"),
    ('{"bad name/": "x"}', r"user_prompt_library .*name 'bad name/' may hold only"),
])
def test_bad_prompt_library_is_refused_before_training(paths: Paths, library: str, match: str) -> None:
    paths.library.write_text(library)
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(base(paths, user_prompt_library=str(paths.library)))


def test_empty_strings_mean_none_where_simpletuner_uses_them_so(paths: Paths) -> None:
    cfg = TrainConfig.from_dict(base(paths, validation_prompt="", resume_from_checkpoint=""))
    assert cfg.validation_prompt is None and cfg.resume_from_checkpoint is None
    assert cfg.validation.enabled is False


def test_resume_from_named_checkpoint_inside_output_dir(paths: Paths) -> None:
    (paths.output / "checkpoint-4").mkdir(parents=True)
    assert TrainConfig.from_dict(base(paths, resume_from_checkpoint="checkpoint-4")).checkpoint.resume_from == "checkpoint-4"
    absolute = str(paths.output / "checkpoint-4")
    assert TrainConfig.from_dict(base(paths, resume_from_checkpoint=absolute)).resume_from_checkpoint == absolute


def test_lora_alpha_defaults_to_rank_and_is_kept_apart(paths: Paths) -> None:
    assert TrainConfig.from_dict(base(paths, lora_rank=8)).lora.alpha == 8.0
    assert TrainConfig.from_dict(base(paths, lora_rank=8, lora_alpha=4)).lora.alpha == 4.0


def test_tread_routes_resolve_against_the_block_count() -> None:
    tread = TreadConfig.from_dict({"routes": [
        {"selection_ratio": 0.3, "start_layer_idx": 1, "end_layer_idx": 3},
        {"selection_ratio": 0.7, "start_layer_idx": -4, "end_layer_idx": -1},
    ]})
    assert tread.resolved_routes(56) == ((0.3, 1, 3), (0.7, 52, 55))
    with pytest.raises(ValueError, match=r"tread_config routes overlap: blocks 1\.\.3 and 1\.\.4"):
        tread.resolved_routes(5)
    with pytest.raises(ValueError, match=r"tread_config\.routes\[0\]: blocks 1\.\.3 resolve to 1\.\.3, outside"):
        tread.resolved_routes(3)
    mixed = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]})
    with pytest.raises(ValueError, match=r"resolve to 2\.\.1"):
        mixed.resolved_routes(3)


# --- ignored settings warn ---------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "key"), [
    ({"lr_warmup_steps": 10}, "lr_warmup_steps"),
    ({"flux_guidance_max": 5.0}, "flux_guidance_max"),
    ({"flux_guidance_mode": "random-range", "flux_guidance_value": 3.5}, "flux_guidance_value"),
    ({"flow_schedule_auto_shift": True, "flow_schedule_shift": 2.0}, "flow_schedule_shift"),
    ({"gradient_checkpointing": False, "gradient_checkpointing_interval": 2}, "gradient_checkpointing_interval"),
    ({"group_offload_blocks_per_group": 4}, "group_offload_blocks_per_group"),
    ({"quantize_via": "cpu"}, "quantize_via"),
    ({"validation_prompt": "a dog", "validation_subject": "sks"}, "validation_subject"),
])
def test_settings_the_chosen_mode_ignores_warn(paths: Paths, caplog: pytest.LogCaptureFixture,
                                               extra: dict[str, Any], key: str) -> None:
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.config"):
        TrainConfig.from_dict(base(paths, **extra))
    assert [r.getMessage().split("=")[0] for r in caplog.records] == [f"config: {key}"]


def test_defaults_do_not_warn(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.config"):
        TrainConfig.from_dict(base(paths))
    assert caplog.records == []


# --- documentation -----------------------------------------------------------------------------------


def test_every_field_has_a_docstring_under_it() -> None:
    # config.py and every module that declares one of TrainConfig's groups (trainer/optimizers.py, trackers.py ...)
    groups, todo = set(), [TrainConfig]
    while todo:  # nested groups too (objective.guidance)
        todo += [h for h in typing.get_type_hints(todo.pop()).values() if dataclasses.is_dataclass(h) and h not in groups]
        groups |= set(todo)
    modules = {config_module} | {inspect.getmodule(group) for group in groups}
    trees = [ast.parse(inspect.getsource(module)) for module in modules]
    documented = set()
    for cls in (n for tree in trees for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt, nxt in zip(cls.body, cls.body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str) and isinstance(stmt.value, ast.Call) \
                    and getattr(stmt.value.func, "id", None) == "setting":
                documented.add(stmt.value.args[0].value)  # the flat key the field is read from
    assert documented == KNOWN_KEYS


def test_sub_configs_are_what_the_trainer_takes(paths: Paths) -> None:
    """The objective and loop.lr_lambda take the config's own sub-configs: no copy field by field in between."""
    import inspect as _inspect

    from flux2_lora_pack.trainer import loop, objective

    cfg = TrainConfig.from_dict(base(paths, flux_guidance_mode="random-range", flux_guidance_min=1.0,
                                     lr_scheduler="linear", lr_warmup_steps=5, max_train_steps=10))
    guidance = cfg.objective.guidance
    assert (guidance.mode, guidance.minimum, guidance.maximum) == ("random-range", 1.0, 4.0)
    assert _inspect.signature(objective.prepare_batch).parameters["spec"].annotation == "ObjectiveConfig"
    factor = loop.lr_lambda(**dataclasses.asdict(cfg.schedule))
    assert [factor(s) for s in (0, 4, 5, 10)] == [0.2, 1.0, 1.0, 0.0]


# --- rules across settings: each written once, as a method of the config that owns it ------------------

RULES: list[tuple[str, Callable[[Paths], Any], str]] = [
    ("data-xor", lambda p: config_module.DataConfig(dataset_manifest=str(p.manifest), data_backend_config=p.manifest),
     "dataset_manifest and data_backend_config are both set"),
    ("guidance-range", lambda p: config_module.GuidanceConfig(minimum=5.0, maximum=1.0), "is above flux_guidance_max"),
    ("warmup", lambda p: config_module.ScheduleConfig(warmup_steps=11, total_steps=10), "is more than max_train_steps"),
    ("quanto-fsdp2", lambda p: config_module.QuantizationConfig(base_model_precision="int8-quanto").check_compatible(
        mixed_precision="bf16", distributed="fsdp2", world_size=2, offload=config_module.OffloadConfig()),
     "cannot be combined with distributed 'fsdp2'"),
    ("quanto-offload", lambda p: config_module.QuantizationConfig(base_model_precision="int8-quanto").check_compatible(
        mixed_precision="bf16", distributed="ddp", world_size=2, offload=config_module.OffloadConfig(enabled=True)),
     "cannot be combined with enable_group_offload"),
    ("quanto-fp32-compute", lambda p: config_module.QuantizationConfig(base_model_precision="int8-quanto")
     .check_compatible(mixed_precision="no", distributed="none", world_size=1, offload=config_module.OffloadConfig()),
     "base_model_default_dtype 'bf16' with mixed_precision 'no'"),
    ("quantized-text-encoder-offload", lambda p: config_module.QuantizationConfig(
        text_encoder_precision="int8-quanto").check_text_encoder(
        offload=config_module.OffloadConfig(enabled=True, text_encoder=True)), "cannot be combined with group_offload_text_encoder"),
    ("offload-fsdp2", lambda p: config_module.OffloadConfig(enabled=True).check_compatible(
        gradient_checkpointing=True, distributed="fsdp2", world_size=2, device="cpu"), "over 2 processes"),
    ("offload-checkpointing", lambda p: config_module.OffloadConfig(enabled=True).check_compatible(
        gradient_checkpointing=False, distributed="none", world_size=1, device="cpu"), "needs gradient_checkpointing true"),
    ("stream-cuda", lambda p: config_module.OffloadConfig(enabled=True, use_stream=True).check_compatible(
        gradient_checkpointing=True, distributed="none", world_size=1, device="cpu"), "CUDA streams need a CUDA device"),
]


@pytest.mark.parametrize(("make", "match"), [pytest.param(m, r, id=i) for i, m, r in RULES])
def test_each_rule_across_settings_is_asked_through_its_config(paths: Paths, make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(paths)


# A phrase of each rule's message as it stands in the source, to count where the rule is written.
RULE_SOURCES = ["give one dataset source", "the random-range draws from [min, max]",
                "the learning rate would never reach learning_rate", "fully_shard turns quanto's int8/int4 weights back into full-precision",
                "hooks cannot move quanto's quantized weights (enable_group_offload", "computes in fp32 without autocast",
                "group_offload_text_encoder (diffusers' offload hooks", "already shards the weights and owns their placement",
                "without it autograd keeps every block's", "process computes on {kind!r}: CUDA streams"]


@pytest.mark.parametrize("phrase", RULE_SOURCES)
def test_each_rule_across_settings_is_written_once(phrase: str) -> None:
    trainer = Path(config_module.__file__).parent
    places = [f.name for f in sorted(trainer.glob("*.py")) for _ in range(f.read_text(encoding="utf-8").count(phrase))]
    # once, where the sub-config it starts from is declared (the optimizer's settings live in optimizers.py)
    assert places == ["optimizers.py" if "learning rate would never reach" in phrase else "config.py"]


def test_base_model_default_dtype_follows_mixed_precision_unless_set(paths: Paths, caplog) -> None:
    """int8-quanto with fp32 compute runs with the defaults: the unquantized layers default to fp32 there."""
    quantized = dict(base_model_precision="int8-quanto", distributed="none")
    cfg = TrainConfig.from_dict(base(paths, mixed_precision="no", **quantized))
    assert cfg.quantization.base_model_default_dtype == "fp32"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(base(paths, **quantized)).quantization.base_model_default_dtype == "bf16"
    with pytest.raises(ValueError, match="base_model_default_dtype 'bf16' with mixed_precision 'no'"):
        TrainConfig.from_dict(base(paths, mixed_precision="no", base_model_default_dtype="bf16", **quantized))
    caplog.clear()
    TrainConfig.from_dict(base(paths, mixed_precision="no"))  # nothing quantized: left alone, no warning
    assert "base_model_default_dtype" not in caplog.text
