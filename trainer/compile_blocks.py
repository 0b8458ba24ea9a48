"""Regional torch.compile of the FLUX.2 transformer: one compiled forward per block class, not the whole model.

FLUX.2 repeats two block classes (Flux2TransformerBlock, the double-stream block, and
Flux2SingleTransformerBlock), which diffusers lists in the model's `_repeated_blocks` and compiles one by one in
`compile_repeated_blocks`; torchtitan compiles each transformer block the same way, after activation
checkpointing and before fully_shard. Here each block class's `forward` is compiled once and every block of that
class calls it with itself as `self`: dynamo lifts the block's parameters to graph inputs, so the 8 double and
48 single blocks of FLUX.2-dev share two graphs (per input layout) instead of compiling 56 times.

Only the block's own computation is compiled (an instance-level `forward`, as blocks.apply_block_forward does for
the transformer). Everything around it stays eager and so composes unchanged:

- gradient checkpointing (blocks.block_forward wraps a block call in torch.utils.checkpoint; the recompute in
  backward calls the same compiled forward);
- TREAD (apply_block_forward installs the routed attention processors first; they are traced into the graph, and
  a routed block sees other shapes and a per-sample rotary table: its own graph);
- FSDP2 (fully_shard's pre/post-forward hooks gather and free the parameters around the compiled call; compile
  comes before fully_shard, torchtitan's order) and DDP (its hooks are on the gradients);
- block-level group offload (diffusers' hook wraps the forward it finds, ours, and moves the weights before it runs).
  Leaf-level offload puts hooks on modules inside a block, inside the compiled region: refused.

Recompiles are bounded across aspect buckets by dynamo's automatic dynamic shapes (dynamic=None): the first
bucket compiles static graphs, the second recompiles them once with a dynamic token count, and later buckets reuse
those (measured on the tiny model, bench/RESULTS.md: 6 graphs for 5 buckets, where one graph per bucket made 12
for 3). Each block class's forward is one code object whose graphs count against dynamo's recompile limit
(default 8): up to 2 (static, dynamic) x 2 (routed or not) x 2 (shared or per-token reference modulation) x 2
(training or no-grad validation) per class, so RECOMPILE_LIMIT raises it to 16. Past it dynamo runs the block
eagerly (correct, slower) and warns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .settings import check_fields, setting

log = logging.getLogger(__name__)

DynamoBackend = Literal["auto", "no", "inductor", "aot_eager", "eager"]
RECOMPILE_LIMIT = 16
"""Graphs one block class may compile (see the module doc) before dynamo falls back to eager for new inputs."""
_QUANTO = ("int8-quanto", "int4-quanto")


@dataclass(frozen=True, kw_only=True, slots=True)
class CompileConfig:
    """torch.compile of the transformer blocks."""

    backend: DynamoBackend = setting("dynamo_backend", "no")
    """torch.compile of the transformer blocks, one compiled forward per block class (SimpleTuner's key; its
    regional compilation is how this trainer always compiles). "auto": "inductor" on a CUDA GPU, off on the CPU
    and with an optimum-quanto base_model_precision (not measured there). "no": off. "inductor": TorchInductor
    (Triton on GPUs, C++ on the CPU: needs a C++ compiler). "aot_eager" / "eager": dynamo's debugging backends,
    no speed-up. The first steps of each new bucket shape are slower while the blocks compile. The default is "no",
    as SimpleTuner's, until bench/gpu_step.py --compile has measured compiled blocks faster on a GPU; "auto" is then
    the intended default."""

    def __post_init__(self) -> None:
        check_fields(self)

    def resolve(self, *, device: torch.device | str, base_model_precision: str = "no_change",
                offload_type: str | None = None) -> tuple[str | None, str]:
        """(the torch.compile backend to use or None for none, why), for a run on `device`.

        offload_type: group offload's type when it is enabled, else None. Raises ValueError for an explicit
        backend that cannot compose with leaf-level offload.
        """
        kind = torch.device(device).type
        if self.backend == "no":
            return None, "dynamo_backend is 'no'"
        if offload_type == "leaf_level":
            if self.backend != "auto":
                raise ValueError(f"dynamo_backend {self.backend!r} cannot be combined with group_offload_type "
                                 "'leaf_level': its hooks run on modules inside each compiled block. Use "
                                 "group_offload_type 'block_level', or dynamo_backend 'no'.")
            return None, "dynamo_backend 'auto' does not compile with leaf-level group offload"
        if self.backend != "auto":
            return self.backend, f"dynamo_backend is {self.backend!r}"
        if kind != "cuda":
            return None, f"dynamo_backend 'auto' compiles on CUDA only; this run computes on {kind!r}"
        if base_model_precision in _QUANTO:
            return None, f"dynamo_backend 'auto' leaves quanto's {base_model_precision} Linears uncompiled (not measured)"
        return "inductor", "dynamo_backend 'auto' on CUDA"


class _CompiledForward:
    """A block's forward after apply_compile: its class's compiled forward, called with the block as self."""

    __slots__ = ("block", "compiled")

    def __init__(self, block: torch.nn.Module, compiled: Any) -> None:
        self.block, self.compiled = block, compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(self.block, *args, **kwargs)


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def is_compiled(block: torch.nn.Module) -> bool:
    """Whether apply_compile gave this block a compiled forward (also under a hook added later: diffusers' wrapper
    keeps it as __wrapped__)."""
    import inspect

    return isinstance(inspect.unwrap(vars(block).get("forward", block.forward)), _CompiledForward)


def apply_compile(transformer: torch.nn.Module, *, backend: str) -> dict[type, Any]:
    """Compile each block class's forward once and make every block of that class run it; returns class ->
    compiled function.

    Call after LoRA and blocks.apply_block_forward (its routed attention processors are compiled in) and before
    fully_shard, DDP and group-offload hooks (they stay outside the compiled region). dynamic=None: automatic
    dynamic shapes (module doc).
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled: dict[type, Any] = {}
    for block in transformer_blocks(transformer):
        if "forward" in vars(block):
            raise RuntimeError(f"apply_compile must run before hooks that replace a block's forward (found one on "
                               f"{type(block).__name__}); compile first, then add FSDP2, DDP or offload hooks.")
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=backend, dynamic=None)
        # An instance attribute, as apply_block_forward does: the block keeps its class and state-dict keys.
        block.forward = _CompiledForward(block, compiled[cls])
    return compiled
