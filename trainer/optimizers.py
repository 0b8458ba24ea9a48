"""The optimizer concept: its settings, the learning-rate schedule, and building both for the LoRA weights.

OptimizerConfig and ScheduleConfig are TrainConfig's `optim` and `schedule` groups (declared here, next to the
code that reads them; trainer/config.py assembles them). Imports nothing heavier than torch, as config.py.

Optimizers, with SimpleTuner's names and defaults (its helpers/training/optimizer_param.py):
- "adamw": torch.optim.AdamW over fp32 LoRA weights, with the adam_* keys (this trainer's own default).
- "adamw_bf16": AdamWBF16 below, built in: bf16 LoRA weights, each update added with Kahan summation.
- "optimi-lion": torch-optimi's Lion (optional package torch-optimi).
- "prodigy": ProdigyPlusScheduleFree (optional package prodigy-plus-schedule-free): Prodigy's adaptive step size with
  Schedule-Free averaging. Its weights for validation and the saved LoRA are the averaged ones (optimizer.eval()),
  training runs on the others: evaluation_weights() switches around validation and the final save.
The three SimpleTuner optimizers take betas from optimizer_beta1/optimizer_beta2 and their other settings from
optimizer_config ("key=value,key2=value2"), as SimpleTuner does; each key is declared below with its type and range,
and any other key is refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch

from .settings import check_fields, check_range, setting

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "adamw_bf16", "optimi-lion", "prodigy"]
SchedulerName = Literal["constant", "constant_with_warmup", "cosine", "linear", "polynomial", "cosine_with_restarts",
                        "sine"]


@dataclass(frozen=True, slots=True)
class Kwarg:
    """One optimizer_config key: its type, range and what it does."""

    kind: type
    """float, int or bool."""
    doc: str
    nullable: bool = False
    """The value may be "none" (passed as None)."""
    ge: float | None = None
    gt: float | None = None
    lt: float | None = None


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """What building one optimizer needs: its class, SimpleTuner's defaults and the optimizer_config keys it takes."""

    target: str
    """"module:Class" of the optimizer."""
    pip: str | None
    """The pip package that provides it; None: built in."""
    defaults: dict[str, Any]
    """SimpleTuner's default settings (betas as a pair), before optimizer_beta1/2 and optimizer_config."""
    kwargs: dict[str, Kwarg]
    """optimizer_config keys this optimizer takes."""
    refused: dict[str, str]
    """optimizer_config keys the optimizer has but this trainer refuses: key -> why."""
    lora_dtype: torch.dtype = torch.float32
    """dtype of the trained LoRA weights."""


