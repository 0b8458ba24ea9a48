"""Group offloading (diffusers' hooks) for the training transformer and for the encoders that fill caches.

Transformer, during training (`enable_group_offload`): the frozen weights of the double and single blocks
wait in CPU memory and are moved onto the accelerator group by group just before a group runs, and back
right after it ran, in forward and in the forward that gradient checkpointing recomputes during backward.
Everything else stays on the accelerator: the trainable LoRA weights with their gradients and AdamW state,
and the small layers outside the blocks (embedders, modulation, norm_out, proj_out: about 3% of the weights,
used at the start and end of every forward anyway).

Why the groups are built here instead of calling `apply_group_offloading` on the transformer: diffusers'
block-level groups move whole blocks with `module.to()`, which would move the LoRA weights and their
`.grad` to the CPU after every block, so the optimizer would find parameters and gradients on different
devices. The groups here are diffusers `ModuleGroup`s that hold only the blocks' frozen parameters and
buffers; diffusers' `ModuleGroup.onload_()` / `offload_()` do every transfer (pinned memory, CUDA
stream, record_stream), and diffusers' `HookRegistry` runs them around each module's forward.

- block_level: a group is `group_offload_blocks_per_group` consecutive blocks (double blocks first).
- leaf_level: a group is one module inside a block that owns frozen weights (a LoRA's base Linear, an RMSNorm).
- group_offload_use_stream (CUDA only): transfers run on a side stream from pinned memory. With block_level
  the next group in the direction of travel is prefetched while the current one computes: forward runs
  blocks upward, the checkpointed backward recomputes them downward, and the direction is read from the
  order in which groups start. leaf_level streams without prefetching.
- Never offload_to_disk: diffusers' disk offload reloads tensors saved at the first offload, which would
  silently undo every update of a trainable tensor (measured: zero grads, garbage weights).

Group offload needs gradient checkpointing: without it autograd keeps a reference to every block's weights
until backward (a Linear saves its weight for the input gradient), so the moved-out weights would still
occupy accelerator memory and nothing would be saved. It is refused with quanto-quantized layers (diffusers
cannot move quanto tensors: "Couldn't swap QLinear.weight") and with FSDP2 over several processes (FSDP2
owns the placement of sharded parameters). With DDP the frozen, CPU-resident weights are listed in
`_ddp_params_and_buffers_to_ignore`, so DDP neither broadcasts them nor rejects the mixed placement.

On a CPU-only machine the onload device is the CPU: the hooks and every transfer call run (diffusers allows
onload_device=cpu), so correctness is tested here (same loss and LoRA gradients with and without offload),
but the memory effect needs an accelerator.

Encoders, while caching (`group_offload_text_encoder`, `group_offload_vae`): inference only, so diffusers'
`apply_group_offloading` is used as is, with the block lists that make it find the Mistral decoder layers
and the VAE's encoder/decoder blocks.

`offload_during_startup`: the VAE that decodes validation images is kept in CPU memory and is on the
accelerator only while a validation runs (otherwise it would sit there for the whole run). The caching
encoders already never share the accelerator: the VAE is released before the text encoder loads, and the
text encoder before the transformer loads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import OffloadConfig, QuantizationConfig, check_stream_device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_HOOK_NAME = "flux2_lora_group_offload"
_RESET_HOOK_NAME = "flux2_lora_group_offload_reset"
# Mistral3ForConditionalGeneration: recurse into model and language_model to reach the decoder layers; the
# vision tower and projector get their own (never called) groups so they never leave the CPU.
_TEXT_ENCODER_BLOCK_MODULES = ["model", "language_model", "vision_tower", "multi_modal_projector"]
# AutoencoderKLFlux2: quant_conv and post_quant_conv run outside forward() (encode/decode call them), so they
# need their own hooks, as diffusers lists them for AutoencoderKL.
_VAE_BLOCK_MODULES = ["quant_conv", "post_quant_conv", "encoder", "decoder"]


# ------------------------------------------------------------------------------------ training transformer


class _Schedule:
    """Which groups are on the accelerator, and which one to prefetch next.

    A group is moved in when the first of its modules starts and out when the last one ends. The forward
    that checkpointing recomputes in backward stops early (torch stops recomputing once it has the tensors
    it needs), so a recomputed group may never "end": a group that starts therefore puts back every other
    group still on the device (except the one it prefetches). Backward keeps views of the weights it needs,
    so putting a group back while its backward is pending is safe; the memory goes when that backward ends.
    """

    def __init__(self, groups: list[Any], sizes: list[int], *, prefetch: bool) -> None:
        self.groups = groups
        self.sizes = sizes
        self.prefetch = prefetch
        self.onloaded: set[int] = set()
        self.running: dict[int, int] = {}
        self.last = -1
        self.onloads = 0
        """Transfers to the accelerator so far (tests count them)."""
        self.peak_onloaded = 0
        """Most groups on the accelerator at once so far."""

    def reset(self) -> None:
        """A new forward starts: put back what the last backward left (its last recomputed group)."""
        self._put_back(keep=())
        self.last = -1

    def _put_back(self, *, keep) -> None:
        for index in sorted(self.onloaded - set(keep)):
            self.groups[index].offload_()
            self.onloaded.discard(index)
            self.running.pop(index, None)

    def _onload(self, index: int) -> None:
        self.groups[index].onload_()
        self.onloaded.add(index)
        self.onloads += 1
        self.peak_onloaded = max(self.peak_onloaded, len(self.onloaded))

    def enter(self, index: int) -> None:
        count = self.running.get(index, 0)
        self.running[index] = count + 1
        if count:
            return  # another module of a group that is already running
        following = None
        if self.prefetch:
            # Forward goes up the blocks; the checkpointed backward recomputes them going down and starts
            # with the group the forward ended on.
            following = index + (1 if index > self.last else -1)
            if not 0 <= following < len(self.groups):
                following = None
        self._put_back(keep=(index, following))
        if index not in self.onloaded:
            self._onload(index)
        group = self.groups[index]
        if group.stream is not None:
            group.stream.synchronize()  # this group's copies (maybe a prefetch) are complete before compute
        if following is not None and following not in self.onloaded:
            self._onload(following)  # async on the side stream, overlapping this group's compute
        self.last = index

    def leave(self, index: int) -> None:
        if self.running.get(index, 0) < self.sizes[index]:
            return
        del self.running[index]
        self.groups[index].offload_()
        self.onloaded.discard(index)


def _make_hooks():
    from diffusers.hooks import ModelHook

    class GroupHook(ModelHook):
        """Runs the schedule around one module of one group."""

        def __init__(self, schedule: _Schedule, index: int) -> None:
            super().__init__()
            self.schedule = schedule
            self.index = index

        def pre_forward(self, module, *args, **kwargs):
            self.schedule.enter(self.index)
            return args, kwargs

        def post_forward(self, module, output):
            self.schedule.leave(self.index)
            return output

    class ResetHook(ModelHook):
        def __init__(self, schedule: _Schedule) -> None:
            super().__init__()
            self.schedule = schedule

        def pre_forward(self, module, *args, **kwargs):
            self.schedule.reset()
            return args, kwargs

    return GroupHook, ResetHook


def _group_units(transformer: torch.nn.Module, *, offload_type: str,
                 blocks_per_group: int) -> list[tuple[list[torch.nn.Module], list[Any], list[Any]]]:
    """(modules that trigger the group, frozen parameters, buffers) per group, in block order."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    units = []
    if offload_type == "block_level":
        for start in range(0, len(blocks), blocks_per_group):
            chunk = blocks[start:start + blocks_per_group]
            params = [p for b in chunk for p in b.parameters() if not p.requires_grad]
            buffers = [t for b in chunk for t in b.buffers()]
            units.append((chunk, params, buffers))
    else:
        for block in blocks:
            for module in block.modules():
                params = [p for p in module.parameters(recurse=False) if not p.requires_grad]
                buffers = list(module.buffers(recurse=False))
                if params or buffers:
                    units.append(([module], params, buffers))
        owners = {id(m) for (m,), _, _ in units}
        for (module,), _, _ in units:
            # A group starting puts the others back: that is only safe when no group runs inside another.
            assert not any(id(c) in owners for c in module.modules() if c is not module), type(module).__name__
    return units


