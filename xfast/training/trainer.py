"""The training loop: a Trainer wires the components, each built from its own config section.

    data        Streams         ("data", "sentence_data", "nli_data") one endless loader per stream
    model       ContrastiveModel ("model") in a ContrastiveTask, the module DeepSpeed wraps
                (its towers torch.compile'd first if train.compile)
    objective   Objective       ("objective") plans each step: which features, which streams
    engine      DeepSpeed       ("deepspeed", "train") ZeRO, AdamW, warmup + cosine
    checkpoint  CheckpointManager ("checkpoint") atomic saves on its own schedule, exact resume
    eval        PeriodicEvaluation ("eval") xfast.eval tasks on its own schedule
    logging     TrainLogger     ("logging") progress bar, TensorBoard, metrics.jsonl

One optimizer step (train_step): the objective's plan for the step names the streams to read;
each of deepspeed.accumulation_steps micro-batches draws one batch from each of them, and
whole_batch_step turns them into one contrastive loss over the whole global batch.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from xfast.config import ConfigError
from xfast.distributed.checks import RepeatedSteps
from xfast.models import Objective, build_model
from xfast.training.accumulation import whole_batch_step
from xfast.training.checkpoint import CheckpointManager, clean_replace_leftovers, replace_dir, tag_for
from xfast.training.config import TrainConfig, check_data_fits_model, save_config
from xfast.training.engine import comm_device, engine_from_config, init_distributed, make_deterministic, relay_schedule
from xfast.training.evaluation import PeriodicEvaluation
from xfast.training.faults import fault_point
from xfast.training.logging import TrainLogger, setup_output
from xfast.training.preflight import check_free_space, check_writable
from xfast.training.process import keep_freed_memory, torch_threads
from xfast.training.signals import GracefulStop
from xfast.training.streams import Streams, batch_rows
from xfast.training.task import ContrastiveTask


@dataclass
class StepResult:
    """One optimizer step: the global batch's loss and its parts (detached, on the device: read
    them with float() only when needed, each read waits for the step to finish), the shared
    tensors as the loss saw them, and the samples of the step over all ranks."""
    step: int
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    samples: int


class Trainer:
    """Trainer(cfg).train() runs (or resumes) the whole run; train_step() runs one optimizer step.

    A process that builds several Trainers (a sweep, a notebook, tests) releases each one with
    close(), or builds it in a `with Trainer(cfg) as trainer:` block: at ZeRO-1/2 DeepSpeed's
    gradient hooks keep the engine, the optimizer state and the model alive after the last
    reference to them is dropped (torch's C++ autograd nodes hold the hooks and the parameters,
    which Python's garbage collector cannot see through). close() removes them (engine.destroy()),
    stops the loaders' worker processes and closes the log writers; the engine, model and
    optimizer state are then freed with the last reference the caller keeps. A Trainer dropped
    without close() does the same when it is freed, so its engine must not be used after that."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        setup_output(cfg.logging.progress_bar)  # before any library draws a bar or warns
        keep_freed_memory()  # before the first large allocations and before the loaders fork their workers
        self.rank, self.world = init_distributed()
        _share_cores(loader_workers=sum(s.num_workers for s in (cfg.data, cfg.sentence_data, cfg.nli_data) if s))
        self.output = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.output / "checkpoints", cfg.checkpoint.keep_last, self.rank,
                                             self.world, every_steps=cfg.checkpoint.every_steps)
        if cfg.train.deterministic:
            make_deterministic()
        check_writable(self.checkpoints.root, self.rank)
        repaired = self.checkpoints.recover()
        if self.rank == 0:
            clean_replace_leftovers(self.output / "final")
            save_config(cfg, self.output / "config.json")

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        self.model = build_model(cfg.model)
        if self.model.tokenizer is None:
            raise ConfigError("model.text.tokenizer: the text tower needs a tokenizer folder")
        check_data_fits_model(cfg, self.model.data_requirements())
        options = cfg.train.compile_options
        if options is not None:  # before DeepSpeed wraps the model
            self.model.compile_towers(mode=options.mode, dynamic=options.dynamic, backend=options.backend)
        self.objective = Objective(cfg.objective)
        self.task = ContrastiveTask(self.model, self.objective)
        self.engine = engine_from_config(self.task, deepspeed_section=cfg.deepspeed, optim=cfg.train,
                                         micro_batch_size=cfg.data.batch_size, world_size=self.world)
        # Runs at close() or when the Trainer is freed (also if the rest of __init__ fails), once.
        # It holds the parts, not the Trainer; closers gets the loaders' and logger's as they are made.
        closers = []
        self._release = weakref.finalize(self, _release, self.engine, closers)
        self._release.atexit = False  # at interpreter exit there is nothing left to free
        if cfg.deepspeed.zero_stage == 3:
            self.task.register_zero3_external_parameters()
        parameters = self._write_run_info()
        check_free_space(self.checkpoints.root, parameters=parameters, keep_last=cfg.checkpoint.keep_last,
                         export=cfg.checkpoint.export_fp32)
        torch.manual_seed(cfg.train.seed + 7919 * (self.rank + 1))  # dropout masks differ between ranks

        self.streams = Streams.from_config({"pairs": cfg.data, "sentences": cfg.sentence_data, "nli": cfg.nli_data},
                                           self.model.tokenizer, rank=self.rank, world_size=self.world)
        closers.append(self.streams.close)
        self.evaluation = PeriodicEvaluation(cfg.eval, cfg.data, zero_stage=cfg.deepspeed.zero_stage,
                                             rank=self.rank)
        # Steps of one plan repeat the same loss calls on batches of fixed size: the losses' checks
        # across ranks and of tensor values run on the first step of each plan only. A stream that
        # keeps ragged batches (data.drop_last false) changes its row count: every step checks.
        fixed_rows = all(section.drop_last for section in (cfg.data, cfg.sentence_data, cfg.nli_data) if section)
        self.repeats = RepeatedSteps() if fixed_rows else None
        self.step = 0
        # Step of the first non-finite loss (0: none), kept on the device: repeated steps skip the
        # losses' value checks, so this is read only where it matters, at logging and before a save.
        self.first_nonfinite_step: torch.Tensor | None = None
        state = self.checkpoints.load(self.engine) if cfg.checkpoint.resume != "never" else None
        if state is not None:
            self.step = state["step"]
            t = cfg.train  # the schedule of this config, also when it extends train.steps
            relay_schedule(self.engine.lr_scheduler, warmup=t.warmup, total=t.steps, floor=t.min_lr_ratio)
            self.streams.load_state_dict(state["data"])
        self.logger = TrainLogger(self.output, total_steps=cfg.train.steps, start_step=self.step,
                                  enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                  progress_bar=cfg.logging.progress_bar)
        closers.append(functools.partial(self.logger.close, plot=False))
        if repaired:
            self.logger.write(repaired)
        if state is not None:
            self.logger.write(f"resumed from {self.checkpoints.root / self.checkpoints.latest_tag()} "
                              f"at step {self.step}")

    def close(self) -> None:
        """Release the engine's hooks, the loaders' workers and the log writers (see the class
        docstring); the Trainer cannot train after it. Calling it again does nothing."""
        self._release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._release.alive:
            raise RuntimeError(CLOSED)

    def train_step(self) -> StepResult:
        """One optimizer step over deepspeed.accumulation_steps micro-batches per rank."""
        self._check_open()
        plan = self.objective.plan(self.step)
        micro = [self.streams.draw(plan.streams) for _ in range(self.cfg.deepspeed.accumulation_steps)]
        with self.repeats.step(plan) if self.repeats else contextlib.nullcontext():
            loss, parts, shared = whole_batch_step(
                self.engine, [dict(batch, plan=plan) for batch in micro],
                lambda features, shared, group: self.task.loss(features, shared, plan, group=group))
        self.step += 1
        if self.first_nonfinite_step is None:
            self.first_nonfinite_step = torch.zeros((), dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).reshape(()) & (self.first_nonfinite_step == 0)
        self.first_nonfinite_step.masked_fill_(bad, self.step)
        samples = sum(batch_rows(batch[plan.streams[0]]) for batch in micro) * self.world
        return StepResult(self.step, loss, parts, shared, samples)

    def train(self) -> int:
        """Train to train.steps (from the resumed step), then evaluate, save and export. SIGTERM /
        SIGINT stop at a step boundary all ranks agree on, after a checkpoint of that step."""
        self._check_open()
        last = self.cfg.train.steps
        if self.evaluation.due_before_training(self.step):
            self.evaluate()
        self.streams.take_wait()
        self.logger.start_window()
        with GracefulStop() as stop:
            while self.step < last:
                result = self.train_step()
                fault_point("train.step", self.step, self.rank)
                self.logger.count(result.samples, self.streams.take_wait())
                if self.step % self.cfg.logging.every_steps == 0 or self.step == last:
                    self._log(result)
                # Evaluation before the checkpoint of its step: a checkpoint at step S holds all of step S.
                if self.evaluation.due(self.step, last):
                    self.evaluate()
                    self.logger.start_window()
                if self.checkpoints.due(self.step, last):
                    self.save()
                signame = stop.stop_requested() if self.step < last else None
                if signame:
                    self.save()
                    print(f"xfast train: rank {self.rank}: stop signal ({stop.describe(signame)}): stopped after step "
                          f"{self.step}, checkpoint {self.checkpoints.latest_tag()} written; run the same command to "
                          f"resume", file=sys.stderr, flush=True)
                    self.logger.close()
                    return 0
        if not (self.checkpoints.root / tag_for(self.step)).is_dir():  # else its evaluation was logged before
            self.evaluate()
        self.save()
        skipped = _sum_over_ranks(self.streams.skip_counts())
        self.logger.write("skipped data: " + (", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"))
        if self.cfg.checkpoint.export_fp32:
            if self.rank == 0:
                self._export(self.output / "final")
                self.logger.write(f"fp32 weights: {self.output / 'final'}")
            dist.barrier()
        self.logger.close()
        return 0

    def save(self) -> None:
        self._check_open()
        self._stop_if_nonfinite()  # a checkpoint of NaN weights would replace the last good one
        self.checkpoints.save(self.engine, self.step, {"data": self.streams.state_dict()})

    def evaluate(self) -> None:
        self._check_open()
        # Compiled towers run eager here: evaluation batches vary in size and run in eval mode, each a
        # recompile that would cost more than it saves.
        with torch.compiler.set_stance("force_eager"):
            metrics = self.evaluation(self.engine.module.model)
        if metrics:
            self.logger.log_eval(self.step, metrics)

    def _log(self, result: StepResult) -> None:
        self._stop_if_nonfinite()
        scalars = {"loss": float(result.loss), "logit_scale": float(result.shared["logit_scale"].reshape(-1)[0]),
                   "lr": self.engine.get_lr()[0], **{f"loss/{k}": float(v) for k, v in result.parts.items()}}
        self.logger.log(self.step, scalars, skipped=_sum_over_ranks(self.streams.skip_counts()))

    def _stop_if_nonfinite(self) -> None:
        """Raise if a step since the start had a non-finite loss. The loss is the global one, so every
        rank takes the same decision; the latest checkpoint (written before that step) is kept."""
        step = 0 if self.first_nonfinite_step is None else int(self.first_nonfinite_step)
        if step:
            latest = self.checkpoints.latest_tag()
            raise FloatingPointError(
                f"the loss was NaN or inf at step {step}: the model's features or parameters hold NaN or inf; "
                f"no checkpoint was written after it (latest: {latest or 'none'}); lower train.lr or check the data")

    def _write_run_info(self) -> int:
        """OUTPUT/run_info.json: world size, ZeRO stage and the parameter elements each rank holds
        (under ZeRO-3 each rank keeps only its partition, ds_tensor, of every parameter)."""
        params = list(self.engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        held = torch.tensor([local], dtype=torch.long, device=comm_device())
        if self.world > 1:
            gathered = [torch.zeros_like(held) for _ in range(self.world)]
            dist.all_gather(gathered, held)
            held = torch.cat(gathered)
        if self.rank == 0:
            info = {"world_size": self.world, "zero_stage": self.cfg.deepspeed.zero_stage, "parameters": total,
                    "parameters_held_per_rank": held.cpu().tolist()}
            (self.output / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
        return total

    def _export(self, out_dir: Path) -> None:
        """Consolidated fp32 weights of the latest checkpoint, in the models' save_pretrained format;
        written beside `out_dir` and moved into place, so a kill leaves no half-written export."""
        from xfast.models.io import preprocessing_from_data
        from xfast.training.run_dir import EXPORT_RECORD

        state = self.checkpoints.fp32_state_dict()
        prefix = "model."
        model = build_model(self.cfg.model)
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        step = self.step

        def write(folder: Path) -> None:
            model.save_pretrained(str(folder), preprocessing=preprocessing_from_data(self.cfg.data))
            (folder / EXPORT_RECORD).write_text(json.dumps({"step": step}) + "\n")
            fault_point("export.written", step)

        replace_dir(out_dir, write)


CLOSED = "this Trainer was closed (close(), the end of its `with` block, or dropped): build a new one to train"


def _release(engine, closers: list) -> None:
    """What Trainer.close() releases: the loaders' workers and the log writers (closers), then
    DeepSpeed's references to the engine: engine.destroy() removes the ZeRO optimizer's gradient
    hooks (torch's autograd nodes hold them, and through them the optimizer and engine) and
    clears DeepSpeed's module-level table of module and parameter names (every engine's: only
    DeepSpeed's debug messages use it). The engine then refuses to run (a step without its hooks
    would skip the ZeRO gradient reduction). Everything runs even if a part fails; the first
    error is raised after."""
    errors = []
    for close in closers:
        try:
            close()
        except Exception as err:  # the engine must still be released
            errors.append(err)
    try:
        engine.destroy()
    finally:
        def refuse(*args, **kwargs):
            raise RuntimeError(f"DeepSpeed engine: {CLOSED}")
        engine.forward = engine.backward = engine.step = refuse
    if errors:
        raise errors[0]


def _share_cores(loader_workers: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine and their loader workers share its cores (the deepspeed launcher
        # leaves this to the user unless --bind_cores_to_rank; torchrun sets OMP_NUM_THREADS=1):
        # oversubscribing them makes every rank slower.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(torch_threads(local_ranks, loader_workers))


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    kinds = sorted(counts)
    totals = torch.tensor([counts[k] for k in kinds], dtype=torch.long, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return dict(zip(kinds, totals.cpu().tolist()))
