"""LyCORIS LoKr on FLUX.2: SimpleTuner's lycoris_config, LyCORIS's layer rules, PEFT's LoKr layers.

A LoKr adapter adds delta = scale * kron(w1, w2) to a Linear weight (out x in): w1 is (l x m) and w2 (k x n)
with l * k = out and m * n = in; either factor may itself be a low-rank product (w1_a @ w1_b, w2_a @ w2_b).

Library: PEFT's LoKr layers (peft.tuners.lokr), not the lycoris-lora package. What loads in ComfyUI is decided by
the key names we save (trainer/lokr_keys.py), which either library could feed; PEFT's layers sit inside the model
as our LoRA layers do, so FSDP2 (sharded with each block), DDP, group offload (frozen weights only), quanto, TREAD,
state gathering, checkpoints and validation treat them like LoRA, and PEFT is already a dependency. LyCORIS's
network patches forward methods from outside the model: FSDP2 would not shard it, and DDP, checkpoints and
validation would each need a second path. PEFT's own LoKr planner differs from LyCORIS's in ways that change what
a SimpleTuner config means (scale alpha/r even when neither factor is decomposed, where LyCORIS uses 1; no
full_matrix; a factor above sqrt(dim) is not swapped), so every layer's shapes and scale are planned here with
LyCORIS's rules (`plan_lokr`) and set on PEFT's layer (`set_lokr_factors`).

Fused q/k/v. ComfyUI's FLUX.2 (BFL layout) computes q, k and v of each double-block stream with one Linear
(`img_attn.qkv`, `txt_attn.qkv`, 3H x H); diffusers has three H x H layers. Three independent Kronecker products
stacked row-wise are in general no single Kronecker product, so LoKr trains the fused layout: q, k and v of a stream
share one w2 (one Parameter object) and each has its own w1 (l x m). Stacked, the rows of kron([w1_q; w1_k; w1_v],
w2) are exactly [kron(w1_q, w2); kron(w1_k, w2); kron(w1_v, w2)], so the saved file holds one LoKr per BFL module
(w1 of 3l rows, the shared w2) that ComfyUI applies as trained. Each projection is planned as its own H x H layer
(the shapes SimpleTuner gives it); only w2 is shared. Every other adapted layer maps one to one.

lycoris_config (SimpleTuner's --lycoris_config JSON, read when the config is read):
- algo "lokr" (required; LyCORIS's other algorithms are refused by name); multiplier 1 (optional; SimpleTuner
  truncates it with int(), so anything else would silently train another strength or nothing);
- linear_dim (required, >= 1) and linear_alpha (required, a whole number >= 0; SimpleTuner truncates it with int();
  0 means alpha = linear_dim, as LyCORIS reads it): a decomposed factor has rank linear_dim and the delta is scaled
  by linear_alpha / linear_dim (/ sqrt(linear_dim) with rs_lora); when neither factor is decomposed the scale is 1;
- factor (-1: the split closest to square), full_matrix, decompose_both, unbalanced_factorization, rs_lora: as
  LyCORIS's LokrModule reads them;
- apply_preset: target_module (FLUX.2 classes: Flux2Attention = the double blocks' attention layers,
  Flux2FeedForward = their feed-forward layers, Flux2ParallelSelfAttention = the single blocks' two layers,
  Flux2TransformerBlock / Flux2SingleTransformerBlock = every layer of that block kind; replaces flux_lora_target)
  and module_algo_map ({class: {factor, dim, alpha, full_matrix, ...}}: per-class overrides, innermost class wins);
- bypass_mode: accepted; it only changes how LyCORIS computes the same delta (PEFT builds the delta weight);
- conv_dim, conv_alpha, use_tucker, use_cp, use_conv_cp, disable_conv_cp, enable_conv: convolution settings, no
  effect (every adapted FLUX.2 layer is a Linear): accepted with a warning;
- dropout, rank_dropout, module_dropout, use_scalar, weight_decompose / dora_wd, train_norm, rescaled, constraint,
  rank_dropout_scale, wd_on_output: accepted only at LyCORIS's default (off), refused otherwise;
- anything else (preset, name_algo_map, target_name, ...) is refused naming the file and the field.

init_lokr_norm (SimpleTuner): w1 = 1 and w2 = scale * (a standard normal draw normalised to the base weight's mean
and standard deviation); the fused q/k/v take the statistics of the three weights together. It needs both factors
full (SimpleTuner's code reads lokr_w1 and lokr_w2): a decomposed factor is refused before weights load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .lora import ADAPTER_NAME, lora_target_modules

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LYCORIS_ALGOS = ("lokr",)
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
"""PEFT's (and ComfyUI's) names of the LoKr factor tensors."""

FLUX2_CLASSES = ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention", "Flux2TransformerBlock",
                 "Flux2SingleTransformerBlock")
"""diffusers FLUX.2 module classes a LyCORIS apply_preset may name (LyCORIS adapts every Linear inside them)."""

_QKV_GROUPS = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
"""The q/k/v layers of a double block that BFL fuses into one qkv Linear: they share w2."""

# Settings of LyCORIS's LokrModule this trainer implements, with LyCORIS's defaults (linear_dim / linear_alpha are
# required at the top level and named dim / alpha inside module_algo_map).
_OPTION_DEFAULTS: dict[str, Any] = {"factor": -1, "full_matrix": False, "decompose_both": False,
                                    "unbalanced_factorization": False, "rs_lora": False}
_OFF_ONLY: dict[str, Any] = {"dropout": 0, "rank_dropout": 0, "module_dropout": 0, "use_scalar": False,
                             "weight_decompose": False, "dora_wd": False, "train_norm": False, "rescaled": False,
                             "constraint": 0, "rank_dropout_scale": False, "wd_on_output": True}
_CONV_ONLY = ("conv_dim", "conv_alpha", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp")
_REFUSED: dict[str, str] = {
    "preset": "LyCORIS's named presets target SD/SDXL class names; use apply_preset.target_module or flux_lora_target",
    "name_algo_map": "name-based targeting is not supported; use apply_preset.target_module or flux_lora_target",
    "target_name": "name-based targeting is not supported; use apply_preset.target_module or flux_lora_target",
    "exclude_name": "name-based targeting is not supported; use apply_preset.target_module or flux_lora_target",
    "use_fnmatch": "name-based targeting is not supported; use apply_preset.target_module or flux_lora_target",
    "lora_prefix": "the saved key names are ComfyUI's (trainer/lokr_keys.py)",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class LokrOptions:
    """The LyCORIS LokrModule settings one layer is planned with."""

    dim: int
    """linear_dim: the rank of a decomposed factor."""
    alpha: float
    """linear_alpha (0: equal to dim)."""
    factor: int = -1
    full_matrix: bool = False
    decompose_both: bool = False
    unbalanced_factorization: bool = False
    rs_lora: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class LycorisSpec:
    """lycoris_config as read and checked (LoraConfig.lycoris)."""

    path: str
    """The file, for messages."""
    algo: str
    options: LokrOptions
    target_classes: tuple[str, ...] | None
    """apply_preset.target_module; None: flux_lora_target chooses the layers."""
    class_options: tuple[tuple[str, LokrOptions], ...] = ()
    """apply_preset.module_algo_map: per FLUX.2 class, the options of the layers inside it."""
    document: str = "{}"
    """The file's JSON (compact), saved in the LoKr file's metadata."""

    def options_for(self, module_name: str, classes: dict[str, str]) -> LokrOptions:
        """The options of a layer: those of its innermost ancestor class in module_algo_map, else the file's."""
        overrides = dict(self.class_options)
        parts = module_name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            cls = classes.get(".".join(parts[:end]))
            if cls in overrides:
                return overrides[cls]
        return self.options


