"""The study's arms: {CLIP, CyCLIP, CLAP, CyCLAP} x {no, unsupervised, supervised SimCSE}.

An arm contributes the `objective` section of its built-in config `study/<name>` (CyCLIP's
lambdas and the SimCSE mode); the towers, data and schedule come from the study's base config,
so every arm of a study shares one architecture and only the objective changes. The family
fixes the media: clip/cyclip arms need an image base, clap/cyclap arms an audio base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from xfast.config import ConfigError
from xfast.training.config import resolve_config_path

FAMILIES = {"clip": "image", "cyclip": "image", "clap": "audio", "cyclap": "audio"}
SIMCSE_MODES = ("none", "unsup", "sup")
GRID = tuple(f"{family}_{mode}" for family in FAMILIES for mode in SIMCSE_MODES)


@dataclass(frozen=True)
class Arm:
    name: str
    family: str
    simcse: str

    @property
    def modality(self) -> str:
        return FAMILIES[self.family]

    def objective(self) -> dict:
        """The `objective` section of the built-in config study/<name>."""
        raw = json.loads(resolve_config_path(f"study/{self.name}").read_text())
        return raw["objective"]


def parse_arms(text: str | None, modalities: set[str]) -> list[Arm]:
    """Arms from 'clip_none,clip_unsup,...' (None: every grid arm whose media one of the bases
    trains); an unknown arm or one without a base of its media is a ConfigError."""
    names = GRID if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--arms: no arm given")
    arms = []
    for name in names:
        family, _, mode = name.partition("_")
        if family not in FAMILIES or mode not in SIMCSE_MODES:
            raise ConfigError(f"--arms: {name!r} is not an arm; choose from {', '.join(GRID)}")
        arm = Arm(name, family, mode)
        if arm.modality not in modalities:
            if text is None:
                continue
            raise ConfigError(f"--arms: {name} trains on {arm.modality}, but no --base config has a "
                              f"{arm.modality} tower (bases train: {', '.join(sorted(modalities)) or 'nothing'})")
        arms.append(arm)
    if len(set(arms)) != len(arms):
        raise ConfigError(f"--arms: an arm is listed twice in {text!r}")
    return arms
