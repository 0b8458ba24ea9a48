"""The FLUX.2 flavours: dev, klein-4b and klein-9b (SimpleTuner's `model_flavour` names), their real sizes, and how
a diffusers folder says which one it holds.

All three share diffusers' Flux2Transformer2DModel (head dim 128, 4-axis RoPE (32, 32, 32, 32), theta 2000, MLP
ratio 3), the 32-channel AutoencoderKLFlux2 and the 128-channel patchified latents. They differ in width, block
counts, the text encoder and the guidance embedding:

| flavour  | pipeline           | hidden (heads x 128) | double + single | text encoder (hidden, layers)   | features     | guidance embed |
|----------|--------------------|----------------------|-----------------|---------------------------------|--------------|----------------|
| dev      | Flux2Pipeline      | 6144 (48)            | 8 + 48          | Mistral-Small-3.1-24B (5120, 40)| 3 x 5120     | yes            |
| klein-4b | Flux2KleinPipeline | 3072 (24)            | 5 + 20          | Qwen3-4B (2560, 36)             | 3 x 2560     | no             |
| klein-9b | Flux2KleinPipeline | 4096 (32)            | 8 + 24          | Qwen3-8B (4096, 36)             | 3 x 4096     | no             |

Sources (read, not copied):
  - dev: black-forest-labs/flux2 src/flux2/model.py `Flux2Params`; diffusers 0.42 Flux2Transformer2DModel defaults.
  - klein: black-forest-labs' `Klein4BParams` / `Klein9BParams` (flux2 src/flux2/model.py, as ported and quoted by
    third-party code in the index), agreeing with SimpleTuner simpletuner/helpers/models/flux2/model.py (klein-9b
    8 + 24 blocks, klein-4b 5 + 20, text features 12288 / 7680, KLEIN_OUTPUT_LAYERS (9, 18, 27), no guidance
    embeddings) and documentation/quickstart/FLUX2.md; ComfyUI comfy/model_detection.py reads a FLUX.2 checkpoint's
    width from img_in and sets heads = width / 128, and comfy/supported_models.py `Flux2` picks a qwen3_4b or
    qwen3_8b text encoder for klein.
  - Qwen3-4B / Qwen3-8B text encoder sizes: Qwen's config.json (4B: hidden 2560, 36 layers, 32 heads, 8 KV heads,
    MLP 9728; 8B: hidden 4096, 36 layers, 32 heads, 8 KV heads, MLP 12288).
  - Text conventions: diffusers 0.42 pipelines/flux2/pipeline_flux2_klein.py (`_get_qwen3_prompt_embeds`: Qwen3 chat
    template, add_generation_prompt=True, enable_thinking=False, 512 tokens, hidden states (9, 18, 27); negative
    prompt ""; `is_distilled` is a pipeline config value, so it is saved in model_index.json).

A folder's flavour: model_index.json `_class_name` Flux2Pipeline is dev. Flux2KleinPipeline is klein, and its size
is told by the transformer's block counts (5 + 20 or 8 + 24), which make-tiny keeps in its tiny klein models, so
TREAD's block indices and the flavour detection see the real structure. Pure data: imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Flavour = Literal["dev", "klein-4b", "klein-9b"]
FLAVOURS: tuple[str, ...] = ("dev", "klein-4b", "klein-9b")
KLEIN_FLAVOURS: tuple[str, ...] = ("klein-4b", "klein-9b")


@dataclass(frozen=True, kw_only=True, slots=True)
class FlavourSpec:
    """One FLUX.2 flavour: what its diffusers folder holds and how its text is encoded."""

    name: str
    """SimpleTuner's model_flavour name."""
    title: str
    """How users call it."""
    pipeline_class: str
    """model_index.json _class_name of its diffusers folder."""
    text_encoder_class: str
    """model_index.json text_encoder class (transformers)."""
    text_encoder_name: str
    """The text encoder model it ships with."""
    transformer: dict[str, Any]
    """The real Flux2Transformer2DModel config values that differ between flavours."""
    text_encoder: dict[str, int]
    """The real text encoder's sizes (hidden_size, num_hidden_layers, heads, KV heads, MLP width)."""
    text_hidden_layers: tuple[int, ...]
    """Hidden states stacked per token into the transformer's text features (index 0 = embeddings)."""
    hub_repos: tuple[str, ...]
    """black-forest-labs repositories that hold it (base first for klein)."""

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer["guidance_embeds"])

    @property
    def block_counts(self) -> tuple[int, int]:
        """(double-stream blocks, single-stream blocks)."""
        return self.transformer["num_layers"], self.transformer["num_single_layers"]

    def describe(self, *, is_distilled: bool = False) -> str:
        """One line for users: 'FLUX.2 [klein] 9B (base; Qwen3-8B text encoder, 8 + 24 blocks, no guidance embedding)'."""
        double, single = self.block_counts
        kind = ""
        if self.name in KLEIN_FLAVOURS:
            kind = "distilled, 4 steps without CFG; " if is_distilled else "base; "
        guidance = "guidance embedding" if self.has_guidance_embedding else "no guidance embedding"
        return f"{self.title} ({kind}{self.text_encoder_name} text encoder, {double} + {single} blocks, {guidance})"