_WD = Kwarg(float, "decoupled weight decay", ge=0)
_FP32_WEIGHTS = "the LoRA weights are fp32 with this optimizer, and it rounds only bf16 weights"
_ONE_GROUP = "the LoRA weights are one parameter group"
SPECS: dict[str, OptimizerSpec] = {
    "adamw_bf16": OptimizerSpec(
        target=f"{__name__}:AdamWBF16", pip=None,
        defaults={"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6},
        kwargs={"weight_decay": _WD, "eps": Kwarg(float, "denominator epsilon", gt=0)},
        refused={}, lora_dtype=torch.bfloat16),
    "optimi-lion": OptimizerSpec(
        target="optimi:Lion", pip="torch-optimi",
        defaults={"betas": (0.9, 0.99), "weight_decay": 0.0},
        kwargs={"weight_decay": _WD,
                "decouple_lr": Kwarg(bool, "fully decoupled weight decay: decay not multiplied by the learning rate"),
                "max_lr": Kwarg(float, "the largest scheduled learning rate, for decouple_lr (none: learning_rate)",
                                nullable=True, gt=0)},
        refused={"kahan_sum": _FP32_WEIGHTS,
                 "foreach": "torch-optimi picks its implementation (its foreach switch is deprecated)",
                 "triton": "torch-optimi picks its implementation",
                 "gradient_release": "the optimizer steps after the whole backward (gradient accumulation, clipping)"}),
    "prodigy": OptimizerSpec(
        target="prodigyplus.prodigy_plus_schedulefree:ProdigyPlusScheduleFree", pip="prodigy-plus-schedule-free",
        defaults={"lr": 1.0, "betas": (0.9, 0.99), "beta3": None, "weight_decay": 0.0, "weight_decay_by_lr": True,
                  "use_bias_correction": False, "d0": 1e-6, "d_coef": 1.0, "prodigy_steps": 0, "use_speed": False,
                  "eps": 1e-8, "factored": True, "factored_fp32": True, "use_stableadamw": True,
                  "use_cautious": False, "use_grams": False, "use_adopt": False},
        kwargs={"lr": Kwarg(float, "multiplier on Prodigy's adapted step size (SimpleTuner: 1.0)", gt=0),
                "beta3": Kwarg(float, "decay of Prodigy's step-size estimate (none: sqrt(beta2))", nullable=True,
                               ge=0, lt=1),
                "weight_decay": _WD,
                "weight_decay_by_lr": Kwarg(bool, "multiply weight decay by the adapted learning rate"),
                "use_bias_correction": Kwarg(bool, "RAdam-style bias correction: a built-in warm-up"),
                "d0": Kwarg(float, "initial step-size estimate", gt=0),
                "d_coef": Kwarg(float, "coefficient on the step-size estimate", gt=0),
                "d_limiter": Kwarg(bool, "limit the step-size growth per step"),
                "prodigy_steps": Kwarg(int, "freeze the step size after this many steps (0: never)", ge=0),
                "schedulefree_c": Kwarg(float, "Schedule-Free averaging strength (0: the original rule)", ge=0),
                "eps": Kwarg(float, "denominator epsilon (none: Adam-atan2)", nullable=True, gt=0),
                "factored": Kwarg(bool, "factored (Adafactor-like) second moment"),
                "factored_fp32": Kwarg(bool, "keep the factored second moment in fp32"),
                "use_stableadamw": Kwarg(bool, "StableAdamW update clipping"),
                "use_schedulefree": Kwarg(bool, "Schedule-Free averaging (false: plain Prodigy)"),
                "use_speed": Kwarg(bool, "SPEED step-size estimate"),
                "use_cautious": Kwarg(bool, "cautious updates"),
                "use_grams": Kwarg(bool, "Grams updates"),
                "use_adopt": Kwarg(bool, "ADOPT-style second-moment order"),
                "use_orthograd": Kwarg(bool, "OrthoGrad updates"),
                "use_focus": Kwarg(bool, "FOCUS updates")},
        refused={"stochastic_rounding": _FP32_WEIGHTS, "split_groups": _ONE_GROUP, "split_groups_mean": _ONE_GROUP,
                 "fused_back_pass": "the optimizer steps after the whole backward (no fused backward pass)",
                 "use_muon_pp": "prodigy-plus-schedule-free 2.x has no Muon"}),
}
"""The SimpleTuner optimizers; "adamw" (torch AdamW with the adam_* keys) needs no entry."""


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    optimizer: OptimizerName = setting("optimizer", "adamw")
    """"adamw": torch.optim.AdamW over fp32 LoRA weights with the adam_* keys (this trainer's default).
    "adamw_bf16": AdamW over bf16 LoRA weights, built in (SimpleTuner's bf16 AdamW): each update is added with Kahan
    summation (a bf16 compensation buffer keeps what bf16 rounding drops, so updates smaller than bf16's resolution
    still add up; deterministic, so resume is exact), moments in fp32; defaults betas (0.9, 0.999), weight_decay 1e-2,
    eps 1e-6. "optimi-lion": torch-optimi's Lion (pip install torch-optimi); defaults betas (0.9, 0.99), weight_decay 0.
    "prodigy": prodigy-plus-schedule-free's ProdigyPlusScheduleFree (pip install prodigy-plus-schedule-free) with
    SimpleTuner's defaults: its own lr multiplier 1.0 (learning_rate is not used), betas (0.9, 0.99); validation
    images and the saved LoRA use its Schedule-Free averaged weights. Refused with distributed 'fsdp2' over several
    processes (its step-size statistics are per-rank sums there); use 'ddp'."""
    learning_rate: float = setting("learning_rate", 1e-4, gt=0)
    """Peak learning rate. > 0. Not used by prodigy (SimpleTuner's too), which adapts its own: scale it with
    optimizer_config lr=..."""
    adam_beta1: float = setting("adam_beta1", 0.9, ge=0, lt=1)
    """AdamW first-moment decay ('adamw' only). In [0, 1)."""
    adam_beta2: float = setting("adam_beta2", 0.999, ge=0, lt=1)
    """AdamW second-moment decay ('adamw' only). In [0, 1)."""
    adam_weight_decay: float = setting("adam_weight_decay", 1e-2, ge=0.0)
    """AdamW decoupled weight decay ('adamw' only). >= 0."""
    adam_epsilon: float = setting("adam_epsilon", 1e-8, gt=0)
    """AdamW denominator epsilon ('adamw' only). > 0."""
    optimizer_beta1: float | None = setting("optimizer_beta1", None, ge=0, lt=1)
    """First beta of adamw_bf16, optimi-lion and prodigy (SimpleTuner's key; with optimizer_beta2). In [0, 1);
    null keeps the optimizer's default. For 'adamw' use adam_beta1."""
    optimizer_beta2: float | None = setting("optimizer_beta2", None, ge=0, lt=1)
    """Second beta of adamw_bf16, optimi-lion and prodigy (with optimizer_beta1). In [0, 1); null: the default."""
    optimizer_config: str | None = setting("optimizer_config", None, empty_means_null=True)
    """Extra settings of adamw_bf16, optimi-lion or prodigy, SimpleTuner's "key=value,key2=value2" (e.g.
    "d_coef=0.5,use_bias_correction=true"). adamw_bf16: weight_decay, eps. optimi-lion: weight_decay, decouple_lr,
    max_lr. prodigy: lr, beta3, weight_decay, weight_decay_by_lr, use_bias_correction, d0, d_coef, d_limiter,
    prodigy_steps, schedulefree_c, eps, factored, factored_fp32, use_stableadamw, use_schedulefree, use_speed,
    use_cautious, use_grams, use_adopt, use_orthograd, use_focus. Any other key is refused."""
    prodigy_steps: int | None = setting("prodigy_steps", None, ge=0)
    """prodigy: freeze its adapted step size after this many steps (0: adapt throughout; SimpleTuner's key). >= 0."""
    max_grad_norm: float = setting("max_grad_norm", 2.0, ge=0.0)
    """Clip the global gradient norm (torch clip_grad_norm_) to this value; 0 disables clipping. >= 0.
    SimpleTuner's default grad_clip_method "value" clips each element instead; this trainer clips the norm."""

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.optimizer_beta1 is None) != (self.optimizer_beta2 is None):
            raise ValueError("optimizer_beta1 and optimizer_beta2 are set together (SimpleTuner's rule); give both, "
                             "or neither for the optimizer's default betas.")
        if self.optimizer == "adamw":
            given = [k for k in ("optimizer_beta1", "optimizer_config", "prodigy_steps")
                     if object.__getattribute__(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]} is set but optimizer 'adamw' takes adam_beta1, adam_beta2, "
                                 "adam_weight_decay and adam_epsilon; use those, or choose adamw_bf16, optimi-lion or "
                                 "prodigy, which take optimizer_beta1/optimizer_beta2 and optimizer_config.")
            return
        if self.prodigy_steps is not None and self.optimizer != "prodigy":
            raise ValueError(f"prodigy_steps is set but the optimizer is {self.optimizer!r}; remove it.")
        self.optimizer_kwargs()  # refuses bad optimizer_config keys and values now, not at the first step
        self._warn_unused()

    @property
    def lora_dtype(self) -> torch.dtype:
        """dtype of the trained LoRA weights: bf16 for adamw_bf16, else fp32."""
        return SPECS[self.optimizer].lora_dtype if self.optimizer in SPECS else torch.float32

    @property
    def base_lr(self) -> float:
        """The learning rate the schedule scales: learning_rate, or prodigy's own lr multiplier."""
        return float(self.optimizer_kwargs()["lr"]) if self.optimizer == "prodigy" else self.learning_rate

    @property
    def schedule_free(self) -> bool:
        """Whether the optimizer trains on other weights than those it evaluates (prodigy's Schedule-Free)."""
        return self.optimizer == "prodigy" and bool(self.optimizer_kwargs().get("use_schedulefree", True))

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the optimizer's class (without params): SimpleTuner's defaults, then
        optimizer_beta1/2, optimizer_config and prodigy_steps; lr is learning_rate except for prodigy."""
        if self.optimizer == "adamw":
            return {"lr": self.learning_rate, "betas": (self.adam_beta1, self.adam_beta2),
                    "weight_decay": self.adam_weight_decay, "eps": self.adam_epsilon}
        spec = SPECS[self.optimizer]
        kwargs = {"lr": self.learning_rate, **spec.defaults}
        if self.optimizer_beta1 is not None:
            kwargs["betas"] = (self.optimizer_beta1, self.optimizer_beta2)
        extra = parse_optimizer_config(self.optimizer_config, optimizer=self.optimizer)
        if self.prodigy_steps is not None:
            if "prodigy_steps" in extra:
                raise ValueError("prodigy_steps is given twice, as a key and in optimizer_config; keep one.")
            extra["prodigy_steps"] = self.prodigy_steps
        return kwargs | extra

    def check_installed(self) -> None:
        """Refuse an optimizer whose package is not installed, or whose installed version lacks a setting (asked
        before any weights load: at launch and at the trainer's start)."""
        if self.optimizer not in SPECS:
            return
        spec = SPECS[self.optimizer]
        module = spec.target.split(":")[0]
        if spec.pip is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            raise ValueError(f"optimizer {self.optimizer!r} needs the Python package {spec.pip!r}, which is not "
                             f"installed: pip install {spec.pip} (in the Python that runs the trainer), or choose "
                             "optimizer 'adamw' or 'adamw_bf16'.")
        cls = _optimizer_class(spec)
        accepted = set(inspect.signature(cls.__init__).parameters)
        unknown = sorted(set(self.optimizer_kwargs()) - accepted)
        if unknown:
            raise ValueError(f"optimizer {self.optimizer!r}: the installed {spec.pip or 'class'} does not take "
                             f"{unknown}; install the version this trainer is tested with (see requirements-test.txt).")

    def check_processes(self, *, distributed: str, world_size: int | None) -> None:
        """prodigy under FSDP2 over several processes is refused (asked with the process count when known)."""
        if self.optimizer == "prodigy" and distributed == "fsdp2" and world_size is not None and world_size > 1:
            raise ValueError("optimizer 'prodigy' cannot run with distributed 'fsdp2' over several processes: its "
                             "step-size estimate sums over every weight, and each FSDP2 process holds only a shard "
                             "(SimpleTuner patches the package for it). Use distributed 'ddp': LoRA training fits "
                             "each GPU and DDP is faster, or one process.")

    def _warn_unused(self) -> None:
        changed = [f.name for f in dataclasses.fields(self) if f.name.startswith("adam_")
                   and object.__getattribute__(self, f.name) != f.default]
        for name in changed:
            log.warning("config: %s has no effect with optimizer %r (as in SimpleTuner): use optimizer_beta1/"
                        "optimizer_beta2 for the betas and optimizer_config weight_decay=/eps= for the others.",
                        name, self.optimizer)
        if self.optimizer == "prodigy" and self.max_grad_norm > 0:
            log.warning("config: optimizer 'prodigy' with max_grad_norm %r: its authors advise against gradient "
                        "clipping, which hampers its step-size estimate; set max_grad_norm 0 to turn clipping off.",
                        self.max_grad_norm)
        if self.optimizer == "prodigy" and self.learning_rate not in (1e-4, 1.0):
            log.warning("config: learning_rate %r has no effect with optimizer 'prodigy' (as in SimpleTuner): "
                        "Prodigy adapts its step size; scale it with optimizer_config lr=... (default 1.0).",
                        self.learning_rate)


def parse_optimizer_config(text: str | None, *, optimizer: str) -> dict[str, Any]:
    """SimpleTuner's optimizer_config "key=value,key2=value2" as typed keyword arguments of `optimizer`; ValueError
    naming optimizer_config and the key for anything the optimizer does not take or a value out of range."""
    spec = SPECS[optimizer]
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"optimizer_config entry {item.strip()!r} is not key=value; write e.g. "
                             f"'{next(iter(spec.kwargs))}=...' and separate entries with commas.")
        if key in out:
            raise ValueError(f"optimizer_config sets {key!r} twice; keep one.")
        if key not in spec.kwargs:
            raise ValueError(f"optimizer_config key {key!r} is not taken by optimizer {optimizer!r} here: "
                             f"{_why_refused(key, spec)} It takes {sorted(spec.kwargs)}.")
        out[key] = _parse_value(key, raw, spec.kwargs[key])
    return out


