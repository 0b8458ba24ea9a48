"""Which items each training process loads at each step: deterministic, resumable, rank-sharded batches."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .manifest import Manifest


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchRef:
    indices: tuple[int, ...]
    """Manifest item indices, all from one bucket of one dataset."""
    bucket: tuple[int, int]
    epoch: int
    position: int
    """This rank's batch index within the epoch (0-based)."""
    references: tuple[tuple[int, ...], ...] = ()
    """Per sample, which of its item's references it trains with (all, or one under random sampling);
    empty for a plain text-to-image batch. Every sample of a batch has references of the same shapes."""
    captions: tuple[int, ...] = ()
    """Per sample, which of its item's captions it trains with (index into ManifestItem.captions)."""


_Sample = tuple[int, tuple[int, ...], int]
"""(item index, reference choice, caption choice) of one sample in a planned batch."""


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class BucketBatchSampler:
    """Deterministic, resumable, rank-sharded single-bucket batches of manifest item indices.

    Each epoch, for every rank alike: items expanded by their repeats, shuffled by (seed, epoch), split per
    group (dataset, bucket and, for edit items, the buckets of the references used) into *global* batches of batch_size x world_size items, the list of global batches shuffled by
    (seed, epoch); at each step rank r takes slice [r * batch_size, (r + 1) * batch_size) of the global batch.
    With several datasets the epoch is then filled SimpleTuner's way: the next batch comes from a dataset
    drawn among those with batches left, weighted by its probability (a random.Random seeded by seed and
    epoch), in that dataset's shuffled order; every batch still comes once per epoch. Items of datasets with
    probability 0 are left out. One dataset keeps the shuffled order as it is. An item with several captions
    trains each sample with one, drawn from (seed, epoch, item, copy) like the references.
    So all ranks step together on one bucket, and a run on 1 process with batch 2 sees exactly the samples a
    run on 2 processes with batch 1 sees (the trainer's noise is keyed by the sample's place in the global
    batch, so their losses agree too).

    A bucket's last global batch may be short. With drop_last=False (default) it is kept: on one process as a
    smaller batch (no image is left out, none repeated); on several processes it is filled up with the first
    items of the same bucket, as torch's DistributedSampler pads, so every rank gets batch_size items. With
    drop_last=True it is dropped. With repeats > 1 two copies of one image can share a batch.

    state_dict() is (epoch, position): position counts the global batches handed out in that epoch. Use one
    iter_batches() iterator at a time; it advances the state as it yields.
    """

    STATE_VERSION = 3
    """3: batches of several datasets ordered by probability; a version 2 state resumes on one dataset only."""

    def __init__(self, manifest: Manifest, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size.")
        self.manifest = manifest
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, list[list[_Sample]]] | None = None
        if not any(manifest.probability(item.source) > 0 for item in manifest.items):
            raise ValueError(
                f"dataset {manifest.path}: every dataset with items has probability 0 "
                f"({', '.join(sorted({it.source for it in manifest.items}))}), so nothing would be trained on; give "
                "at least one a probability above 0 in its data_backend_config and rebuild."
            )
        counts: dict[tuple[Any, ...], int] = {}
        for item in manifest.items:
            if manifest.probability(item.source) > 0:
                counts[(item.source, item.bucket)] = counts.get((item.source, item.bucket), 0) + item.repeats
        # Under random reference sampling the groups (and so the count) can change by epoch: len() is epoch 0's.
        self.batches_per_epoch = len(self._epoch_samples(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset {manifest.path} gives no full batch per epoch (batch_size {batch_size} x {world_size} "
                f"processes, {sum(counts.values())} item copies in {len(counts)} buckets, drop_last=True); lower "
                "batch_size, raise repeats, add images or set drop_last off."
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch (the same for every rank)."""
        return self.batches_per_epoch

    def _choice(self, index: int, *, epoch: int, copy: int) -> tuple[int, ...]:
        """Which references of an item a sample uses: all (combined), or one drawn per (seed, epoch, copy)."""
        item = self.manifest.items[index]
        if not item.references:
            return ()
        if len(item.references) == 1 or self.manifest.sampling_mode(index) == "combined":
            return tuple(range(len(item.references)))
        rng = random.Random(_derived_seed(self.seed, epoch, "reference", index, copy))
        return (rng.randrange(len(item.references)),)

    def _caption_choice(self, index: int, *, epoch: int, copy: int) -> int:
        """Which caption of an item a sample trains with: drawn per (seed, epoch, item, copy), never per rank."""
        count = len(self.manifest.items[index].captions)
        if count == 1:
            return 0
        return random.Random(_derived_seed(self.seed, epoch, "caption", index, copy)).randrange(count)

    def _group(self, index: int, choice: tuple[int, ...]) -> tuple[Any, ...]:
        # A batch shares the dataset, the target bucket and every chosen reference's bucket (tensor shapes).
        item = self.manifest.items[index]
        return (item.source, item.bucket, tuple(item.references[k].bucket for k in choice))

    def _epoch_samples(self, epoch: int) -> list[list[_Sample]]:
        """The global batches of an epoch as (item index, reference choice, caption choice) samples."""
        order = [(i, c) for i, item in enumerate(self.manifest.items) for c in range(item.repeats)
                 if self.manifest.probability(item.source) > 0]
        rng = random.Random(_derived_seed(self.seed, epoch, "items"))
        rng.shuffle(order)
        by_group: dict[tuple[Any, ...], list[_Sample]] = {}
        for i, copy in order:
            choice = self._choice(i, epoch=epoch, copy=copy)
            caption = self._caption_choice(i, epoch=epoch, copy=copy)
            by_group.setdefault(self._group(i, choice), []).append((i, choice, caption))
        size = self.global_batch_size
        batches = []
        for samples in by_group.values():
            for start in range(0, len(samples), size):
                batch = samples[start : start + size]
                if len(batch) < size:
                    if self.drop_last:
                        continue
                    if self.world_size > 1:  # pad like DistributedSampler so every rank gets a full batch
                        batch = batch + [samples[k % len(samples)] for k in range(size - len(batch))]
                batches.append(batch)
        random.Random(_derived_seed(self.seed, epoch, "batches")).shuffle(batches)
        return self._order_by_probability(batches, epoch=epoch)

    def _order_by_probability(self, batches: list[list[_Sample]], *, epoch: int) -> list[list[_Sample]]:
        """SimpleTuner's dataset draw, planned for the epoch: until every dataset is exhausted, draw a dataset
        among those with batches left, weighted by probability, and take its next batch."""
        queues: dict[str, list[list[_Sample]]] = {}
        for batch in batches:  # a batch holds one dataset; each queue keeps the shuffled order
            queues.setdefault(self.manifest.items[batch[0][0]].source, []).append(batch)
        if len(queues) < 2:
            return batches
        rng = random.Random(_derived_seed(self.seed, epoch, "datasets"))
        left = sorted(queues)
        taken = dict.fromkeys(left, 0)
        ordered = []
        while left:
            name = rng.choices(left, weights=[self.manifest.probability(n) for n in left])[0]
            ordered.append(queues[name][taken[name]])
            taken[name] += 1
            if taken[name] == len(queues[name]):
                left.remove(name)
        return ordered

    def epoch_plan(self, epoch: int) -> list[tuple[int, ...]]:
        """The global batches of an epoch (item indices), in order (length batches_per_epoch)."""
        return [tuple(s[0] for s in b) for b in self._epoch_samples(epoch)]

    def _rank_samples(self, epoch: int) -> list[list[_Sample]]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            lo = self.rank * self.batch_size
            self._plan_cache = (epoch, [b[lo : lo + self.batch_size] for b in self._epoch_samples(epoch)])
        return self._plan_cache[1]

    def rank_batches(self, epoch: int) -> list[tuple[int, ...]]:
        """This rank's batches of an epoch (item indices), in order (length len(self))."""
        return [tuple(s[0] for s in b) for b in self._rank_samples(epoch)]

    def iter_batches(self) -> Iterator[BatchRef]:
        """Batches forever, from the current state on; the state advances as each batch is handed out."""
        while True:
            batches = self._rank_samples(self.epoch)
            if self.position >= len(batches):
                self.epoch += 1
                self.position = 0
                continue
            samples = batches[self.position]
            indices = tuple(s[0] for s in samples)
            choices = tuple(s[1] for s in samples)
            ref = BatchRef(indices=indices, bucket=self.manifest.items[indices[0]].bucket, epoch=self.epoch,
                           position=self.position, references=choices if any(choices) else (),
                           captions=tuple(s[2] for s in samples))
            self.position += 1
            yield ref

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position, plus what must match on resume."""
        return {
            "version": self.STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "fingerprint": self.manifest.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where state_dict() was taken. The dataset, seed, batch size, world size and drop_last must
        match: each of them changes the batch plan, so resuming across a change would repeat or skip data."""
        if state.get("version") == 2:
            # Version 2 shuffled the batches of all datasets together: the same plan only for one dataset.
            sampled = {it.source for it in self.manifest.items if self.manifest.probability(it.source) > 0}
            if len(sampled) > 1:
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler state (version 2) comes from a trainer that ordered "
                    f"the batches of several datasets ({', '.join(sorted(sampled))}) differently; resuming would "
                    "repeat or skip data in this epoch. Finish the run with the trainer that started it, or start a "
                    "new run."
                )
        elif state.get("version") != self.STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {self.STATE_VERSION}.")
        mine = self.state_dict()
        for key in ("fingerprint", "seed", "batch_size", "world_size", "drop_last"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: the checkpoint's data {key} is {state.get(key)!r} but this run has {mine[key]!r}; "
                    f"resume with the same {key} (or start a new run)."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"sampler state epoch {epoch} / position {position} must be >= 0.")
        self.epoch, self.position = epoch, position


