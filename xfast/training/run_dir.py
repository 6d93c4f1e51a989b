"""A run folder across invocations: what resuming it means, decided before anything starts.

OUTPUT/config.json records the config a run was started with and OUTPUT/checkpoints/latest
names its newest checkpoint. Before a process group, model or data loader exists (and in
`xfast train --check`), `plan_resume` compares the two with the new config:

- no checkpoint: a fresh run;
- keys that change what the run trains differ (model, objective, data, optimizer, seed,
  DeepSpeed): refused with the list of keys and the two ways out (another output_dir, or
  checkpoint.resume=force), so two configs never silently continue each other's weights;
- train.steps (or the warmup) changed: the warmup + cosine schedule is laid over the new total
  from the checkpoint's step on, and a warning says where the learning rate goes;
- the checkpoint is already at train.steps: the run is complete; fewer steps than the
  checkpoint: refused.

Only the keys in NEUTRAL may differ: where and how often the run logs, saves and evaluates
(silently), and whether the towers are compiled (with a warning: not bit-equal). Reads JSON and folder names only (no torch).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from xfast.config import ConfigError, to_dict

# Keys (exact, or a section ending in '.') that do not change what a run trains.
NEUTRAL = ("output_dir", "description", "logging.", "checkpoint.", "eval.",
           "train.compile", "train.compile.")  # compiling changes float32 rounding, not what is trained
NEUTRAL_STREAM_KEYS = ("persistent_workers", "prefetch_factor", "max_consecutive_skips")
# The schedule's length: may change on resume (the schedule is re-laid, with a warning).
SCHEDULE = ("train.steps", "train.warmup_steps", "train.warmup_fraction")
_TAG = re.compile(r"^step_(\d+)$")
EXPORT_RECORD = "xfast_export.json"  # written into OUTPUT/final with it: {"step": N}


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # a key one of two configs does not have


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1}; lists are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _neutral(key: str) -> bool:
    if any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL):
        return True
    section, _, leaf = key.partition(".")
    return section in ("data", "sentence_data", "nli_data") and leaf in NEUTRAL_STREAM_KEYS


def differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs (ABSENT where a config lacks it),
    NEUTRAL ones excluded."""
    old, now = flatten(saved), flatten(new)
    out = []
    for key in sorted(old.keys() | now.keys()):
        a, b = old.get(key, ABSENT), now.get(key, ABSENT)
        if a != b and not _neutral(key):
            out.append((key, a, b))
    return out


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """The learning-rate multiplier of linear warmup then cosine to `floor` (the trainer's schedule)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_step(output_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint in OUTPUT/checkpoints, None without one. A
    step folder exists only once complete; `latest` can lag one save behind a kill, and the
    checkpoint manager re-points it on start (xfast.training.checkpoint)."""
    root = Path(output_dir) / "checkpoints"
    steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))] \
        if root.is_dir() else []
    return max(steps, default=None)


def exported_step(output_dir: str | Path) -> int | None:
    """The checkpoint step OUTPUT/final was exported from, None without a complete export."""
    try:
        return json.loads((Path(output_dir) / "final" / EXPORT_RECORD).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class ResumePlan:
    """What starting `cfg` in its output_dir means."""
    step: int                     # the checkpoint's step (training continues from here)
    complete: bool = False        # the checkpoint is at train.steps: nothing left to train
    warnings: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)   # differing keys accepted by resume=force


def plan_resume(cfg) -> ResumePlan | None:
    """None for a fresh run; else how the run resumes. Raises ConfigError when it must not."""
    output = Path(cfg.output_dir)
    step = checkpoint_step(output)
    if step is None:
        return None
    resume = cfg.checkpoint.resume
    if resume == "never":
        raise ConfigError(f"checkpoint.resume: {output / 'checkpoints'} already holds a checkpoint (step {step}) and "
                          f"checkpoint.resume is 'never': choose another output_dir or delete them")
    saved_path = output / "config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"output_dir: {output} holds a checkpoint (step {step}) but {saved_path} cannot be read "
                          f"({err}); choose another output_dir, or set checkpoint.resume=force to resume anyway") \
            from None
    new = to_dict(cfg)
    changed = [d for d in differences(saved, new) if d[0] not in SCHEDULE]
    plan = ResumePlan(step=step)
    if changed and resume != "force":
        listing = "\n".join(f"  {key}: {a!r} -> {b!r}" for key, a, b in changed)
        raise ConfigError(
            f"output_dir: {output} holds a run (checkpoint at step {step}) whose config differs from this one in "
            f"{len(changed)} key(s) that change what it trains:\n{listing}\n"
            f"Resuming would continue that run's weights as this one's. Either give this run its own folder "
            f"(--set output_dir=...), or resume it anyway with --set checkpoint.resume=force.")
    plan.forced = [key for key, _, _ in changed]
    if plan.forced:
        plan.warnings.append(f"checkpoint.resume=force: resuming {output} at step {step} although "
                             f"{', '.join(plan.forced)} differ from its config.json")
    t = cfg.train
    saved_train = saved.get("train", {})
    was_compiled = saved_train.get("compile", False) is not False
    if was_compiled != (t.compile is not False):
        plan.warnings.append(
            f"train.compile {saved_train.get('compile', False)!r} -> {t.compile!r}: the towers now run "
            f"{'compiled' if t.compile is not False else 'eager'} from step {step} on. Allowed (same weights and "
            f"data), but float32 rounding differs, so the run is not bit-equal to one that never switched.")
    if step > t.steps:
        raise ConfigError(f"train.steps: {t.steps}, but {output} holds a checkpoint at step {step}: a run cannot be "
                          f"shortened; use another output_dir (or train.steps >= {step})")
    if step == t.steps and (not cfg.checkpoint.export_fp32 or exported_step(output) == step):
        plan.complete = True
        return plan
    old_steps = saved_train.get("steps", t.steps)
    saved_train = {k: v for k, v in saved_train.items() if k != "steps"}
    old_warmup = _warmup(saved_train, old_steps)
    if (old_steps, old_warmup) != (t.steps, t.warmup):
        floor = t.min_lr_ratio
        before = lr_factor(step - 1, old_warmup, old_steps, floor) * t.lr
        after = lr_factor(step, t.warmup, t.steps, floor) * t.lr
        plan.warnings.append(
            f"train.steps {old_steps} -> {t.steps} (warmup {old_warmup} -> {t.warmup}): the warmup + cosine schedule "
            f"is laid over the new total from step {step} on; lr {before:.3g} at the checkpoint -> {after:.3g} at step "
            f"{step + 1}, decaying to {floor * t.lr:.3g} at step {t.steps}. For a schedule planned over {t.steps} steps "
            f"from the start, train in another output_dir.")
    return plan


def _warmup(train_section: dict, steps: int) -> int:
    from xfast.training.config import OptimConfig

    keys = {"steps", "warmup_steps", "warmup_fraction"}
    return OptimConfig(**{k: v for k, v in train_section.items() if k in keys}, steps=steps).warmup


def archive_config(output_dir: str | Path, step: int) -> Path | None:
    """Keep the config a forced or extended resume replaces, as config.step_<step>.json."""
    current = Path(output_dir) / "config.json"
    if not current.is_file():
        return None
    target = current.with_name(f"config.step_{step:08d}.json")
    target.write_text(current.read_text())
    return target