def _why_refused(key: str, spec: OptimizerSpec) -> str:
    if key in spec.refused:
        return spec.refused[key] + "."
    if key == "betas":
        return "set the betas with optimizer_beta1 and optimizer_beta2."
    if key == "lr":
        return "set learning_rate."
    return "unknown setting."


def _parse_value(key: str, raw: str, kwarg: Kwarg) -> Any:
    name = f"optimizer_config {key}"
    if kwarg.nullable and raw.lower() == "none":
        return None
    if kwarg.kind is bool:
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, got {raw!r}.")
        return raw.lower() == "true"
    try:
        value = kwarg.kind(raw) if kwarg.kind is int else float(raw)
    except ValueError:
        kind = "a whole number" if kwarg.kind is int else "a number"
        raise ValueError(f"{name} must be {kind}{' or none' if kwarg.nullable else ''}, got {raw!r}.") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}.")
    check_range(name, value, ge=kwarg.ge, gt=kwarg.gt, lt=kwarg.lt)
    return value


def _optimizer_class(spec: OptimizerSpec) -> type[torch.optim.Optimizer]:
    module, name = spec.target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """How long to train and the learning-rate schedule; the field names are lr_lambda's arguments."""

    scheduler: SchedulerName = setting("lr_scheduler", "constant")
    """Learning-rate schedule: "constant" (no warm-up), "constant_with_warmup" (linear warm-up, then constant),
    "cosine" and "linear" (warm-up, then decay to 0 at max_train_steps), "polynomial" (warm-up, then decay to lr_end
    as (1 - progress) ** lr_power, SimpleTuner's), "cosine_with_restarts" (warm-up, then lr_num_cycles cosine
    cycles from the learning rate down to lr_end, each restarting at the top: the meaning SimpleTuner documents; its
    own class, which it flags as misbehaving, holds the rate constant), "sine" (SimpleTuner's: a sine wave between
    lr_end and the learning rate, starting half-way up, with half-period lr_warmup_steps; no separate warm-up)."""
    warmup_steps: int = setting("lr_warmup_steps", 0, ge=0)
    """Optimizer steps of linear warm-up from 0 to learning_rate; for "sine" the half-period of its wave (> 0).
    In [0, max_train_steps]."""
    total_steps: int = setting("max_train_steps", 1000, ge=1)
    """Optimizer steps to train. >= 1."""
    lr_end: float = setting("lr_end", 4e-7, ge=0)
    """The learning rate "polynomial" decays to, and the bottom of "cosine_with_restarts" and "sine". >= 0 and below
    the learning rate the schedule scales (SimpleTuner's default 4e-7)."""
    lr_power: float = setting("lr_power", 0.8, gt=0)
    """Exponent of "polynomial" decay: 1 is linear (SimpleTuner's default 0.8). > 0."""
    lr_num_cycles: int = setting("lr_num_cycles", 1, ge=1)
    """Cosine cycles of "cosine_with_restarts" after the warm-up. >= 1."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"lr_warmup_steps {self.warmup_steps} is more than max_train_steps {self.total_steps}; "
                "the learning rate would never reach learning_rate. Lower lr_warmup_steps."
            )
        if self.scheduler == "sine" and self.warmup_steps == 0:
            raise ValueError("lr_scheduler 'sine' uses lr_warmup_steps as the half-period of its wave (SimpleTuner's "
                             "definition), and it is 0; set lr_warmup_steps > 0, e.g. max_train_steps / 4.")
        unused = {"lr_end": ("polynomial", "cosine_with_restarts", "sine"), "lr_power": ("polynomial",),
                  "lr_num_cycles": ("cosine_with_restarts",)}
        for field in dataclasses.fields(self):
            users = unused.get(field.metadata["setting"].key)
            if users and self.scheduler not in users and object.__getattribute__(self, field.name) != field.default:
                log.warning("config: %s has no effect with lr_scheduler %r (used by %s).",
                            field.metadata["setting"].key, self.scheduler, ", ".join(users))

    def check_base_lr(self, base_lr: float) -> None:
        """lr_end must lie below the learning rate the schedule scales (TrainConfig asks with OptimizerConfig.base_lr)."""
        if self.scheduler in ("polynomial", "cosine_with_restarts", "sine") and not self.lr_end < base_lr:
            raise ValueError(f"lr_end {self.lr_end} must be smaller than the learning rate {base_lr} that "
                             f"lr_scheduler {self.scheduler!r} decays from; lower lr_end.")


def lr_lambda(*, scheduler: str, warmup_steps: int, total_steps: int, lr_end: float = 0.0, lr_power: float = 1.0,
              lr_num_cycles: int = 1, base_lr: float | None = None):
    """Multiplier on the base learning rate at a step (0-based), for torch's LambdaLR. base_lr (the optimizer's
    starting lr) is needed by the schedules that end at lr_end."""
    floor = 0.0
    if scheduler in ("polynomial", "cosine_with_restarts", "sine"):
        if base_lr is None:
            raise ValueError(f"lr_scheduler {scheduler!r} needs the base learning rate to reach lr_end.")
        floor = lr_end / base_lr

    def factor(step: int) -> float:
        if scheduler == "constant":
            return 1.0
        if scheduler == "sine":  # SimpleTuner's Sine: T_0 = lr_warmup_steps, starting at the mid-point
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.sin(math.pi * step / max(1, warmup_steps)))
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if scheduler == "polynomial":
            return floor + (1.0 - floor) * (1.0 - progress) ** lr_power
        if scheduler == "cosine_with_restarts":
            if progress >= 1.0:
                return floor
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * ((lr_num_cycles * progress) % 1.0)))
        raise ValueError(f"lr_scheduler {scheduler!r} is not one of {list(SchedulerName.__args__)}.")

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over the optimizer's own starting lr (learning_rate, or prodigy's multiplier)."""
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(**dataclasses.asdict(schedule), base_lr=base_lr))


