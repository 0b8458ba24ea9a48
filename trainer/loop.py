"""The training run: build, resume, step, checkpoint, validate, save. Runs under torchrun or alone.

`train(config)` reads top to bottom: build_run() makes everything the first step needs (the model from
trainer/model.py, the optimizer, the batch plan, the validation set-up, a resumed checkpoint), each step is
train_step(), and after_step() does the bookkeeping (events, checkpoints, validation). Everything a step needs
comes from the dataset cache (latents, text embeddings), so no encoder is loaded while training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__, checkpoint, failures, faults, parallelize, preflight, runlock
from .config import ObjectiveConfig, TrainConfig
from .distributed_choice import resolve_distributed
from .events import EventWriter, append_event
from .failures import NonFiniteLossError
from .host_allocator import keep_step_tensors_on_the_heap
from .model import Model, build_model
from .objective import flow_matching_loss, prepare_batch, sample_generators, warn_unused_reference_timestep
from .ema import LoraEma, build_ema
from .optimizers import build_lr_scheduler, build_optimizer, evaluation_weights, lr_lambda  # noqa: F401 - loop.lr_lambda
from .rollout import roll_out
from .trackers import open_trackers

if TYPE_CHECKING:
    from .manifest import Manifest
    from .sampler import BucketBatchSampler
    from .validation import ValidationRun

log = logging.getLogger(__name__)


def train(config: TrainConfig, *, env: parallelize.DistEnv) -> Path | None:
    """The whole run. Returns the LoRA path on rank 0."""
    config = resolve_distributed(config, env=env)[0]  # "auto": DDP when the model fits each device, else FSDP2
    out_dir = config.checkpoint.output_dir
    preflight.check_output_writable(out_dir)  # creates it; a clear error when it cannot be written
    # One run per output folder: rank 0 holds the lock (or shares the launching node's) before writing anything.
    lock = runlock.acquire_run_lock(out_dir, owner="trainer", token=os.environ.get(runlock.TOKEN_ENV)) \
        if env.is_main else None
    events = EventWriter(out_dir, rank=env.rank)
    where: dict[str, Any] = {"step": None, "phase": "start-up"}  # for the error event
    try:
        run = build_run(config, env=env, events=events, where=where)
        batches = run.sampler.iter_batches()
        for step in range(run.start_step, run.total_steps):
            where.update(step=step + 1, phase="train")
            started = time.perf_counter()
            micro = _micro_batches(batches, config.data.gradient_accumulation_steps, manifest=run.manifest,
                                   dtype=torch.float32)
            result = train_step(run.model, run.optimizer, micro_batches=micro, objective=config.objective,
                                empty_embeds=run.empty_embeds, seed=config.seed, step=step, env=env,
                                max_grad_norm=config.optim.max_grad_norm, nan_policy=config.nan_policy)
            after_step(run, step=step + 1, result=result, micro=micro, started=started, where=where)
        where["phase"] = "saving the LoRA"
        with evaluation_weights(run.optimizer):  # Schedule-Free (prodigy): the averaged weights are the LoRA
            lora_path = save_final_lora(run.model, config=config, out_dir=out_dir, step=run.total_steps, env=env,
                                        dataset_fingerprint=run.manifest.fingerprint, ema=run.ema)
        events.emit("end", step=run.total_steps, lora_path=f"{config.checkpoint.output_name}.safetensors",
                    seconds=time.perf_counter() - run.started)
        return lora_path
    except BaseException as exc:
        _report_failure(exc, config=config, env=env, events=events, out_dir=out_dir, where=where)
        raise
    finally:
        events.close()
        if lock is not None:
            lock.release()


@dataclass
class Run:
    """What build_run makes before the first step, and the counters after_step keeps."""

    config: TrainConfig
    env: parallelize.DistEnv
    events: EventWriter
    manifest: Manifest
    model: Model
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: BucketBatchSampler
    empty_embeds: torch.Tensor | None
    """The empty prompt's encoding, for caption dropout; None without it."""
    validation: ValidationRun | None
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    done_steps: int = 0
    ema: LoraEma | None = None
    """The EMA of the LoRA weights (use_ema); None without it."""

    @property
    def total_steps(self) -> int:
        return self.config.schedule.total_steps

    @property
    def out_dir(self) -> Path:
        return self.config.checkpoint.output_dir