_SHARED_TRANSFORMER = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                           mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)

SPECS: dict[str, FlavourSpec] = {
    "dev": FlavourSpec(
        name="dev", title="FLUX.2 [dev]", pipeline_class="Flux2Pipeline",
        text_encoder_class="Mistral3ForConditionalGeneration", text_encoder_name="Mistral-Small-3.1-24B",
        transformer=dict(_SHARED_TRANSFORMER, num_layers=8, num_single_layers=48, num_attention_heads=48,
                         joint_attention_dim=3 * 5120, guidance_embeds=True),
        text_encoder=dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=32768),
        text_hidden_layers=(10, 20, 30),
        hub_repos=("black-forest-labs/FLUX.2-dev",),
    ),
    "klein-4b": FlavourSpec(
        name="klein-4b", title="FLUX.2 [klein] 4B", pipeline_class="Flux2KleinPipeline",
        text_encoder_class="Qwen3ForCausalLM", text_encoder_name="Qwen3-4B",
        transformer=dict(_SHARED_TRANSFORMER, num_layers=5, num_single_layers=20, num_attention_heads=24,
                         joint_attention_dim=3 * 2560, guidance_embeds=False),
        text_encoder=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=9728),
        text_hidden_layers=(9, 18, 27),
        hub_repos=("black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-4B"),
    ),
    "klein-9b": FlavourSpec(
        name="klein-9b", title="FLUX.2 [klein] 9B", pipeline_class="Flux2KleinPipeline",
        text_encoder_class="Qwen3ForCausalLM", text_encoder_name="Qwen3-8B",
        transformer=dict(_SHARED_TRANSFORMER, num_layers=8, num_single_layers=24, num_attention_heads=32,
                         joint_attention_dim=3 * 4096, guidance_embeds=False),
        text_encoder=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=12288),
        text_hidden_layers=(9, 18, 27),
        hub_repos=("black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs/FLUX.2-klein-9B"),
    ),
}
"""Every flavour, by SimpleTuner's name."""

PIPELINE_CLASSES: frozenset[str] = frozenset(spec.pipeline_class for spec in SPECS.values())

PIPELINE_STEPS = 50
"""num_inference_steps default of Flux2Pipeline and Flux2KleinPipeline (diffusers 0.42): FLUX.2 Sample's default."""
PIPELINE_GUIDANCE = 4.0
"""guidance_scale default of both pipelines: the guidance embedding's value on dev, the CFG scale on klein base."""
DISTILLED_STEPS = 4
"""The step count FLUX.2 [klein]'s step-distilled models are made for (black-forest-labs/FLUX.2-klein-4B / -9B
model cards: 4 steps, guidance 1, i.e. no CFG)."""


def uses_classifier_free_guidance(flavour: FlavourSpec, *, is_distilled: bool, guidance: float) -> bool:
    """Whether sampling runs classifier-free guidance, as Flux2KleinPipeline.do_classifier_free_guidance decides:
    a model without guidance embedding (klein) that is not step-distilled, with a scale above 1. dev's guidance
    goes through its guidance embedding instead (one model call per step)."""
    return not flavour.has_guidance_embedding and not is_distilled and guidance > 1


def spec(flavour: str) -> FlavourSpec:
    """The spec of a flavour name; ValueError listing the names for an unknown one."""
    if flavour not in SPECS:
        raise ValueError(f"model_flavour {flavour!r} is not a FLUX.2 flavour; choose one of {list(FLAVOURS)}.")
    return SPECS[flavour]


