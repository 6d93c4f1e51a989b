"""Streaming WebDataset input pipeline: image, audio and text shards, batched in workers.

    cfg = xfast.config.parse(DataConfig, raw["data"], "data")
    loader = build_loader(cfg, tokenizer, rank=rank, world_size=world_size)
    for batch in loader: ...                  # one epoch; the next loop is the next epoch
    state = loader.state_dict()               # position, saved with the checkpoint
    loader.load_state_dict(state)             # resume mid-epoch
    loader.skip_counts()                      # {"corrupt_image": 3, ...}
"""
from xfast._lazy import lazy_exports

# Imported on first use, so that the config module loads without torch and webdataset.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["AudioConfig", "DataConfig", "ImageConfig", "SourceConfig", "TextConfig"], "xfast.data.config"),
    **dict.fromkeys(["StreamingLoader", "build_loader"], "xfast.data.pipeline"),
    **dict.fromkeys(["SKIP_KINDS", "DataError"], "xfast.data.skips"),
    **dict.fromkeys(["expand_urls", "read_sizes"], "xfast.data.sources"),
})

__all__ = ["DataConfig", "SourceConfig", "ImageConfig", "AudioConfig", "TextConfig", "build_loader",
           "StreamingLoader", "DataError", "SKIP_KINDS", "expand_urls", "read_sizes"]