# ---------------------------------------------------------------------------------------------------------------
# Reading lycoris_config


def lycoris_settings(lora: Any) -> LycorisSpec | None:
    """LoraConfig's LyCORIS settings checked (called from its __post_init__ with the unresolved lora_alpha):
    the file read when lora_type is "lycoris", warnings for settings the chosen type ignores."""
    if lora.lora_type == "standard":
        if lora.lycoris_config is not None:
            log.warning("config: lycoris_config=%s has no effect because lora_type is 'standard'; set lora_type "
                        "'lycoris' to train a LoKr.", lora.lycoris_config)
        if lora.init_lokr_norm is not None:
            log.warning("config: init_lokr_norm=%r has no effect because lora_type is 'standard'.", lora.init_lokr_norm)
        return None
    if lora.lycoris_config is None:
        raise ValueError('lora_type "lycoris" needs lycoris_config: the path of a LyCORIS JSON such as {"algo": "lokr", '
                         '"multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16} (SimpleTuner\'s '
                         "documentation/LYCORIS.md).")
    spec = read_lycoris_config(Path(lora.lycoris_config))
    if spec.target_classes is not None and lora.target != "all":
        raise ValueError(f"lycoris_config {spec.path}: apply_preset.target_module {list(spec.target_classes)} and "
                         f"flux_lora_target {lora.target!r} both choose the adapted layers; keep one (remove "
                         "flux_lora_target, or target_module to use the preset).")
    ignored = [("lora_rank", lora.rank != 16), ("lora_alpha", lora.alpha is not None),
               ("lora_dropout", lora.dropout != 0.1), ("lora_init_type", lora.init != "default")]
    for key, changed in ignored:
        if changed:
            log.warning("config: %s has no effect with lora_type 'lycoris': the LoKr's rank and alpha are linear_dim "
                        "and linear_alpha in %s.", key, spec.path)
    if lora.init_lokr_norm is not None:
        check_init_lokr_norm_fits(spec)
    return spec


