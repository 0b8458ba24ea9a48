"""SimpleTuner's FLUX.2 config keys that this trainer reads under another name or deliberately refuses.

TrainConfig.from_dict consults these tables: an alias is read as the key it names; an unsupported key is
refused with the reason given here; a refused choice of a known key gets its reason in the error.
"""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
}
"""SimpleTuner's current names for keys this trainer spells the older SimpleTuner way."""

_NO_HUB = "this trainer never talks to the Hugging Face Hub; upload the LoRA file yourself"
_NO_WEBHOOK = ("webhooks are not sent; progress goes to events.jsonl in output_dir (charted live by the Train LoRA node) "
               "and to the report_to trackers")
_DATASET = "dataset settings belong to the dataset (the Build Dataset node, or the entries of data_backend_config)"
_NO_CFG = ("validation samples as the FLUX.2 pipelines do: dev through its guidance embedding, klein base with "
           "classifier-free guidance against the empty prompt, both scaled by validation_guidance")
_OPTIMIZERS = ("of SimpleTuner's optimizers this trainer implements adamw_bf16, optimi-lion and prodigy (and its own "
               "'adamw', torch AdamW)")
_OPTIMIZER_STEP = "the optimizer steps once after the whole backward, on the device that holds the LoRA weights"

UNSUPPORTED_KEYS: dict[str, str] = {
    "webhook_config": _NO_WEBHOOK,
    "push_to_hub": _NO_HUB, "push_checkpoints_to_hub": _NO_HUB, "hub_model_id": _NO_HUB,
    "model_card_safe_for_work": _NO_HUB, "model_card_note": _NO_HUB,
    "num_train_epochs": "training length is set by max_train_steps only",
    "lora_format": "the saved LoRA layout is chosen by this trainer (ComfyUI/BFL keys that load in stock ComfyUI)",
    "init_lora_ema": "training starts from a fresh LoRA (init_lora is not implemented)",
    "grad_clip_method": "max_grad_norm always clips the global gradient norm (SimpleTuner's default 'value' clips each element)",
    "validation_negative_prompt": _NO_CFG, "validation_guidance_real": _NO_CFG,
    "validation_no_cfg_until_timestep": _NO_CFG, "validation_guidance_rescale": _NO_CFG,
    "validation_disable_unconditional": _NO_CFG,
    "validation_prompt_library": "SimpleTuner's built-in prompt library is not shipped; use user_prompt_library",
    "validation_torch_compile": "validation runs the pipeline uncompiled",
    "num_eval_images": "evaluation metrics are not implemented",
    "eval_steps_interval": "evaluation metrics are not implemented",
    "resolution": _DATASET, "resolution_type": _DATASET, "minimum_image_size": _DATASET,
    "maximum_image_size": _DATASET, "target_downsample_size": _DATASET, "aspect_bucket_rounding": _DATASET,
    "disable_bucket_pruning": _DATASET, "crop": _DATASET, "crop_style": _DATASET, "crop_aspect": _DATASET,
    "caption_strategy": _DATASET, "instance_data_dir": _DATASET, "repeats": _DATASET,
    "cache_dir": _DATASET, "cache_dir_vae": _DATASET, "cache_dir_text": _DATASET,
    "use_8bit_adam": "SimpleTuner removed its 8-bit AdamW; optimizer 'adamw_bf16' keeps the LoRA in bf16",
    "fuse_qkv_projections": "attention runs with the separate q/k/v projections the LoRA targets",
    "fused_qkv_projections": "attention runs with the separate q/k/v projections the LoRA targets",
    "controlnet": "ControlNet training is not implemented",
    "train_text_encoder": "only the transformer is trained; the text encoder only caches embeddings",
    "text_encoder_2_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "text_encoder_3_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "text_encoder_4_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "pretrained_transformer_subfolder": ("the transformer is read from the model folder's transformer/ subfolder "
                                         "or from pretrained_transformer_model_name_or_path"),
    "custom_text_encoder_intermediary_layers": "text features are the Mistral hidden states 10, 20 and 30, as FLUX.2-dev expects",
    "flux_attention_masked_training": "a FLUX.1 option; FLUX.2-dev does not mask text padding",
    "flux_fast_schedule": "a FLUX.1 schnell option",
    "snr_gamma": "the loss is plain flow-matching MSE",
    "scheduled_sampling_order": ("the rollout's solver sets its order (scheduled_sampling_sampler euler 1, heun 2, "
                                 "rk4 4)"),
    "input_perturbation": "the loss is plain flow-matching MSE",
    "attention_mechanism": "attention uses diffusers' default (PyTorch SDPA)",
    "disable_benchmark": "there is no start-up benchmark to disable",
    "i_know_what_i_am_doing": "every supported key is always available",
}
"""SimpleTuner options this trainer deliberately does not implement, with the reason given to the user."""

