"""The streaming pipeline: shard assignment, shuffling, decoding, batching in workers, position.

Each (rank, worker) slot reads its own part of the epoch:

* non-resampled: the shard list (all sources concatenated, shuffled by (seed, epoch) when
  training) is split by rank then by worker (`shards[rank::world][worker::workers]`). With
  fewer shards than world x workers slots, every slot reads every shard and keeps the samples
  whose index in the shard, offset by the shard's position, falls on its slot: no sample is
  read twice or lost either way.
* resampled: each slot draws shards with replacement (source by weight, then a shard) from a
  generator seeded by (seed, epoch, rank, worker) and stops after its share of
  `samples_per_epoch` (whole batches, rounded up as open_clip does).

Samples pass a shuffle buffer (training), are decoded, and are batched in the worker. Each
batch carries the worker's position: raw samples drawn from the buffer so far ("drawn"),
batches made and skip counts. Everything a slot does is a deterministic function of (seed,
epoch, rank, worker), so a position is restored by replaying the slot's raw sample stream up
to "drawn" without decoding it (tar bytes are read again, nothing is decoded).
"""
from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import math
import multiprocessing
import os
import signal
import weakref
import zlib
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xfast.data.config import DataConfig
from xfast.data.processors import PROCESSORS
from xfast.data.skips import DataError, SampleSkipped, empty_counts
from xfast.data.sources import expand_urls, read_shard, read_sizes, shard_sizes
from xfast.data.transfer import as_sent, for_pipe, from_pipe, large_pipe_context

log = logging.getLogger("xfast.data")

STATE_VERSION = 1


def shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle: keep `size` samples, emit a random one for each new arrival."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class _Streak:
    """Unusable samples/shards in a row in one worker; reset by each usable sample."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    @property
    def exceeded(self) -> bool:
        return self.count >= self.limit


class ShardStream(IterableDataset):
    """Yields finished batches (with position metadata) for the current worker slot."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: list[list[str]], *, rank: int, world_size: int,
                 train: bool, shared_epoch):
        self.cfg = cfg
        self.sources = sources
        self.urls = [url for urls in sources for url in urls]
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.shared_epoch = shared_epoch
        self.chain_epochs = False  # workers go on into the next epoch (StreamingLoader sets it)
        self.processor = PROCESSORS[cfg.modality](cfg, tokenizer, train)
        self.resume: dict | None = None  # set by the loader before workers start

    # Shard plan -------------------------------------------------------------------------

    def shard_order(self, epoch: int) -> list[str]:
        if self.train and self.cfg.shard_shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.urls))
            return [self.urls[i] for i in order]
        return list(self.urls)

    def slot_plan(self, epoch: int, worker: int, num_workers: int) -> list[tuple[int, str, bool]]:
        """(position in the epoch's order, url, split by sample) for every shard this slot reads."""
        order = self.shard_order(epoch)
        slots = self.world_size * num_workers
        if len(order) >= slots:
            positions = list(range(len(order)))[self.rank::self.world_size][worker::num_workers]
            return [(p, order[p], False) for p in positions]
        return [(p, url, True) for p, url in enumerate(order)]

    def batches_per_worker(self, num_workers: int) -> int:
        """Resampled mode: batches each worker makes per epoch."""
        global_batch = self.cfg.batch_size * self.world_size
        num_batches = math.ceil(self.cfg.samples_per_epoch / global_batch)
        return math.ceil(num_batches / num_workers)

    # Worker side --------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        epoch = int(self.shared_epoch.value)
        resume = None
        if self.resume is not None and self.resume["epoch"] == epoch:
            resume = self.resume["workers"][worker]
        if info is None:
            return self._run(epoch, worker, num_workers, resume)
        if self.chain_epochs:
            return map(for_pipe, self._epochs_from(epoch, worker, num_workers, resume))
        return map(for_pipe, self._run(epoch, worker, num_workers, resume))

    def _epochs_from(self, epoch: int, worker: int, num_workers: int, resume: dict | None):
        """This slot's items of `epoch`, then of every later epoch (each ends with its end marker):
        a worker goes on into the next epoch while the main process still reads the last batches
        of the others, up to prefetch_factor items of the epoch after the one the main process is
        in (shared_epoch); beyond that it sends idle markers instead of waiting, because the main
        process takes the workers' results in turn and would wait for this one first."""
        while True:
            items = self._run(epoch, worker, num_workers, resume)
            made = 0  # items of this epoch so far
            while True:
                while epoch > self.shared_epoch.value and (epoch > self.shared_epoch.value + 1
                                                           or made >= self.cfg.prefetch_factor):
                    yield {"__worker__": worker, "__idle__": True}
                item = next(items, None)
                if item is None:
                    break
                made += 1
                yield item
            epoch, resume = epoch + 1, None

    def _raw_samples(self, epoch: int, worker: int, num_workers: int, counts: dict, streak: _Streak):
        def on_skip(kind: str, detail: str) -> None:
            counts[kind] += 1

        def read(url: str) -> Iterator[dict]:
            produced = False
            for sample in read_shard(url, on_skip, csv_columns=self.cfg.text.nli_csv_columns):
                produced = True
                yield sample
            if not produced:
                streak.count += 1

        if self.cfg.resampled:
            rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, worker, 1])
            weights = np.array([s.weight for s in self.cfg.sources], dtype=np.float64)
            weights /= weights.sum()
            while not streak.exceeded:
                urls = self.sources[int(rng.choice(len(self.sources), p=weights))]
                yield from read(urls[int(rng.integers(len(urls)))])
            return
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        for position, url, by_sample in self.slot_plan(epoch, worker, num_workers):
            if streak.exceeded:
                return
            for sample in read(url):
                if not by_sample or (sample["__index__"] + position) % slots == slot:
                    yield sample

    def _augment_rng(self, epoch: int, sample: dict) -> np.random.Generator:
        """Per-sample randomness from (seed, epoch, sample): independent of the worker layout."""
        ident = zlib.crc32(f"{sample['__url__']}\0{sample['__key__']}".encode())
        entropy = [self.cfg.seed, epoch, ident]
        if 0 <= self.cfg.seed < 2**32 and epoch < 2**32:
            # The uint32 words SeedSequence makes of these ints itself (one word each): the same
            # generator, without its per-int Python conversion (a third of the time).
            entropy = np.array(entropy, dtype=np.uint32)
        return np.random.default_rng(entropy)

    def _run(self, epoch: int, worker: int, num_workers: int, resume: dict | None):
        counts = empty_counts()
        streak = _Streak(self.cfg.max_consecutive_skips)
        replay = resume["drawn"] if resume else 0
        batches = resume["batches"] if resume else 0
        quota = self.batches_per_worker(num_workers) if self.cfg.resampled else None

        def meta(**extra) -> dict:
            return {"__worker__": worker, "__epoch__": epoch, "__drawn__": drawn, "__batches__": batches,
                    "__skips__": dict(counts), **extra}

        drawn = replay
        if resume is not None and (resume["done"] or (quota is not None and batches >= quota)):
            counts.update(resume["skips"])
            yield meta(__end__=True, __gave_up__=None)
            return

        samples = self._raw_samples(epoch, worker, num_workers, counts, streak)
        if self.train and self.cfg.shuffle_buffer > 0:
            buffer_rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, worker, 2])
            samples = shuffled(samples, self.cfg.shuffle_buffer, buffer_rng)
        drawn = 0
        items: list[dict] = []
        gave_up = None
        for sample in samples:
            drawn += 1
            if drawn <= replay:  # restoring a position: these were consumed before
                streak.count = 0  # not decoded: assume usable, so unreadable shards cannot end the replay
                if drawn == replay:
                    counts.clear()
                    counts.update(resume["skips"])
                continue
            try:
                items.append(self.processor.process(sample, self._augment_rng(epoch, sample)))
                streak.count = 0
            except SampleSkipped as skip:
                counts[skip.kind] += 1
                streak.count += 1
            except Exception as err:  # an unforeseen decoder failure must not kill the worker
                log.warning("skipping sample %s of %s: %r", sample["__key__"], sample["__url__"], err)
                counts[self.processor.corrupt_kind] += 1
                streak.count += 1
            if streak.exceeded:
                gave_up = (f"worker {worker} of rank {self.rank} found {streak.count} unusable samples or shards "
                           f"in a row (data.max_consecutive_skips)")
                break
            if len(items) == self.cfg.batch_size:
                batch = self.processor.collate(items)
                items = []
                batches += 1
                batch.update(meta())
                yield batch
                if quota is not None and batches >= quota:
                    break
        samples.close()  # after leaving early: close the open shard (and its pipe) now
        if drawn < replay:
            raise DataError(f"cannot restore the position of worker {worker} (rank {self.rank}): the data holds "
                            f"{drawn} samples for it, the saved position is {replay}; did the shards change?")
        keep_last = not (self.train and self.cfg.drop_last) and quota is None
        if items and keep_last and gave_up is None:
            batch = self.processor.collate(items)
            batches += 1
            batch.update(meta())
            yield batch
        if gave_up is None and streak.exceeded:
            gave_up = (f"worker {worker} of rank {self.rank}: no readable shard in "
                       f"{streak.count} tries (data.max_consecutive_skips)")
        yield meta(__end__=True, __gave_up__=gave_up)