def read_lycoris_config(path: Path) -> LycorisSpec:
    """The LoKr described by a SimpleTuner lycoris_config file; ValueError naming the file and field otherwise."""
    where = f"lycoris_config {path}"
    if not path.is_file():
        raise ValueError(f"{where} {'is a folder' if path.is_dir() else 'does not exist'}; give the path of the "
                         "LyCORIS JSON file (relative paths are read from the working directory, as SimpleTuner does).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} cannot be read as UTF-8 JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object of LyCORIS settings, got {type(data).__name__}.")
    algo = data.get("algo")
    if algo is None:
        raise ValueError(f"{where}: field 'algo' is missing; give \"algo\": \"lokr\" (LyCORIS itself would default to "
                         "'lora'; for a LoRA use lora_type 'standard').")
    if not isinstance(algo, str) or algo.lower() not in LYCORIS_ALGOS:
        raise ValueError(f"{where}: field 'algo' is {algo!r}; this trainer trains LyCORIS 'lokr' only (use lora_type "
                         "'standard' for a LoRA).")
    multiplier = data.get("multiplier", 1)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier != 1:
        raise ValueError(f"{where}: field 'multiplier' is {multiplier!r}; only 1 is supported (SimpleTuner truncates "
                         "it to a whole number, so other values train another strength or nothing). Set strength when "
                         "applying the LoKr instead.")
    for key in ("linear_dim", "linear_alpha"):
        if key not in data:
            raise ValueError(f"{where}: field {key!r} is missing; SimpleTuner's LyCORIS configs set multiplier, "
                             "linear_dim and linear_alpha (e.g. 10000 and 1 for full LoKr factors).")
    options = _options(data, where=where, dim_key="linear_dim", alpha_key="linear_alpha", defaults=None)
    for key, value in data.items():
        if key in ("algo", "multiplier", "linear_dim", "linear_alpha", "apply_preset", "bypass_mode") \
                or key in _OPTION_DEFAULTS:
            continue
        _check_other_field(key, value, where=where)
    if data.get("bypass_mode") not in (None, False, True):
        raise ValueError(f"{where}: field 'bypass_mode' must be true or false, got {data['bypass_mode']!r}.")
    if data.get("bypass_mode"):
        log.info("%s: bypass_mode only changes how LyCORIS computes the same delta; PEFT's LoKr layer builds the "
                 "delta weight (with gradient_checkpointing only one block's deltas are held at a time).", where)
    targets, class_options = _apply_preset(data.get("apply_preset"), options, where=where)
    return LycorisSpec(path=str(path), algo=algo.lower(), options=options, target_classes=targets,
                       class_options=class_options, document=json.dumps(data, sort_keys=True, separators=(",", ":")))


