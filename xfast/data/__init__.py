"""Streaming WebDataset input pipeline: image, audio and text shards, batched in workers.

    cfg = xfast.config.parse(DataConfig, raw["data"], "data")
    loader = build_loader(cfg, tokenizer, rank=rank, world_size=world_size)
    for batch in loader: ...                  # one epoch; the next loop is the next epoch
    state = loader.state_dict()               # position, saved with the checkpoint
    loader.load_state_dict(state)             # resume mid-epoch
    loader.skip_counts()                      # {"corrupt_image": 3, ...}
"""
from xfast.data.config import AudioConfig, DataConfig, ImageConfig, SourceConfig, TextConfig
from xfast.data.pipeline import StreamingLoader, build_loader
from xfast.data.skips import SKIP_KINDS, DataError
from xfast.data.sources import expand_urls, read_sizes

__all__ = ["DataConfig", "SourceConfig", "ImageConfig", "AudioConfig", "TextConfig", "build_loader",
           "StreamingLoader", "DataError", "SKIP_KINDS", "expand_urls", "read_sizes"]