def build_run(config: TrainConfig, *, env: parallelize.DistEnv, events: EventWriter, where: dict[str, Any]) -> Run:
    """Checks, dataset, validation prompts, model, optimizer, batch plan, resume: all before the first step."""
    from .checkpointing import resolve_memory
    from .manifest import load_text_embedding
    from .merge import resolve_training_manifest
    from .lowp_compute import check_environment
    from .model_files import inspect_model_folder
    from .sampler import BucketBatchSampler
    from .validation import prepare_validation, validation_prompts

    out_dir = config.checkpoint.output_dir
    config.optim.check_installed()  # the optimizer's package, before anything loads
    check_environment(config.quantization.base_model_precision, device=env.device)  # torchao, and this GPU runs it
    config.check_processes(env.world_size)
    folder = inspect_model_folder(config.model.root, transformer_file=config.model.transformer_file,
                                  vae_file=config.model.vae_file, flavour=config.model.flavour)
    if env.is_main and folder.is_distilled:
        log.warning("model folder %s is %s: training works, but a LoRA trained on the base model (FLUX.2-klein-base-"
                    "4B / -9B) is recommended; it also previews on the distilled one. Validation renders without "
                    "CFG here (validation_guidance is unused), as Flux2KleinPipeline does.", folder.root,
                    folder.describe())
    resume = checkpoint.resolve_resume(out_dir, config.checkpoint.resume_from)
    if env.is_main:  # free space and LoRA rank vs model, trackers (their packages, W&B login): before any weights load
        preflight.check_run(config, folder=folder, out_dir=out_dir,
                            existing_checkpoints=len(checkpoint.list_checkpoints(out_dir)))
        events.add_sink(open_trackers(config.trackers, output_dir=out_dir, resuming=resume is not None,
                                      run_config=config.to_dict()))
    # A data_backend_config is built here by rank 0 (cache misses only), before the transformer loads.
    manifest = resolve_training_manifest(
        dataset_manifests=config.data.dataset_manifests, data_backend_config=config.data.data_backend_config,
        model=folder, out_dir=out_dir, is_main=env.is_main, barrier=lambda: parallelize.barrier(env),
        device=str(env.device), vae_batch_size=config.data.vae_batch_size, quantization=config.quantization,
        offload=config.offload)
    # The text encoder runs (and is released) before the transformer loads: never both at once.
    prompts, negative = validation_prompts(config.validation, folder=folder, quantization=config.quantization,
                                           offload=config.offload, env=env, cache_dir=out_dir / "text_cache")
    empty = load_text_embedding(manifest, "") if config.objective.caption_dropout_probability > 0 else None
    where["phase"] = "model load"
    faults.fault_point("load")  # test-only
    memory = resolve_memory(config, env=env)  # gradient_checkpointing_auto: the interval that fits this GPU
    model = build_model(folder, lora=config.lora, memory=memory, parallelism=config.parallelism, seed=config.seed,
                        env=env, quantization=config.quantization, offload=config.offload, tread=config.tread,
                        lora_dtype=config.optim.lora_dtype)
    if env.device.type == "cpu" and not config.parallelism.shards(env.world_size):
        keep_step_tensors_on_the_heap()  # loaded with large tensors mapped; CPU steps reuse the heap (host_allocator)
    has_references = any(item.references for item in manifest.items)
    validation = prepare_validation(config, prompts=prompts, folder=folder, env=env,
                                    dataset_has_references=has_references, negative=negative)
    optimizer = build_optimizer(model, optim=config.optim)
    lr_scheduler = build_lr_scheduler(optimizer, schedule=config.schedule)
    ema = build_ema(model, settings=config.ema, env=env)
    sampler = BucketBatchSampler(manifest, batch_size=config.data.train_batch_size, seed=config.seed,
                                 rank=env.rank, world_size=env.world_size)
    start_step = 0
    if resume is not None:
        start_step = restore_checkpoint(model, optimizer, lr_scheduler, path=resume, sampler=sampler, env=env, ema=ema)
        log.info("resumed from %s at step %d", resume, start_step)
    if env.is_main:
        warn_unused_reference_timestep(config.objective, has_references=has_references)
    events.emit("start", world_size=env.world_size, device=str(env.device), start_step=start_step,
                max_train_steps=config.schedule.total_steps, num_images=len(manifest.items),
                resumed_from=str(resume) if resume else None, lora_rank=config.lora.rank,
                lora_alpha=config.lora.alpha, flux_lora_target=config.lora.target,
                distributed=config.parallelism.distributed, learning_rate=config.optim.learning_rate)
    return Run(config=config, env=env, events=events, manifest=manifest, model=model, optimizer=optimizer,
               lr_scheduler=lr_scheduler, sampler=sampler, empty_embeds=empty, validation=validation,
               start_step=start_step, ema=ema)