def _options(data: dict, *, where: str, dim_key: str, alpha_key: str, defaults: LokrOptions | None) -> LokrOptions:
    """LokrOptions from the fields of `data` (the file's top level, or a module_algo_map entry over `defaults`)."""
    values = dataclasses.asdict(defaults) if defaults is not None else {"dim": None, "alpha": None, **_OPTION_DEFAULTS}
    if dim_key in data:
        dim = data[dim_key]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{where}: field {dim_key!r} must be a whole number >= 1, got {dim!r}.")
        values["dim"] = dim
    if alpha_key in data:
        alpha = data[alpha_key]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"{where}: field {alpha_key!r} must be a number >= 0, got {alpha!r}.")
        if defaults is None and alpha != int(alpha):
            raise ValueError(f"{where}: field {alpha_key!r} is {alpha!r}; SimpleTuner truncates it to a whole number "
                             f"(int() gives {int(alpha)}), so give a whole number.")
        if defaults is None or alpha:  # LyCORIS: a module_algo_map alpha of 0 means the network's alpha
            values["alpha"] = float(alpha)
    if "factor" in data:
        factor = data["factor"]
        if isinstance(factor, bool) or not isinstance(factor, int):
            raise ValueError(f"{where}: field 'factor' must be a whole number (-1: the split closest to square), got "
                             f"{factor!r}.")
        values["factor"] = factor
    for key in ("full_matrix", "decompose_both", "unbalanced_factorization", "rs_lora"):
        if key in data:
            if not isinstance(data[key], bool):
                raise ValueError(f"{where}: field {key!r} must be true or false, got {data[key]!r}.")
            values[key] = data[key]
    return LokrOptions(**values)


def _check_other_field(key: str, value: Any, *, where: str) -> None:
    """A top-level field that is no LoKr option: accepted when it has no effect here, refused otherwise."""
    if key in _CONV_ONLY:
        kind = (int, float) if key in ("conv_dim", "conv_alpha") else bool
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: field {key!r} must be {'a number' if kind is not bool else 'true or false'}, "
                             f"got {value!r}.")
        log.warning("%s: field %r has no effect: it configures convolutions, and every FLUX.2 layer LoKr adapts is a "
                    "Linear.", where, key)
        return
    if key in _OFF_ONLY:
        default = _OFF_ONLY[key]
        off = value is default if isinstance(default, bool) else (
            value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == default))
        if not off:
            raise ValueError(f"{where}: field {key!r} is {value!r}; this trainer implements it only at LyCORIS's "
                             f"default {_OFF_ONLY[key]!r} (PEFT's LoKr layer has no such option). Remove it.")
        return
    reason = _REFUSED.get(key, "it is not a LyCORIS LoKr setting this trainer implements")
    supported = sorted({"algo", "multiplier", "linear_dim", "linear_alpha", "apply_preset", "bypass_mode",
                        *_OPTION_DEFAULTS})
    raise ValueError(f"{where}: field {key!r} is not supported: {reason}. Supported fields: {', '.join(supported)}. "
                     "Remove it.")


