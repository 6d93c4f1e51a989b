"""The training inputs: one endless iterator per data stream, with data-wait timing, skip totals
over epochs, and a position that checkpoints save and resume restores."""
from __future__ import annotations

import time

import torch

from xfast.data import build_loader
from xfast.data.skips import empty_counts


class EndlessStream:
    """Batches of one StreamingLoader across epochs (the loader moves to the next epoch itself)."""

    def __init__(self, name: str, cfg, tokenizer, *, rank: int, world_size: int):
        self.name = name
        self.loader = build_loader(cfg, tokenizer, rank=rank, world_size=world_size, train=True)
        self.finished_skips = empty_counts()  # summed over the epochs already completed
        self._iterator = None

    def next(self) -> dict:
        # A DataLoader draws its workers' base seed from the global torch RNG when its iterator
        # starts (first batch, each epoch, each resume); restoring the state keeps dropout masks
        # the same whether or not a resume restarted the workers.
        rng = torch.get_rng_state()
        try:
            return self._next()
        finally:
            torch.set_rng_state(rng)

    def _next(self) -> dict:
        for _attempt in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
                for kind, count in self.loader.skip_counts().items():  # the epoch just finished
                    self.finished_skips[kind] += count
        raise RuntimeError(f"data stream {self.name!r} gave an empty epoch")

    def skip_counts(self) -> dict[str, int]:
        """Unusable samples/shards of this rank so far in the run."""
        current = self.loader.skip_counts() if self._iterator is not None else empty_counts()
        return {k: self.finished_skips[k] + current.get(k, 0) for k in self.finished_skips}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "finished_skips": dict(self.finished_skips)}

    def close(self) -> None:
        """Stop the loader's worker processes (a later next() starts them again)."""
        self._iterator = None
        self.loader.close()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.finished_skips = {**empty_counts(), **state["finished_skips"]}
        self._iterator = None


def batch_rows(batch: dict) -> int:
    """Samples in a batch of any stream: the rows of its first tensor."""
    return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]


class Streams:
    """Named streams ("pairs", "sentences", "nli"); `draw` takes one batch from each one asked."""

    def __init__(self, streams: dict[str, EndlessStream]):
        self.streams = streams
        self.wait_seconds = 0.0

    @classmethod
    def from_config(cls, sections: dict, tokenizer, *, rank: int, world_size: int) -> "Streams":
        """One stream per data section that is set, e.g. {"pairs": cfg.data, "sentences": None}."""
        return cls({name: EndlessStream(name, section, tokenizer, rank=rank, world_size=world_size)
                    for name, section in sections.items() if section is not None})

    def draw(self, names) -> dict:
        start = time.perf_counter()
        batch = {name: self.streams[name].next() for name in names}
        self.wait_seconds += time.perf_counter() - start
        return batch

    def take_wait(self) -> float:
        """Seconds spent waiting for data since the previous call."""
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait

    def skip_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for stream in self.streams.values():
            for kind, count in stream.skip_counts().items():
                total[kind] = total.get(kind, 0) + count
        return total

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ValueError(f"the checkpoint has no data position for stream(s) {sorted(missing)}")
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])
