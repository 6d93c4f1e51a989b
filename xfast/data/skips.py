"""Kinds of unusable data the pipeline skips and counts, and the errors it raises."""
from __future__ import annotations

# Every kind a worker can count. Shard-level kinds count shards, the others count samples.
SKIP_KINDS = (
    "unreadable_shard",    # cannot be opened, empty, not a tar / not text, or a failing pipe: command
    "truncated_shard",     # ends in the middle of a member or lacks the end-of-archive block
    "missing_media",       # an image/audio sample without an image/audio file
    "corrupt_image",       # Pillow cannot decode the image
    "corrupt_audio",       # soundfile cannot decode the audio, or it holds no samples
    "corrupt_metadata",    # .json that does not parse, text that is not UTF-8
    "missing_caption",     # no caption found under any of text.caption_keys, or an empty one
    "empty_caption_list",  # a caption field holding an empty list
    "missing_text",        # a sentence or an NLI field that is missing or empty
)


class SampleSkipped(Exception):
    """Raised by a sample processor: this sample is unusable for the reason `kind`."""

    def __init__(self, kind: str, detail: str = ""):
        assert kind in SKIP_KINDS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class DataError(RuntimeError):
    """The data cannot feed training: nothing usable, or a resume state that does not fit."""


def empty_counts() -> dict[str, int]:
    return {kind: 0 for kind in SKIP_KINDS}