def _leave_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM (Ctrl-C reaches the whole process group, the deepspeed
    launcher terminates the whole process tree): the training process decides how to stop
    (xfast.training.signals), and a worker dying first would fail its next batch. Workers exit
    with the training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Worker iterators alive in this process. Workers ignore SIGTERM, so multiprocessing's own exit
# handler (terminate daemonic children, then join them) would wait forever on a loader still
# referenced when the program ends; this handler, registered after it, runs before it.
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    for iterator in list(_RUNNING):
        iterator._shutdown_workers()


class _InTurns:
    """The main side of workers that chain epochs. torch hands out each worker's next item in a
    fixed cycle, and a chained worker never ends, so its items of the next epoch come while the
    others finish the current one: they wait in one queue per worker (idle markers are dropped).
    `epoch()` reads the items in the order a fresh DataLoader gives them: the workers in turn, each
    leaving the cycle after its end marker; the turn is kept when a loop is left early.

    Resumed mid-epoch (`positions`), the turn goes on where it stood: in turns, the next batch
    comes from the worker, among those not done, that has delivered the fewest (the lowest
    index on a tie). A worker that was done sends its end marker again at its first turn."""

    def __init__(self, source: Iterator[dict], positions: list[dict]):
        self.source = source
        self.waiting = [collections.deque() for _ in positions]
        self.cycle = list(range(len(positions)))  # workers not yet at their end marker
        running = [(p["batches"], w) for w, p in enumerate(positions) if not p["done"]]
        self.turn = min(running)[1] if running else 0  # index in cycle of the next worker

    def next_epoch(self) -> None:
        self.cycle, self.turn = list(range(len(self.waiting))), 0

    def epoch(self) -> Iterator[dict]:
        while self.cycle:
            worker = self.cycle[self.turn]
            queue = self.waiting[worker]
            while not queue:
                item = next(self.source)
                if not item.get("__idle__"):
                    self.waiting[item["__worker__"]].append(item)
            item = queue.popleft()
            if item.get("__end__"):
                del self.cycle[self.turn]
            else:
                self.turn += 1
            if self.turn >= len(self.cycle):
                self.turn = 0
            yield item