@dataclass
class GroupOffload:
    """What apply_group_offload installed (tests and the memory estimate read it)."""

    groups: list[Any]
    """diffusers ModuleGroups, in block order."""
    schedule: _Schedule
    offloaded_names: set[str]
    """Parameter and buffer names that live in CPU memory between uses."""


def apply_group_offload(transformer: torch.nn.Module, *, settings: OffloadConfig, device: torch.device | str) -> GroupOffload:
    """Group-offload the frozen block weights of a LoRA-injected FLUX.2 transformer (see the module doc).

    settings: config.OffloadConfig. Call after LoRA, our block forward and checkpointing are in place,
    and before DDP wraps the model (DDP must be told to ignore the CPU-resident weights when it is built).
    The transformer may be anywhere (load it on the CPU); it ends with the groups offloaded and everything
    else on `device`.
    """
    import torch
    from diffusers.hooks.group_offloading import ModuleGroup
    from diffusers.hooks.hooks import HookRegistry

    device = torch.device(device)
    settings.check_stream(device=device)
    stream = torch.cuda.Stream(device=device) if settings.use_stream else None
    units = _group_units(transformer, offload_type=settings.offload_type, blocks_per_group=settings.blocks_per_group)
    groups = []
    for i, (modules, params, buffers) in enumerate(units):
        groups.append(ModuleGroup(
            modules=[], parameters=params, buffers=buffers, offload_device=torch.device("cpu"),
            onload_device=device, offload_leader=modules[-1], onload_leader=modules[0],
            non_blocking=stream is not None, stream=stream,
            # The default stream reads these weights (and backward keeps views of them) after the side stream
            # copied them: record_stream stops the allocator from reusing that memory too early.
            record_stream=stream is not None, low_cpu_mem_usage=False, onload_self=True,
            offload_to_disk_path=None, group_id=f"flux2_lora_{i}",
        ))
    grouped = {id(t) for _, params, buffers in units for t in [*params, *buffers]}
    for group in groups:
        group.offload_()
    # Everything outside the groups (LoRA, embedders, modulation, output layers) lives on the device.
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        if id(tensor) not in grouped:
            tensor.data = tensor.data.to(device)
    schedule = _Schedule(groups, [len(m) for m, _, _ in units],
                         prefetch=stream is not None and settings.offload_type == "block_level")
    group_hook, reset_hook = _make_hooks()
    for i, (modules, _, _) in enumerate(units):
        for module in modules:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(group_hook(schedule, i), _HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(reset_hook(schedule), _RESET_HOOK_NAME)
    names = {n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if id(t) in grouped}
    # DDP checks that all its parameters share one device type and broadcasts them at start: leave the
    # frozen, CPU-resident ones out (every rank loaded the same weights; they never get gradients).
    transformer._ddp_params_and_buffers_to_ignore = sorted(names)
    log.info("group offload: %d %s groups of frozen block weights between CPU and %s%s", len(groups),
             settings.offload_type, device, " (CUDA stream, prefetch)" if schedule.prefetch else "")
    return GroupOffload(groups=groups, schedule=schedule, offloaded_names=names)


# --------------------------------------------------------------------------------------------- encoders


def apply_encoder_offload(module: torch.nn.Module, *, kind: str, device: torch.device | str, offload_type: str,
                          blocks_per_group: int, use_stream: bool) -> None:
    """diffusers' group offloading on a frozen encoder ("text_encoder" or "vae"); it computes on `device`."""
    import torch
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    block_modules = {"text_encoder": _TEXT_ENCODER_BLOCK_MODULES, "vae": _VAE_BLOCK_MODULES}.get(kind)
    if block_modules is None:
        raise ValueError(f"apply_encoder_offload: kind must be 'text_encoder' or 'vae', got {kind!r}.")
    check_stream_device(use_stream=use_stream, device=device)
    module.to("cpu")
    apply_group_offloading(
        module, onload_device=device, offload_device=torch.device("cpu"), offload_type=offload_type,
        num_blocks_per_group=blocks_per_group if offload_type == "block_level" else None,
        use_stream=use_stream, non_blocking=use_stream,
        block_modules=block_modules if offload_type == "block_level" else None,
    )


def check_encoders(*, quantization: QuantizationConfig, offload: OffloadConfig, device: torch.device | str) -> None:
    """Refuse an encoder set-up that cannot run on this device, before an encoder loads (the configs' own rules)."""
    quantization.check_text_encoder(offload=offload)
    if offload.offloads_text_encoder or offload.offloads_vae:
        check_stream_device(use_stream=offload.use_stream, device=device)


def load_text_encoder(folder: Any, *, precision: str, device: str, quantization: QuantizationConfig | None = None,
                      offload: OffloadConfig | None = None):
    """The text encoder in `precision`, computing on `device`: quantized weight by weight as it loads
    (text_encoder_1_precision; quantize.load_quantized_text_encoder) or group-offloaded (group_offload_text_encoder,
    loaded in CPU memory first), so the full-precision encoder never has to fit on the device."""
    from . import model_files

    quantization, offload = quantization or QuantizationConfig(), offload or OffloadConfig()
    check_encoders(quantization=quantization, offload=offload, device=device)
    if quantization.text_encoder_precision != "no_change":  # quantized as it loads, never whole in precision
        from .quantize import load_quantized_text_encoder

        return load_quantized_text_encoder(folder, precision=precision, quantization=quantization.text_encoder_precision,
                                           quantize_via=quantization.quantize_via, device=device)
    if not offload.offloads_text_encoder:
        return model_files.load_text_encoder(folder, precision=precision, device=device)
    text_encoder = model_files.load_text_encoder(folder, precision=precision, device="cpu")
    apply_encoder_offload(text_encoder, kind="text_encoder", device=device, offload_type=offload.offload_type,
                          blocks_per_group=offload.blocks_per_group, use_stream=offload.use_stream)
    return text_encoder


def load_vae(folder: Any, *, precision: str, device: str, offload: OffloadConfig | None = None):
    """The VAE in `precision`, computing on `device`, group-offloaded when group_offload_vae takes effect."""
    from . import model_files

    offload = offload or OffloadConfig()
    check_encoders(quantization=QuantizationConfig(), offload=offload, device=device)
    if not offload.offloads_vae:
        return model_files.load_vae(folder, precision=precision, device=device)
    vae = model_files.load_vae(folder, precision=precision, device="cpu")
    apply_encoder_offload(vae, kind="vae", device=device, offload_type=offload.offload_type,
                          blocks_per_group=offload.blocks_per_group, use_stream=offload.use_stream)
    return vae


def load_validation_vae(folder: Any, *, precision: str, device: str, offload: OffloadConfig | None = None):
    """The VAE that decodes validation images: in CPU memory with offload_during_startup (see onloaded)."""
    offload = offload or OffloadConfig()
    waits_on_cpu = offload.during_startup and not offload.offloads_vae
    return load_vae(folder, precision=precision, device="cpu" if waits_on_cpu else device, offload=offload)


@contextlib.contextmanager
def onloaded(module: torch.nn.Module | None, *, device: torch.device | str,
             offload: OffloadConfig | None = None) -> Iterator[None]:
    """Move a CPU-waiting validation VAE (offload_during_startup) to `device` for the block, and back after."""
    offload = offload or OffloadConfig()
    if module is None or not offload.during_startup or offload.offloads_vae:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        _empty_cache(device)


def _empty_cache(device: torch.device | str) -> None:
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