def _check_class(name: Any, *, where: str, field: str) -> str:
    if name in FLUX2_CLASSES:
        return name
    hint = (" 'Attention' and 'FeedForward' are the generic diffusers classes of other models and match no FLUX.2 "
            "layer, so LyCORIS would adapt nothing there." if name in ("Attention", "FeedForward") else "")
    raise ValueError(f"{where}: {field} names {name!r}, which is no FLUX.2 module class; use "
                     f"{', '.join(FLUX2_CLASSES)}.{hint}")


def _apply_preset(preset: Any, options: LokrOptions, *, where: str) -> tuple[tuple[str, ...] | None, tuple]:
    if preset is None or preset == {}:
        return None, ()
    if not isinstance(preset, dict):
        raise ValueError(f"{where}: field 'apply_preset' must be an object like {{\"target_module\": [...]}}.")
    for key in preset:
        if key == "enable_conv":
            if not isinstance(preset[key], bool):
                raise ValueError(f"{where}: field 'apply_preset.enable_conv' must be true or false, got {preset[key]!r}.")
            log.warning("%s: apply_preset.enable_conv has no effect: every FLUX.2 layer LoKr adapts is a Linear.", where)
        elif key not in ("target_module", "module_algo_map"):
            reason = _REFUSED.get(key, "not a preset setting this trainer implements")
            raise ValueError(f"{where}: field 'apply_preset.{key}' is not supported ({reason}); apply_preset may hold "
                             "target_module and module_algo_map. Remove it.")
    targets = None
    if "target_module" in preset:
        raw = preset["target_module"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: apply_preset.target_module must be a non-empty list of FLUX.2 classes "
                             f"({', '.join(FLUX2_CLASSES)}).")
        targets = tuple(dict.fromkeys(_check_class(c, where=where, field="apply_preset.target_module") for c in raw))
    mapping = preset.get("module_algo_map", {})
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: apply_preset.module_algo_map must be an object {{class: {{\"factor\": n}}}}.")
    per_class = []
    for cls, entry in mapping.items():
        field = f"apply_preset.module_algo_map.{cls}"
        _check_class(cls, where=where, field="apply_preset.module_algo_map")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {field} must be an object of LoKr settings such as {{\"factor\": 4}}.")
        allowed = {"algo", "dim", "alpha", *_OPTION_DEFAULTS}
        for key in entry:
            if key not in allowed:
                raise ValueError(f"{where}: field '{field}.{key}' is not supported; a module_algo_map entry may set "
                                 f"{', '.join(sorted(allowed))}. Remove it.")
        if "algo" in entry and (not isinstance(entry["algo"], str) or entry["algo"].lower() != "lokr"):
            raise ValueError(f"{where}: field '{field}.algo' is {entry['algo']!r}; only 'lokr' is trained.")
        per_class.append((cls, _options(entry, where=f"{where}: {field}", dim_key="dim", alpha_key="alpha",
                                        defaults=options)))
    return targets, tuple(per_class)


# ---------------------------------------------------------------------------------------------------------------
# LyCORIS's rules for one Linear


def factorize(dimension: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into (small, large), small * large == dimension.

    A positive factor that divides the dimension is used as it is (the pair ordered small first). Otherwise the
    small part is the largest divisor not above sqrt(dimension) and not above the factor (-1: no limit).
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return min(factor, other), max(factor, other)
    limit = dimension if factor < 0 else factor
    best, d = 1, 1
    while d * d <= dimension:
        if dimension % d == 0 and d <= limit:
            best = d
        d += 1
    return best, dimension // best


@dataclass(frozen=True, kw_only=True, slots=True)
class LokrPlan:
    """The factors of one layer's LoKr: w1 is (out_split[0] x in_split[0]), w2 (out_split[1] x in_split[1])."""

    out_split: tuple[int, int]
    in_split: tuple[int, int]
    rank: int
    """Rank of a decomposed factor (linear_dim)."""
    w1_decomposed: bool
    w2_decomposed: bool
    scale: float
    """delta = scale * kron(w1, w2)."""

    @property
    def full(self) -> bool:
        return not self.w1_decomposed and not self.w2_decomposed


def plan_lokr(out_features: int, in_features: int, options: LokrOptions) -> LokrPlan:
    """LyCORIS LokrModule's shapes and scale for a Linear (out_features x in_features)."""
    in_m, in_n = factorize(in_features, options.factor)
    out_l, out_k = factorize(out_features, options.factor)
    if options.unbalanced_factorization:
        out_l, out_k = out_k, out_l
    dim = options.dim
    w1_low = options.decompose_both and not options.full_matrix and dim < max(out_l, in_m) / 2
    w2_low = not options.full_matrix and dim < max(out_k, in_n) / 2
    alpha = options.alpha or dim  # LyCORIS: alpha 0 (or none) means alpha = dim
    if not w1_low and not w2_low:
        alpha = dim  # LyCORIS: nothing decomposed, scale 1
    return LokrPlan(out_split=(out_l, out_k), in_split=(in_m, in_n), rank=dim, w1_decomposed=w1_low,
                    w2_decomposed=w2_low, scale=alpha / (math.sqrt(dim) if options.rs_lora else dim))


def check_init_lokr_norm_fits(spec: LycorisSpec) -> None:
    """init_lokr_norm sets lokr_w1 and lokr_w2 (SimpleTuner): refuse options that would decompose a factor of some
    FLUX.2 layer. Checked once more per layer by apply_lokr."""
    for cls, opts in ((None, spec.options), *spec.class_options):
        where = f"lycoris_config {spec.path}" + (f" (module_algo_map.{cls})" if cls else "")
        if opts.decompose_both and not opts.full_matrix:
            raise ValueError(f"init_lokr_norm needs full LoKr factors, but {where} sets decompose_both; remove it "
                             "or set full_matrix true.")


# ---------------------------------------------------------------------------------------------------------------
# The model


def lokr_target_modules(transformer: torch.nn.Module, *, spec: LycorisSpec, preset: str) -> list[str]:
    """The Linear layers the LoKr adapts, in model order: every Linear inside apply_preset's target classes, or
    flux_lora_target's preset."""
    import torch

    if spec.target_classes is None:
        return lora_target_modules(transformer, preset=preset)
    names = [f"{name}.{child}" for name, module in transformer.named_modules()
             if type(module).__name__ in spec.target_classes
             for child, leaf in module.named_modules() if child and isinstance(leaf, torch.nn.Linear)]
    order = {name: i for i, (name, _) in enumerate(transformer.named_modules())}
    return sorted(set(names), key=order.__getitem__)


def qkv_groups(names: list[str]) -> list[list[str]]:
    """The adapted layers that share w2: each double block's q/k/v (image, then text stream) together, every other
    layer alone; a partly adapted q/k/v group is refused (its fused BFL layer could not hold it)."""
    present = set(names)
    grouped: set[str] = set()
    groups = []
    for name in names:
        if name in grouped:
            continue
        block, _, layer = name.partition(".attn.")
        for triple in _QKV_GROUPS:
            if name.startswith("transformer_blocks.") and f"attn.{layer}" in triple:
                members = [f"{block}.{t}" for t in triple]
                if not present.issuperset(members):
                    raise ValueError(f"LoKr adapts {sorted(present & set(members))} but not all of {members}: BFL "
                                     "fuses them into one qkv layer, so LoKr adapts all three or none.")
                groups.append(members)
                grouped.update(members)
                break
        else:
            groups.append([name])
    return groups


def apply_lokr(transformer: torch.nn.Module, *, spec: LycorisSpec, preset: str,
               init_lokr_norm: float | None = None) -> dict[str, LokrPlan]:
    """Freeze the base model and add PEFT LoKr layers named "default" with LyCORIS's shapes, scale and init (w1
    Kaiming-uniform, w2 zero: the model starts unchanged); q/k/v of a stream share w2. Returns each layer's plan.

    Draws from the global generator: seed it identically on every rank (as for LoRA)."""
    from peft import LoKrConfig, inject_adapter_in_model

    targets = lokr_target_modules(transformer, spec=spec, preset=preset)
    if not targets:
        raise ValueError(f"lycoris_config {spec.path}: the LoKr adapts no layer of this model.")
    classes = {name: type(module).__name__ for name, module in transformer.named_modules()}
    plans = {}
    for name in targets:
        module = transformer.get_submodule(name)
        plans[name] = plan_lokr(module.out_features, module.in_features, spec.options_for(name, classes))
        if init_lokr_norm is not None and not plans[name].full:
            raise ValueError(f"init_lokr_norm needs full LoKr factors, but {name} ({module.out_features} x "
                             f"{module.in_features}) gets a decomposed one with {spec.path}'s linear_dim; raise "
                             "linear_dim or set full_matrix true (SimpleTuner's code reads lokr_w1 and lokr_w2).")
    transformer.requires_grad_(False)
    # PEFT wraps the layers (rank 1: a placeholder); set_lokr_factors then gives them LyCORIS's factors.
    inject_adapter_in_model(LoKrConfig(r=1, alpha=1, target_modules=targets), transformer, adapter_name=ADAPTER_NAME)
    for group in qkv_groups(targets):
        shared = None
        for name in group:
            layer = transformer.get_submodule(name)
            plan = plans[name]
            device = layer.get_base_layer().weight.device
            set_lokr_factors(layer, ADAPTER_NAME, _init_factors(plan, device=device, shared=shared), scale=plan.scale,
                             rank=plan.rank)
            shared = {k: getattr(layer, k)[ADAPTER_NAME] for k in ("lokr_w2", "lokr_w2_a", "lokr_w2_b")
                      if ADAPTER_NAME in getattr(layer, k)}
    adapted = adapted_lokr_names(transformer)
    assert adapted == set(targets), f"PEFT adapted {sorted(adapted ^ set(targets))} unexpectedly"
    return plans


def _init_factors(plan: LokrPlan, *, device, shared: dict | None) -> dict:
    """LyCORIS's initial factors: w1 (or w1_a, w1_b) Kaiming-uniform, w2 zero (decomposed: w2_a Kaiming, w2_b zero);
    `shared`: w2 Parameters to reuse (q/k/v)."""
    import torch

    def kaiming(rows: int, cols: int) -> torch.Tensor:
        t = torch.empty(rows, cols, device=device)
        torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        return t

    (l, k), (m, n), r = plan.out_split, plan.in_split, plan.rank
    factors: dict = {}
    if plan.w1_decomposed:
        factors["lokr_w1_a"], factors["lokr_w1_b"] = kaiming(l, r), kaiming(r, m)
    else:
        factors["lokr_w1"] = kaiming(l, m)
    if shared:
        factors.update(shared)
    elif plan.w2_decomposed:
        factors["lokr_w2_a"], factors["lokr_w2_b"] = kaiming(k, r), torch.zeros(r, n, device=device)
    else:
        factors["lokr_w2"] = torch.zeros(k, n, device=device)
    return factors


def set_lokr_factors(layer: Any, adapter_name: str, factors: dict, *, scale: float, rank: int = 1) -> None:
    """Give a PEFT LoKr layer's adapter exactly these factors (tensors become Parameters; Parameters are used as
    they are, so a shared one stays shared) and delta scale `scale`; strengths multiply it (LycorisLayer.set_scale).
    """
    import torch

    unknown = set(factors) - set(LOKR_FACTORS)
    if unknown:
        raise ValueError(f"set_lokr_factors: unknown LoKr factors {sorted(unknown)}; expected {LOKR_FACTORS}.")
    w1 = factors.get("lokr_w1")
    w1 = w1 if w1 is not None else factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    w2 = factors.get("lokr_w2")
    w2 = w2 if w2 is not None else factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    base = layer.get_base_layer()
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != (base.out_features, base.in_features):
        raise ValueError(f"LoKr factors w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} make a {w1.shape[0] * w2.shape[0]}"
                         f" x {w1.shape[1] * w2.shape[1]} delta; this layer is {base.out_features} x {base.in_features}.")
    for attr in LOKR_FACTORS + ("lokr_t2",):
        table = getattr(layer, attr)
        if adapter_name in table:
            del table[adapter_name]
    for attr, value in factors.items():
        param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value)
        getattr(layer, attr)[adapter_name] = param
    layer.r[adapter_name] = rank
    layer.alpha[adapter_name] = scale * rank
    layer.scaling[adapter_name] = scale


def adapted_lokr_names(transformer: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> set[str]:
    """Names of the modules that carry a LoKr adapter of this name."""
    from peft.tuners.lokr import LoKrLayer

    return {name for name, module in transformer.named_modules()
            if isinstance(module, LoKrLayer) and adapter_name in module._available_adapters}


def lokr_scales(transformer: torch.nn.Module) -> dict[str, float]:
    """{module name: delta scale} of the "default" LoKr adapter (what trainer/lokr_keys.py saves with)."""
    from peft.tuners.lokr import LoKrLayer

    return {name: float(module.scaling[ADAPTER_NAME]) for name, module in transformer.named_modules()
            if isinstance(module, LoKrLayer) and ADAPTER_NAME in module.scaling}


def apply_init_lokr_norm(transformer: torch.nn.Module, *, scale: float, seed: int) -> None:
    """SimpleTuner's init_lokr_norm on the loaded model (after the base weights are read; under FSDP2 every rank
    must call it: each base weight is gathered once). The draws come from a generator seeded with `seed`, the same
    on every rank."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    names = sorted(adapted_lokr_names(transformer), key={n: i for i, (n, _) in
                                                         enumerate(transformer.named_modules())}.__getitem__)
    with torch.no_grad():
        for group in qkv_groups(names):
            layers = [transformer.get_submodule(name) for name in group]
            if any(ADAPTER_NAME not in layer.lokr_w1 or ADAPTER_NAME not in layer.lokr_w2 for layer in layers):
                raise ValueError(f"init_lokr_norm needs full LoKr factors; {group[0]} has a decomposed one.")
            bases = [layer.get_base_layer() for layer in layers]  # int8-torchao's int8 weights: with their scales
            mean, std = _weight_stats([getattr(b, "dequantized_weight", lambda: b.weight)() for b in bases])
            w2 = layers[0].lokr_w2[ADAPTER_NAME]
            z = torch.randn(tuple(w2.shape), generator=generator, dtype=torch.float64)
            value = ((z - z.mean()) / z.std() * std + mean) * scale
            _assign(w2, value)
            for layer in layers:
                _assign(layer.lokr_w1[ADAPTER_NAME], torch.ones(tuple(layer.lokr_w1[ADAPTER_NAME].shape)))


def _weight_stats(weights: list) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation over all elements of the weights, in float64, row chunk by chunk; a
    sharded weight (DTensor) is gathered, a quantized one dequantized."""
    import torch

    total = squares = 0.0
    count = 0
    for weight in weights:
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
        if hasattr(weight, "dequantize"):
            weight = weight.dequantize()
        for chunk in torch.split(weight.detach(), 1024):
            chunk = chunk.double()
            total += float(chunk.sum())
            squares += float((chunk * chunk).sum())
        count += weight.numel()
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return mean, math.sqrt(variance)


def _assign(param, value) -> None:
    """Write a full value into a parameter, sharded (DTensor: each rank keeps its shard) or not."""
    value = value.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)