def text_hidden_size(text_encoder_config: dict[str, Any]) -> int:
    """The hidden size of a text encoder config.json: nested under text_config for Mistral3, flat for Qwen3."""
    text = text_encoder_config.get("text_config") or text_encoder_config
    return int(text.get("hidden_size", -1))


def text_num_layers(text_encoder_config: dict[str, Any]) -> int:
    text = text_encoder_config.get("text_config") or text_encoder_config
    return int(text.get("num_hidden_layers", 0))


def flavour_of_folder(*, pipeline_class: str, transformer_config: dict[str, Any], where: str) -> str:
    """The flavour a diffusers folder holds, from model_index.json's _class_name and the transformer config.

    where names the folder in errors. A klein folder whose block counts are neither klein-4b's nor klein-9b's is
    refused: its TREAD indices, memory estimate and LoRA sizes would be guesses.
    """
    if pipeline_class == "Flux2Pipeline":
        return "dev"
    if pipeline_class != "Flux2KleinPipeline":
        raise ValueError(f"{where}: model_index.json _class_name {pipeline_class!r} is not a FLUX.2 pipeline "
                         f"({', '.join(sorted(PIPELINE_CLASSES))}).")
    counts = (transformer_config.get("num_layers"), transformer_config.get("num_single_layers"))
    for name in KLEIN_FLAVOURS:
        if counts == SPECS[name].block_counts:
            return name
    known = "; ".join(f"{name}: {a} + {b}" for name in KLEIN_FLAVOURS for a, b in [SPECS[name].block_counts])
    raise ValueError(f"{where}: a FLUX.2 [klein] folder whose transformer has {counts[0]} double + {counts[1]} single "
                     f"blocks, which is neither klein size ({known}). Use the diffusers folder of "
                     "black-forest-labs/FLUX.2-klein-base-4B or -9B (or their distilled twins).")


def check_flavour_matches(requested: str, found: str, *, where: str, is_distilled: bool) -> None:
    """The one error for a model_flavour setting that contradicts the folder: it names both."""
    if requested == found:
        return
    title = SPECS[requested].title if requested in SPECS else "unknown"
    raise ValueError(
        f"model_flavour {requested!r} ({title}) does not match the {where}, which holds {found!r}: "
        f"{SPECS[found].describe(is_distilled=is_distilled)}. Set model_flavour to {found!r} or point "
        f"pretrained_model_name_or_path at a {requested} folder."
    )


def check_config_flavour(root: Path, flavour: str) -> None:
    """model_flavour against the folder's JSON, when the config is read (ModelConfig).

    A klein flavour must be verifiable then: the config's klein rules (no guidance embedding) and the run's text
    conventions depend on it. dev keeps its old contract: a folder without a readable FLUX.2 model_index.json
    is refused in full (inspect_model_folder) when the run starts.
    """
    import json

    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        transformer = json.loads((root / "transformer" / "config.json").read_text(encoding="utf-8"))
        pipeline_class = index["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        index = None
    if index is None or pipeline_class not in PIPELINE_CLASSES:
        if flavour == "dev":
            return
        raise ValueError(
            f"model_flavour {flavour!r} ({spec(flavour).describe()}) needs its diffusers folder: "
            f"pretrained_model_name_or_path {str(root)!r} holds no FLUX.2 model_index.json and transformer/config.json. "
            f"Give the local folder of {' or '.join(SPECS[flavour].hub_repos)}."
        )
    found = flavour_of_folder(pipeline_class=pipeline_class, transformer_config=transformer,
                              where=f"model folder {root}")
    check_flavour_matches(flavour, found, where=f"model folder {root}", is_distilled=index.get("is_distilled") is True)


def check_flavour_settings(config: Any) -> None:
    """TrainConfig's rules that start from model_flavour: klein has no guidance embedding, so flux_guidance_*
    settings (other than their defaults, which nothing reads on klein) are refused, saying why."""
    from .settings import field_setting

    flavour = spec(config.model.flavour)
    if flavour.has_guidance_embedding:
        return
    guidance = config.objective.guidance
    default = type(guidance)()
    changed = [f"{field_setting(f).key}={getattr(guidance, f.name)!r}" for f in dataclasses.fields(guidance)
               if field_setting(f) is not None and getattr(guidance, f.name) != getattr(default, f.name)]
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: {flavour.title} has no guidance embedding (its transformer has guidance_embeds "
            "false), so flux_guidance_* settings would train nothing. Remove them; klein's guidance at inference "
            "is classifier-free (validation_guidance)."
        )