def after_step(run: Run, *, step: int, result: StepResult, micro: list[Any], started: float,
               where: dict[str, Any]) -> None:
    """A finished step (1-based): advance the schedule, emit its event, checkpoint and validate when due."""
    config, env, events = run.config, run.env, run.events
    lr = run.lr_scheduler.get_last_lr()[0]
    run.lr_scheduler.step()
    if result.applied and run.ema is not None:
        run.ema.update(step=step)
    run.done_steps += 1
    seconds = time.perf_counter() - started
    mean_seconds = (time.perf_counter() - run.started) / run.done_steps
    samples_per_step = config.data.train_batch_size * config.data.gradient_accumulation_steps * env.world_size
    peak = failures.peak_memory_bytes()
    events.emit("step", step=step, loss=result.loss, lr=lr, applied=result.applied, grad_norm=result.grad_norm,
                seconds_per_step=seconds,
                samples_per_second=samples_per_step / max(seconds, 1e-9), max_train_steps=run.total_steps,
                eta_seconds=mean_seconds * (run.total_steps - step),
                peak_memory_mb=None if peak is None else round(peak / 2**20, 1),
                datasets=sorted({run.manifest.items[b.indices[0]].source for b in micro}))
    if step % config.checkpoint.every_steps == 0:
        where["phase"] = "checkpoint"
        path = save_training_checkpoint(run.model, run.optimizer, run.lr_scheduler, output_dir=run.out_dir,
                                        step=step, sampler=run.sampler, total_limit=config.checkpoint.total_limit,
                                        env=env, run_meta={"dataset_fingerprint": run.manifest.fingerprint,
                                                           "world_size": env.world_size}, ema=run.ema, config=config)
        events.emit("checkpoint", step=step, path=str(path.relative_to(run.out_dir)) if path else None)
    if run.validation is not None and run.validation.due(step, total=run.total_steps):
        where["phase"] = "validation"
        faults.fault_point("validation", number=step)  # test-only
        images = render_validation(run, step=step)
        events.emit("validation", step=step, images=images)


def render_validation(run: Run, *, step: int) -> list[dict[str, Any]]:
    """Validation images of the trained LoRA (Schedule-Free: its averaged weights) and, as ema_validation asks,
    of its EMA (files *_ema.png)."""
    assert run.validation is not None
    use_ema = run.ema is not None and run.config.ema.validation != "none"
    images = []
    with evaluation_weights(run.optimizer):
        if not (use_ema and run.config.ema.validation == "ema_only"):
            images += run.validation.render(run.model, step=step, out_dir=run.out_dir, env=run.env)
        if use_ema:
            with run.ema.applied(run.model):
                images += run.validation.render(run.model, step=step, out_dir=run.out_dir, env=run.env, variant="ema")
    return images


def _report_failure(exc: BaseException, *, config: TrainConfig, env: parallelize.DistEnv, events: EventWriter,
                    out_dir: Path, where: dict[str, Any]) -> None:
    """The "error" event naming this rank's failure (every rank writes its own: the first is the root cause)."""
    try:
        report = failures.failure_report(exc, step=where["step"], phase=where["phase"], rank=env.rank,
                                         config=config, out_dir=out_dir)
    except Exception:  # noqa: BLE001 - explaining the failure must never hide it
        report = {"message": f"{type(exc).__name__}: {exc}", "rank": env.rank, "step": where["step"]}
    if env.is_main:
        events.emit("error", **report)
    else:
        append_event(out_dir, "error", **report)


# ---------------------------------------------------------------------------------------------- the step


class StepResult(typing.NamedTuple):
    loss: float
    """Mean loss over the micro-batches and processes."""
    applied: bool
    """False when nan_policy 'skip_batch' skipped the optimizer step."""
    grad_norm: float | None
    """Global LoRA gradient norm before clipping; None when the loss was not finite."""