# --------------------------------------------------------------------------------------------- building


def build_optimizer(model: Model, *, optim: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable (LoRA) weights."""
    params = [p for p in model.module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: LoRA injection found no target modules")
    wrong = {p.dtype for p in params} - {optim.lora_dtype}
    if wrong:
        raise RuntimeError(f"optimizer {optim.optimizer!r} trains {optim.lora_dtype} LoRA weights, but they are "
                           f"{sorted(map(str, wrong))}: build the model with lora_dtype=optim.lora_dtype")
    kwargs = optim.optimizer_kwargs()
    if optim.optimizer == "optimi-lion" and any(hasattr(p, "device_mesh") for p in params):
        kwargs["triton"] = False  # its Triton kernels take plain tensors; its for-loop path steps FSDP2's DTensor shards
    if optim.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, **kwargs)
    else:
        optimizer = _optimizer_class(SPECS[optim.optimizer])(params, **kwargs)
    keep_state_dtypes(optimizer)
    return optimizer


def keep_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Make load_state_dict keep each state tensor's saved dtype.

    torch's Optimizer.load_state_dict casts every floating-point state tensor to its parameter's dtype: AdamWBF16's
    fp32 moments would come back as bf16 (rounded), prodigy's bf16 buffers as fp32, and a resumed run would drift
    from an uninterrupted one. A pre-hook keeps the incoming tensors, a post-hook puts them back.
    """
    kept: list[dict[Any, dict[str, torch.Tensor]]] = []

    def before(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        live = [p for group in opt.param_groups for p in group["params"]]
        kept.clear()
        kept.append({param: {k: v for k, v in state_dict["state"].get(i, {}).items()
                             if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step"}
                     for i, param in zip(saved_ids, live)})

    def after(opt: torch.optim.Optimizer) -> None:
        for param, tensors in (kept.pop() if kept else {}).items():
            state = opt.state[param]
            for key, value in tensors.items():
                if key in state and isinstance(state[key], torch.Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(device=state[key].device)

    optimizer.register_load_state_dict_pre_hook(before)
    optimizer.register_load_state_dict_post_hook(after)


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to evaluate and save while inside: a Schedule-Free optimizer (prodigy) swaps its averaged weights
    in (optimizer.eval()) and its training weights back after (optimizer.train()); others change nothing."""
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 weights, with Kahan-compensated updates.

    bf16 keeps 8 significant bits: an update smaller than half the spacing between bf16 numbers near a weight (1/256
    of it) rounds away, and late in training most LoRA updates are that small. Each step computes the AdamW update
    in fp32 (moments in fp32: in bf16, exp_avg_sq * 0.999 rounds back to itself), adds the compensation carried from
    earlier steps, rounds the sum onto the weight and keeps what rounding dropped as the new compensation (bf16, one
    extra buffer). Chosen over stochastic rounding because it is deterministic: a resumed run and a run on another
    number of FSDP2 shards take exactly the same steps, and the error stays bounded instead of only zero on average.
    """

    def __init__(self, params, *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 1e-2) -> None:
        if not lr > 0:
            raise ValueError(f"AdamWBF16: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise RuntimeError(f"AdamWBF16 trains bf16 weights only, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
                weight = p.float()
                update = state["exp_avg"] / denom * (-lr / (1 - beta1 ** t))
                if decay:
                    update.add_(weight, alpha=-lr * decay)
                update.add_(state["compensation"].float())
                rounded = (weight + update).to(torch.bfloat16)
                # What bf16 could not hold of this step's increment, carried into the next one.
                state["compensation"].copy_(update - (rounded.float() - weight))
                p.copy_(rounded)
        return loss