class StreamingLoader:
    """Iterates one epoch of batches per `for` loop; reports and restores its position.

    After a complete epoch the loader moves on to the next epoch by itself; `set_epoch` picks
    one explicitly (as DistributedSampler does). The position is per rank: each rank saves its
    own `state_dict()`.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 train: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.cfg = cfg
        self.train = train
        self.rank = rank
        self.world_size = world_size
        sources = [expand_urls(s.urls, f"data.sources[{i}].urls") for i, s in enumerate(cfg.sources)]
        self._shared_epoch = multiprocessing.Value("q", epoch)
        self._dataset = ShardStream(cfg, tokenizer, sources, rank=rank, world_size=world_size, train=train,
                                    shared_epoch=self._shared_epoch)
        self._num_slots = max(1, cfg.num_workers)
        self._epoch = epoch
        self._positions = self._fresh_positions()
        self._last_skips = empty_counts()
        self._loader: DataLoader | None = None
        self._turns: _InTurns | None = None  # the workers' results when they chain epochs

    # Properties ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int | None:
        """Samples in one pass over all sources (from sizes.json), None when unknown."""
        sizes = [read_sizes(urls) for urls in self._dataset.sources]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch on this rank: exact in resampled mode; otherwise the most it can be
        from sizes.json (bad samples make it fewer), or None when sizes are unknown."""
        if self.cfg.resampled:
            return self._dataset.batches_per_worker(self._num_slots) * self._num_slots
        sizes = shard_sizes(self._dataset.urls)
        if sizes is None:
            return None
        size_of = dict(zip(self._dataset.urls, sizes))
        total = 0
        slots = self.world_size * self._num_slots
        for worker in range(self._num_slots):
            slot = self.rank * self._num_slots + worker
            samples = 0
            for position, url, by_sample in self._dataset.slot_plan(self._epoch, worker, self._num_slots):
                size = size_of[url]
                # by sample: indices i with (i + position) % slots == slot
                samples += len(range((slot - position) % slots, size, slots)) if by_sample else size
            full, rest = divmod(samples, self.cfg.batch_size)
            total += full + (1 if rest and not (self.train and self.cfg.drop_last) else 0)
        return total

    # Epochs and iteration ------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; the current epoch keeps its position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._positions = self._fresh_positions()
            if self._turns is not None:  # chained workers are in another epoch
                self._stop_workers()
            if self._dataset.resume is not None:  # workers holding a stale resume point must restart
                self._dataset.resume = None
                self._loader = None

    def __iter__(self) -> Iterator[dict]:
        if self._started() and self._turns is None:
            # Continue mid-epoch: new workers replay to the position delivered so far.
            self._dataset.resume = self.state_dict()
            self._loader = None
        self._shared_epoch.value = self._epoch  # chained workers may now run ahead into the next epoch
        if self.cfg.num_workers == 0:
            source = iter(self._dataset)
        elif self._chains_epochs():
            if self._turns is None:
                self._dataset.chain_epochs = True
                self._turns = _InTurns(iter(self._get_loader()), self._positions)
                _RUNNING.add(self._turns.source)
            source = self._turns.epoch()
        else:
            source = iter(self._get_loader())
            _RUNNING.add(source)
        for item in source:
            worker = item.pop("__worker__")
            if item.pop("__epoch__") != self._epoch:
                raise RuntimeError("a worker produced data of another epoch")
            position = self._positions[worker]
            position["drawn"] = item.pop("__drawn__")
            position["batches"] = item.pop("__batches__")
            position["skips"] = item.pop("__skips__")
            if item.pop("__end__", False):
                position["done"] = True
                gave_up = item.pop("__gave_up__")
                if gave_up is not None:
                    raise DataError(f"{gave_up}; skipped so far: {self._nonzero(self.skip_counts())}")
                continue
            yield from_pipe(item)
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        if not all(p["done"] for p in self._positions):
            return  # the loop was left early
        self._last_skips = self.skip_counts()
        if sum(p["batches"] for p in self._positions) == 0:
            skipped = self._nonzero(self._last_skips)
            drawn = [p["drawn"] for p in self._positions]
            if not any(drawn):
                reason = "the shards assigned to this rank hold no samples"
            elif skipped and sum(skipped.values()) >= sum(drawn):
                reason = f"every sample was unusable: {skipped}"
            else:  # too few samples per worker: short batches are dropped
                reason = (f"its {len(drawn)} data worker(s) read {' + '.join(map(str, drawn))} samples"
                          f"{f' (unusable: {skipped})' if skipped else ''}, fewer than a batch each (data.drop_last "
                          f"drops short batches); lower data.batch_size or data.num_workers, use fewer ranks, or "
                          f"add samples")
            raise DataError(f"epoch {self._epoch} gave rank {self.rank} no batch of {self.cfg.batch_size}: {reason}")
        self._epoch += 1
        self._positions = self._fresh_positions()
        self._dataset.resume = None
        if self._turns is not None:
            self._turns.next_epoch()

    def _chains_epochs(self) -> bool:
        """Training with persistent workers: they go on into the next epoch (ShardStream._epochs_from)
        instead of waiting for the main process to ask for it, so an epoch starts with its first
        batches made, without the cold start (shuffle buffer refilled, first batch decoded) in the
        step's way. An evaluation loader reads one pass and stops: its workers prefetch nothing."""
        return self.train and self.cfg.persistent_workers and self.cfg.num_workers > 0

    def _stop_workers(self) -> None:
        self._loader = None
        self._turns = None

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                      persistent_workers=self.cfg.persistent_workers,
                                      prefetch_factor=self.cfg.prefetch_factor, worker_init_fn=_leave_stop_signals,
                                      collate_fn=as_sent, multiprocessing_context=large_pipe_context())
        return self._loader

    def close(self) -> None:
        """Stop persistent workers."""
        self._stop_workers()

    # Position and skip counts --------------------------------------------------------------

    def _fresh_positions(self) -> list[dict]:
        return [{"drawn": 0, "batches": 0, "skips": empty_counts(), "done": False} for _ in range(self._num_slots)]

    def _started(self) -> bool:
        return any(p["drawn"] or p["batches"] or p["done"] for p in self._positions)

    def _order_signature(self) -> dict:
        """What fixes the sample order; a saved position only fits a loader that matches it."""
        digest = hashlib.sha1("\n".join(self._dataset.urls).encode()).hexdigest()
        cfg = self.cfg
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": self._num_slots,
                "train": self.train, "seed": cfg.seed, "resampled": cfg.resampled,
                "shard_shuffle": cfg.shard_shuffle, "shuffle_buffer": cfg.shuffle_buffer,
                "modality": cfg.modality, "shards_sha1": digest}

    def state_dict(self) -> dict:
        """Position as plain data: epoch and, per worker, raw samples drawn, batches, skip counts."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "order": self._order_signature(),
                "workers": [dict(p, skips=dict(p["skips"])) for p in self._positions]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batches are the ones that followed it."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"not a data loader state of version {STATE_VERSION}: {state!r:.200}")
        mine = self._order_signature()
        diff = {k: (v, mine.get(k)) for k, v in state["order"].items() if mine.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise DataError(f"the saved data position does not fit this loader ({detail})")
        self._epoch = int(state["epoch"])
        self._positions = [dict(p, skips={**empty_counts(), **p["skips"]}) for p in state["workers"]]
        self._dataset.resume = self.state_dict() if self._started() else None
        self._stop_workers()

    def skip_counts(self) -> dict[str, int]:
        """Unusable data per kind, summed over workers, in the current epoch (or the one just
        finished when the current one has not started)."""
        if not self._started():
            return dict(self._last_skips)
        total = empty_counts()
        for position in self._positions:
            for kind, count in position["skips"].items():
                total[kind] += count
        return total

    @staticmethod
    def _nonzero(counts: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in counts.items() if v}


def build_loader(cfg: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 train: bool = True) -> StreamingLoader:
    """The batch stream for one rank.

    cfg: the parsed "data" section. tokenizer: the text tower's HF (fast) tokenizer, which must
    have a pad token. train=False gives evaluation order and preprocessing: no shuffling,
    centre crop, audio from its start, all captions in "captions", no batch dropped.
    """
    return StreamingLoader(cfg, tokenizer, rank=rank, world_size=world_size, epoch=epoch, train=train)