CHOICE_HINTS: dict[str, dict[str, str]] = {
    "model_type": {"full": "full fine-tuning is not supported; this trainer trains LoRA adapters only"},
    "model_family": {"flux": "this trainer is for FLUX.2; FLUX.1 is model_family 'flux' in SimpleTuner"},
    "optimizer": {k: _OPTIMIZERS for k in (
        "ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree", "adamw_schedulefree+aggressive",
        "adamw_schedulefree+no_kahan", "optimi-stableadamw", "optimi-adamw", "optimi-radam", "optimi-ranger",
        "optimi-adan", "optimi-adam", "optimi-sgd", "soap", "muon", "torch-adamw")},
    "mixed_precision": {"fp8": "fp8 training is not implemented"},
    "scheduled_sampling_sampler": {k: "SimpleTuner's flow-matching rollout steps with Euler whatever the sampler says "
                                      "('euler' here is the same); 'heun' and 'rk4' are higher-order solvers"
                                   for k in ("unipc", "dpm")},
    "lora_init_type": {k: "only PEFT's default and gaussian initialisations are supported" for k in ("loftq", "olora", "pissa")},
}
"""Key -> {refused choice: why}: the reason an error gives for a choice SimpleTuner has and this trainer has not."""

QUANT_HINT = ("this trainer implements optimum-quanto int8/int4 weight quantization and torchao low-precision compute "
              "of the transformer (fp8-torchao, int8-torchao); the text encoder takes the quanto ones only")
"""Why any other quantization choice (SimpleTuner's bnb, other torchao modes, sdnq ...) is refused."""


_FSDP2 = "this trainer shards every FLUX.2 block with FSDP2 when distributed is 'fsdp2' (trainer/parallelize.py)"
SAME_AS_THIS_TRAINER: dict[str, tuple[tuple[object, ...], str]] = {
    "fsdp_version": ((2, "2"), "only FSDP2 is implemented (SimpleTuner deprecates version 1)"),
    "fsdp_reshard_after_forward": ((True, "true"), "each block is resharded after its forward, as FSDP2's default"),
    "fsdp_cpu_ram_efficient_loading": ((True, False, "true", "false"),
                                       "every rank always reads only its own shard from the files"),
    "fsdp_auto_wrap_policy": (("TRANSFORMER_BASED_WRAP",), _FSDP2),
    "fsdp_transformer_layer_cls_to_wrap": (("Flux2TransformerBlock,Flux2SingleTransformerBlock",
                                            "Flux2SingleTransformerBlock,Flux2TransformerBlock"), _FSDP2),
    "fsdp_limit_all_gathers": ((True, "true"), "FSDP2 limits its all-gathers itself"),
    "fsdp_state_dict_type": (("SHARDED_STATE_DICT", "FULL_STATE_DICT"),
                             "checkpoints hold only the LoRA and its optimizer state, gathered into one file"),
    "fsdp_cpu_offload": ((False, "false"), "use enable_group_offload (one process) to keep weights in CPU memory"),
    "fsdp_activation_checkpointing": ((False, "false"), "use gradient_checkpointing"),
    "optimizer_cpu_offload_method": (("none",), _OPTIMIZER_STEP),
    "optimizer_offload_gradients": ((False, "false"), _OPTIMIZER_STEP),
    "fuse_optimizer": ((False, "false"), _OPTIMIZER_STEP),
    "optimizer_release_gradients": ((False, "false"), _OPTIMIZER_STEP),
    "validation_lycoris_strength": ((1, 1.0, "1", "1.0"), "validation renders the adapter as it is trained, at "
                                    "strength 1 (Apply LoRA sets a strength afterwards)"),
    "dynamo_use_regional_compilation": ((True, False, "true", "false"), "dynamo_backend always compiles the "
                                        "transformer regionally, one compiled forward per block class"),
    "dynamo_mode": (("", None, "default"), "the blocks compile in torch.compile's default mode"),
    "dynamo_fullgraph": ((False, "false"), "a block compiles as one graph where it can (no error on a graph break)"),
    "dynamo_dynamic": ((False, "false"), "the blocks compile static shapes first and recompile once with a dynamic "
                       "token count when another bucket shape comes"),
}
"""SimpleTuner keys whose listed values say what this trainer always does: accepted and read as nothing; any other
value is refused with the reason. (fsdp_enable sets distributed: translate_simpletuner_keys.)"""