def train_step(model: Model, optimizer: torch.optim.Optimizer, *, micro_batches: list[Any], objective: ObjectiveConfig,
               empty_embeds: torch.Tensor | None, seed: int, step: int, env: parallelize.DistEnv,
               max_grad_norm: float, nan_policy: str) -> StepResult:
    """One optimizer step over gradient-accumulation micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    accum = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
        size = batch.latents.shape[0]
        # This rank's samples sit at [rank * size, (rank + 1) * size) of the micro-step's global batch.
        first = (micro * env.world_size + env.rank) * size
        generators = sample_generators(seed=seed, step=step, first_index=first, count=size)
        torch.manual_seed(generators[0].initial_seed())  # LoRA dropout draws from the global generator
        prepared = prepare_batch(
            latents=batch.latents, prompt_embeds=batch.prompt_embeds, empty_embeds=empty_embeds, spec=objective,
            generators=generators, reference_latents=batch.reference_latents or None,
            guidance_embeds=bool(model.inner.config.guidance_embeds),  # klein has none: guidance is not passed
        )
        with torch.autocast(env.device.type, dtype=model.compute_dtype, enabled=model.compute_dtype != torch.float32):
            if objective.scheduled_sampling.enabled:  # the model's own x_t for some samples, without gradients
                prepared = roll_out(model, prepared, settings=objective.scheduled_sampling, device=env.device,
                                    dtype=model.compute_dtype, env=env,
                                    offsets=objective.scheduled_sampling.draw_offsets(generators, step=step))
            loss = flow_matching_loss(model.module, prepared, device=env.device, dtype=model.compute_dtype,
                                      tread_generators=generators if model.tread else None)
        loss = faults.corrupt_loss(loss, step=step + 1)  # test-only hook, inert unless FLUX2LORA_FAULT is set
        (loss / accum).backward()
        total += float(loss.detach())
    faults.fault_point("step", number=step + 1)  # test-only: a crashing, hung or killed rank mid-step
    mean_loss = float(parallelize.all_reduce_mean(torch.tensor(total / accum), env))
    files = ", ".join(str(p) for batch in micro_batches for p in batch.image_paths)
    problem = None
    grad_norm = None
    if not math.isfinite(mean_loss):
        problem = f"loss is {mean_loss}"
        advice = "Check those images, lower learning_rate, or set nan_policy 'skip_batch' to skip such batches."
    else:
        # A finite loss can still give inf/NaN gradients (an overflow in backward); one such step ruins the
        # LoRA. Every rank sees the same norm (DDP and FSDP2 reduce it), so every rank takes the same branch.
        grad_norm = _gradient_norm(model, max_norm=max_grad_norm)
        if not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} with a finite loss {mean_loss:.5f}"
            advice = "Lower learning_rate, use mixed_precision bf16 rather than fp16, or set nan_policy 'skip_batch'."
    if problem is not None:
        if nan_policy == "skip_batch":
            optimizer.zero_grad(set_to_none=True)
            return StepResult(mean_loss, False, grad_norm)
        raise NonFiniteLossError(
            f"{problem} at step {step + 1} (rank {env.rank}'s batch: {files}); nan_policy 'stop' ended the run before "
            f"the optimizer step, so the LoRA holds no NaN. {advice}")
    optimizer.step()
    return StepResult(mean_loss, True, grad_norm)


def _gradient_norm(model: Model, *, max_norm: float) -> float:
    """The global L2 norm of the LoRA gradients, clipped to max_norm first when max_norm > 0."""
    params = [p for p in model.module.parameters() if p.requires_grad and p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm before clipping
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the reduced norm
        norm = norm.full_tensor()
    return float(norm)


# -------------------------------------------------------------------------------------- checkpoints and saving


def save_training_checkpoint(model: Model, optimizer, lr_scheduler, *, output_dir: Path, step: int, sampler,
                             total_limit: int | None, env: parallelize.DistEnv, run_meta: dict[str, Any],
                             ema: LoraEma | None = None, config: TrainConfig | None = None) -> Path | None:
    """Gather (collective) and write checkpoint-<step> on rank 0. A Schedule-Free optimizer's state is saved in train
    mode (its training weights and its z): the averaged weights follow from them, and resume is exact.

    With config, the folder also holds <output_name>.safetensors, the LoRA at this step as save_final_lora writes it
    (ComfyUI layout, metadata steps = step), for LoRA Grid and for users; Schedule-Free: its training weights."""
    lora_state = parallelize.full_lora_state(model.module, env=env)
    optim_state = parallelize.full_optimizer_state(model.module, optimizer, env=env)
    ema_state = ema.full_state(env=env) if ema is not None else {}
    path = None
    if env.is_main:
        optim_tensors, optim_meta = checkpoint.flatten_optimizer_state(optim_state)
        tensors = {f"lora/{k}": v for k, v in lora_state.items()} | optim_tensors | {
            f"ema/{k}": v for k, v in ema_state.items()}
        meta = {
            "optimizer": optim_meta,
            "lr_scheduler": lr_scheduler.state_dict(),
            "data": sampler.state_dict(),
            "run": run_meta,
            "trainer_version": __version__,
        }
        def write_lora(folder: Path) -> None:
            write_lora_file(folder / f"{config.checkpoint.output_name}.safetensors", lora_state, model=model,
                            config=config, step=step, dataset_fingerprint=str(run_meta.get("dataset_fingerprint", "")))

        path = checkpoint.save_checkpoint(output_dir, step=step, tensors=tensors, meta=meta, total_limit=total_limit,
                                          extra_files=write_lora if config is not None else None)
    parallelize.barrier(env)
    return path


def restore_checkpoint(model: Model, optimizer, lr_scheduler, *, path: Path, sampler, env: parallelize.DistEnv,
                       ema: LoraEma | None = None) -> int:
    tensors, meta = checkpoint.load_checkpoint(path)
    ema_state = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
    lora_state = {k[len("lora/"):]: v for k, v in tensors.items() if k.startswith("lora/")}
    optim_state = checkpoint.unflatten_optimizer_state(
        {k: v for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"]
    )
    parallelize.load_full_state(model.module, optimizer, lora_state=lora_state, optimizer_state=optim_state, env=env)
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    sampler.load_state_dict(meta["data"])
    if ema is not None and ema_state:
        ema.load_full_state(ema_state)
    elif ema is not None:
        log.warning("checkpoint %s has no EMA (use_ema was off): the EMA starts from the resumed LoRA weights.", path)
        ema.load_full_state(lora_state)
    return int(meta["step"])


def save_final_lora(model: Model, *, config: TrainConfig, out_dir: Path, step: int, env: parallelize.DistEnv,
                    dataset_fingerprint: str, ema: LoraEma | None = None) -> Path | None:
    """Gather the LoRA (collective) and write it in ComfyUI/BFL layout with its metadata, on rank 0; with an EMA,
    its averaged weights too, as <output_name>_ema.safetensors in the same layout."""
    states = {"": parallelize.full_lora_state(model.module, env=env)}
    if ema is not None:
        states["_ema"] = ema.full_state(env=env)
    if not env.is_main:
        return None
    for suffix, state in states.items():
        write_lora_file(out_dir / f"{config.checkpoint.output_name}{suffix}.safetensors", state, model=model,
                        config=config, step=step, dataset_fingerprint=dataset_fingerprint, ema=bool(suffix))
    return out_dir / f"{config.checkpoint.output_name}.safetensors"


def write_lora_file(path: Path, state: dict[str, torch.Tensor], *, model: Model, config: TrainConfig, step: int,
                    dataset_fingerprint: str, ema: bool = False) -> None:
    """One gathered LoRA (or LoKr) state as a ComfyUI/BFL-layout file with the run's metadata (steps = step)."""
    from .lokr import lokr_scales
    from .lokr_keys import save_trained_lokr
    from .lora_keys import diffusers_to_comfy, lora_metadata, save_lora_file

    lora, lokr = config.lora, config.lora.lycoris
    metadata = lora_metadata(
        rank=lokr.options.dim if lokr else lora.rank, alpha=lokr.options.alpha if lokr else lora.alpha,
        targets=",".join(lokr.target_classes) if lokr and lokr.target_classes else lora.target,
        base_model="FLUX.2-" + config.model.flavour, steps=step, dataset_fingerprint=dataset_fingerprint,
        extra={"adapter_type": "lokr", "lycoris_config": json.loads(lokr.document)} if lokr else
        {"adapter_type": "lora"})
    # SimpleTuner's name for it too: Apply LoRA names both flavours when the LoRA meets another FLUX.2 size.
    metadata["model_flavour"] = json.dumps(config.model.flavour)
    if ema:
        metadata["ema_decay"] = json.dumps(config.ema.decay)
    if lokr is not None:  # LyCORIS LoKr: ComfyUI's lokr_* keys, q/k/v fused (trainer/lokr_keys.py)
        save_trained_lokr(path, state=state, scales=lokr_scales(model.inner), metadata=metadata)
        return
    comfy = diffusers_to_comfy(state, alpha=lora.alpha, rank=lora.rank, hidden_size=model.hidden_size)
    save_lora_file(path, state=comfy, metadata=metadata, layout="comfyui")


def _micro_batches(batches, count: int, *, manifest, dtype) -> list[Any]:
    from .manifest import load_batch

    refs = [next(batches) for _ in range(count)]
    return [load_batch(manifest, r.indices, references=r.references or None, captions=r.captions or None,
                       dtype=dtype) for r in refs]
