"""Train a CLIP/CLAP-style model with DeepSpeed ZeRO and WebDataset input.

    deepspeed xfast/train.py --cfg clap.json                 # all local accelerators (or 1 CPU rank)
    deepspeed --num_gpus 2 xfast/train.py --cfg demo_clip_tiny
    torchrun --nproc_per_node 2 xfast/train.py --cfg clip.json --set train.lr=1e-4
    python -m xfast.train --cfg my_run.json                   # one process
    python -m xfast.train --cfg demo_clap_tiny --cfg study/clap_none   # layered configs

Built-in configs: clip, clap (full size; paths from $XFAST_TRAIN_SHARDS, $XFAST_EVAL_SHARDS,
$XFAST_TOKENIZER / $XFAST_TEXT_ENCODER), demo_clip_tiny, demo_clap_tiny (the demo dataset at
$XFAST_DEMO_DATA, default ~/.cache/xfast/demo-data), demo_sentences (the demo's sentence stream,
for unsupervised SimCSE arms) and the study grid study/* (model and objective sections only:
layer them over a config with data). Strings in a config may use $VAR and ~.

Everything a run does comes from one JSON config (`--help-config` lists every key); it is
validated before any work starts and saved as OUTPUT/config.json. Running the same command
again resumes from OUTPUT/checkpoints/latest: weights, optimizer, scheduler, RNG and the exact
data position.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed xfast/train.py`): Python put xfast/ itself on sys.path, where
    # xfast's own modules (config, data, models, ...) would shadow top-level ones of that name.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# Only torch-free modules here: configs are validated (and --list-configs answers) before torch,
# transformers or DeepSpeed is imported, so a config error takes a fraction of a second.
from xfast.config import ConfigError, to_dict
from xfast.training.config import (
    TrainConfig,
    builtin_descriptions,
    check_data_fits_model,
    describe_config,
    load_config,
    save_config,
)
from xfast.training.preflight import check_data_paths
from xfast.training.run_dir import ResumePlan, archive_config, plan_resume


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="xfast train", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    parser.add_argument("--cfg", metavar="NAME|PATH", action="append",
                        help="run config: a JSON file or a built-in name (--list-configs); repeat it to layer "
                             "files, later ones overriding earlier ones key by key (e.g. --cfg demo_clap_tiny "
                             "--cfg study/clap_none)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config key, e.g. --set train.lr=1e-4 --set deepspeed.zero_stage=3 "
                             "(VALUE is parsed as JSON when it can be, else taken as a string); repeatable")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (every check that needs no model: keys, sizes against the towers' "
                             "HF configs and the shards' sizes.json, resuming OUTPUT), print it resolved, and exit; "
                             "WORLD_SIZE sets the ranks assumed (default 1)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with type, default, help")
    parser.add_argument("--list-configs", action="store_true", help="list the built-in configs with a line on each")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    args = parser.parse_args(argv)
    if not (args.cfg or args.help_config or args.list_configs):
        parser.error("--cfg is required (a JSON file or a built-in name; see --list-configs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        for key, kind, default, text in describe_config():
            print(f"{key}\n    {kind} = {default}\n    {text}".rstrip())
        return 0
    if args.list_configs:
        descriptions = builtin_descriptions()
        width = max(map(len, descriptions), default=0)
        print("\n".join(f"{name:<{width}}  {text}" for name, text in descriptions.items()))
        return 0
    try:
        cfg = load_config(args.cfg, args.overrides)
        plan = plan_resume(cfg)
        check_data_paths(cfg)  # every data path exists and holds samples (reads no model)
    except ConfigError as err:
        return _config_error(err)
    if args.check:
        print(json.dumps(to_dict(cfg), indent=2))
        print(f"xfast train: config OK; {_describe_plan(cfg, plan)}", file=sys.stderr)
        return 0
    if plan is not None and plan.complete:
        _say(f"xfast train: {_describe_plan(cfg, plan)}")
        return 0
    if plan is not None:
        for warning in plan.warnings:
            _say(f"xfast train: warning: {warning}")
        if (plan.warnings or plan.forced) and _rank() == 0:
            archive_config(cfg.output_dir, plan.step)
    from xfast.training.checkpoint import CheckpointError
    from xfast.training.preflight import StartupError
    try:
        return train(cfg)
    except ConfigError as err:  # found once the model is built ('auto' towers whose config.json omits sizes)
        return _config_error(err)
    except (StartupError, CheckpointError) as err:  # disk, filesystem, lock files
        print(f"xfast train: {err}", file=sys.stderr)
        return 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(text: str) -> None:
    """Rank 0 speaks for all (every rank validates the same config)."""
    if _rank() == 0:
        print(text, file=sys.stderr, flush=True)


def _config_error(err: ConfigError) -> int:
    _say(f"xfast train: config error: {err}")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchrun's failure summary shows this file's text as the root cause, in place of its
        # "To enable traceback see ..." line (the format of torch's ErrorHandler.record_exception).
        text = f"config error: {err}"
        with open(error_file, "w") as handle:
            json.dump({"message": {"message": f"ConfigError: {err}",
                                   "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}, handle)
    return 2


def _describe_plan(cfg: TrainConfig, plan: ResumePlan | None) -> str:
    if plan is None:
        return f"a fresh run in {cfg.output_dir}"
    if plan.complete:
        return (f"{cfg.output_dir} is complete (checkpoint at step {plan.step} = train.steps); nothing to train "
                f"(raise train.steps to continue it)")
    return f"resumes {cfg.output_dir} from step {plan.step} of {cfg.train.steps}"


def train(cfg: TrainConfig) -> int:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it guessed
    from xfast.models import Objective, build_model
    from xfast.training.accumulation import whole_batch_step
    from xfast.training.checkpoint import CheckpointManager, clean_replace_leftovers, tag_for
    from xfast.training.engine import (
        build_engine,
        deepspeed_config,
        init_distributed,
        make_deterministic,
        relay_schedule,
    )
    from xfast.training.evaluation import run_evaluation
    from xfast.training.faults import fault_point
    from xfast.training.logging import TrainLogger, setup_output
    from xfast.training.preflight import check_free_space, check_writable
    from xfast.training.signals import GracefulStop
    from xfast.training.streams import EndlessStream, Streams
    from xfast.training.task import ContrastiveTask

    setup_output(cfg.logging.progress_bar)  # before any library draws a bar or warns
    rank, world = init_distributed()
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores (the deepspeed launcher leaves this to the user
        # unless --bind_cores_to_rank; torchrun sets OMP_NUM_THREADS=1): oversubscribing them
        # makes every rank slower.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    output = Path(cfg.output_dir)
    checkpoints = CheckpointManager(output / "checkpoints", cfg.checkpoint.keep_last, rank, world)
    if cfg.train.deterministic:
        make_deterministic()
    check_writable(checkpoints.root, rank)
    repaired = checkpoints.recover()
    if rank == 0:
        clean_replace_leftovers(output / "final")
        save_config(cfg, output / "config.json")

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model)
    if model.tokenizer is None:
        raise ConfigError("model.text.tokenizer: the text tower needs a tokenizer folder")
    check_data_fits_model(cfg, model.data_requirements())
    objective = Objective(cfg.objective)
    task = ContrastiveTask(model, objective)
    t = cfg.train
    engine = build_engine(
        task, ds_config=deepspeed_config(
            micro_batch_size=cfg.data.batch_size, accumulation_steps=cfg.deepspeed.accumulation_steps,
            world_size=world, zero_stage=cfg.deepspeed.zero_stage, precision=cfg.deepspeed.precision,
            gradient_clipping=cfg.deepspeed.gradient_clipping, extra=cfg.deepspeed.extra),
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps,
        tower_lr={f"model.{k}": v for k, v in t.tower_lr.items()}, warmup_steps=t.warmup,
        total_steps=t.steps, min_lr_ratio=t.min_lr_ratio)
    if cfg.deepspeed.zero_stage == 3:
        task.register_zero3_external_parameters()
    parameters = _write_run_info(engine, cfg, output, rank, world)
    check_free_space(checkpoints.root, parameters=parameters, keep_last=cfg.checkpoint.keep_last,
                     export=cfg.checkpoint.export_fp32)
    torch.manual_seed(cfg.train.seed + 7919 * (rank + 1))  # dropout masks differ between ranks

    named = {"pairs": cfg.data, "sentences": cfg.sentence_data, "nli": cfg.nli_data}
    streams = Streams({name: EndlessStream(name, c, model.tokenizer, rank=rank, world_size=world)
                       for name, c in named.items() if c is not None})
    step = 0
    state = checkpoints.load(engine) if cfg.checkpoint.resume != "never" else None
    if state is not None:
        step = state["step"]
        relay_schedule(engine.lr_scheduler, warmup=t.warmup, total=t.steps, floor=t.min_lr_ratio)
        streams.load_state_dict(state["data"])
    logger = TrainLogger(output, total_steps=t.steps, start_step=step, enabled=rank == 0,
                         tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar)
    if repaired:
        logger.write(repaired)
    if state is not None:
        logger.write(f"resumed from {checkpoints.root / checkpoints.latest_tag()} at step {step}")

    def evaluate(at_step: int) -> None:
        metrics = run_evaluation(engine, cfg, rank)
        if metrics:
            logger.log_eval(at_step, metrics)

    def save(at_step: int) -> None:
        checkpoints.save(engine, at_step, {"data": streams.state_dict()})

    if cfg.eval.before_training and step == 0:
        evaluate(0)
    streams.take_wait()
    logger.start_window()
    stop = GracefulStop().__enter__()
    while step < t.steps:
        plan = objective.plan(step)
        names = [n for n, wanted in (("pairs", plan.cross_modal or plan.captions), ("sentences", plan.sentences),
                                     ("nli", plan.nli)) if wanted]
        micro = [dict(streams.draw(names), step=step) for _ in range(cfg.deepspeed.accumulation_steps)]
        loss, parts, shared = whole_batch_step(
            engine, micro, lambda f, s, group, step=step: task.loss(f, s, step, group=group))
        step += 1
        fault_point("train.step", step, rank)
        samples = sum(len(m[names[0]]["input_ids" if names[0] != "nli" else "anchor_input_ids"]) for m in micro)
        logger.count(samples * world, streams.take_wait())
        if step % cfg.logging.every_steps == 0 or step == t.steps:
            scalars = {"loss": float(loss), "logit_scale": float(shared["logit_scale"].reshape(-1)[0]),
                       "lr": engine.get_lr()[0], **{f"loss/{k}": float(v) for k, v in parts.items()}}
            logger.log(step, scalars, skipped=_sum_over_ranks(streams.skip_counts()))
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < t.steps:
            evaluate(step)
            logger.start_window()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < t.steps:
            save(step)
        signame = stop.stop_requested() if step < t.steps else None
        if signame:
            save(step)
            print(f"xfast train: rank {rank}: stop signal ({stop.describe(signame)}): stopped after step {step}, checkpoint "
                  f"{checkpoints.latest_tag()} written; run the same command to resume", file=sys.stderr, flush=True)
            logger.close()
            return 0
    if not (checkpoints.root / tag_for(step)).is_dir():  # else the final evaluation was logged before that save
        evaluate(step)
    save(step)
    skipped = _sum_over_ranks(streams.skip_counts())
    logger.write("skipped data: " + (", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"))
    if cfg.checkpoint.export_fp32:
        if rank == 0:
            _export(cfg, checkpoints, output / "final", step)
            logger.write(f"fp32 weights: {output / 'final'}")
        dist.barrier()
    logger.close()
    return 0


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    import torch
    import torch.distributed as dist

    from xfast.training.engine import comm_device

    kinds = sorted(counts)
    totals = torch.tensor([counts[k] for k in kinds], dtype=torch.long, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return dict(zip(kinds, totals.cpu().tolist()))


def _write_run_info(engine, cfg: TrainConfig, output: Path, rank: int, world: int) -> int:
    """OUTPUT/run_info.json: world size, ZeRO stage and the parameter elements each rank holds
    (under ZeRO-3 each rank keeps only its partition, ds_tensor, of every parameter)."""
    import torch
    import torch.distributed as dist

    from xfast.training.engine import comm_device

    params = list(engine.module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    held = torch.tensor([local], dtype=torch.long, device=comm_device())
    if world > 1:
        gathered = [torch.zeros_like(held) for _ in range(world)]
        dist.all_gather(gathered, held)
        held = torch.cat(gathered)
    if rank == 0:
        info = {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "parameters": total,
                "parameters_held_per_rank": held.cpu().tolist()}
        (output / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return total


def _export(cfg: TrainConfig, checkpoints, out_dir: Path, step: int) -> None:
    """Consolidated fp32 weights of the latest checkpoint, in the models' save_pretrained format;
    written beside `out_dir` and moved into place, so a kill leaves no half-written export."""
    from xfast.models import build_model
    from xfast.models.io import preprocessing_from_data
    from xfast.training.checkpoint import replace_dir
    from xfast.training.faults import fault_point
    from xfast.training.run_dir import EXPORT_RECORD

    state = checkpoints.fp32_state_dict()
    prefix = "model."
    model = build_model(cfg.model)
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder), preprocessing=preprocessing_from_data(cfg.data))
        (folder / EXPORT_RECORD).write_text(json.dumps({"step": step}) + "\n")
        fault_point("export.written", step)

    replace_dir(out_dir, write)


if __name__ == "__main__":
    sys.exit(main())