def translate_simpletuner_keys(data: dict[str, object]) -> dict[str, object]:
    """`data` without the SAME_AS_THIS_TRAINER keys (checked), with fsdp_enable read as distributed
    (true: "fsdp2", false: "ddp", as SimpleTuner runs several processes without FSDP), and a report_to list
    (SimpleTuner's trainer takes one) read as its comma-separated string."""
    out: dict[str, object] = {}
    fsdp = None
    for raw_key, value in data.items():
        key = raw_key[2:] if isinstance(raw_key, str) and raw_key.startswith("--") else raw_key
        if key in SAME_AS_THIS_TRAINER:
            allowed, why = SAME_AS_THIS_TRAINER[key]
            if not any(type(a) is type(value) and a == value for a in allowed):
                raise ValueError(f"config key {raw_key!r} is {value!r}; this trainer supports only "
                                 f"{' or '.join(repr(a) for a in allowed)}: {why}.")
        elif key == "fsdp_enable":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise ValueError(f"config key {raw_key!r} is {value!r}; use true or false.")
            fsdp = (value if isinstance(value, bool) else str(value).lower() == "true", raw_key)
        elif key == "report_to" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[raw_key] = ",".join(value)
        else:
            out[raw_key] = value
    if fsdp is not None:
        wanted = "fsdp2" if fsdp[0] else "ddp"
        given = next((v for k, v in out.items() if k in ("distributed", "--distributed")), None)
        if given is not None and given != wanted:
            raise ValueError(f"config keys {fsdp[1]!r} ({fsdp[0]}) and 'distributed' ({given!r}) disagree; keep one.")
        if given is None:
            out["distributed"] = wanted
    return out


def choice_hint(key: str, value: str) -> str | None:
    """Why `value` is refused for `key`, when this table knows."""
    if key in ("base_model_precision", "text_encoder_1_precision"):
        return QUANT_HINT
    return CHOICE_HINTS.get(key, {}).get(value)


def unknown_key_message(raw_key: str, *, known: frozenset[str]) -> str:
    """The error for a key TrainConfig does not know: why, when SimpleTuner has it, else the closest known key."""
    from .settings import closest

    key = raw_key[2:] if raw_key.startswith("--") else raw_key
    if key in UNSUPPORTED_KEYS:
        return (f"config key {raw_key!r} is a SimpleTuner option that this trainer does not support: "
                f"{UNSUPPORTED_KEYS[key]}. Remove it from the config.")
    if key.startswith("sdnq_"):
        return f"config key {raw_key!r} is a SimpleTuner SDNQ option, not supported: {QUANT_HINT}. Remove it."
    return (f"unknown config key {raw_key!r}{closest(key, sorted(known | set(ALIASES)))} "
            "Keys follow SimpleTuner's names; see trainer/config.py for the list.")
