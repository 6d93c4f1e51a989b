"""The media modalities and the batch key each one's tower takes (xfast.data's batches carry it).

A leaf module: models, eval and training read these names from here.
"""
from __future__ import annotations

from collections.abc import Mapping

MEDIA_INPUT = {"image": "pixel_values", "audio": "input_features"}


def media_input(batch: Mapping, modality: str):
    """batch[MEDIA_INPUT[modality]], or a ValueError naming the key the batch lacks."""
    key = MEDIA_INPUT[modality]
    if key not in batch:
        hint = " (the audio towers take log-mel features, not waveforms)" if "waveform" in batch else ""
        raise ValueError(f"the {modality} tower needs batch[{key!r}]; the batch has keys {sorted(batch)}{hint}")
    return batch[key]
