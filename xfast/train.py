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

Process settings (xfast.training.process): torch threads = cores per local rank less the rank's
loader workers unless OMP_NUM_THREADS is set; on glibc, malloc keeps freed memory for the next
step (XFAST_MALLOC=default keeps glibc's own settings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed xfast/train.py`, the launchers' convention): Python put xfast/
    # itself on sys.path, where xfast's subpackages shadow top-level ones of that name (e.g.
    # transformers probes for the `kernels` package and would find xfast/kernels).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

# Only torch-free modules here: configs are validated (and --list-configs answers) before torch,
# transformers or DeepSpeed is imported, so a config error takes a fraction of a second.
from xfast.config import ConfigError, to_dict
from xfast.training.config import TrainConfig, builtin_descriptions, describe_config, load_config
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
    except (StartupError, CheckpointError, FloatingPointError) as err:  # disk, lock files, a NaN loss
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
    """Run (or resume) the training run `cfg` (see xfast.training.trainer)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it guessed
    from xfast.training.process import freeze_objects_before_fork
    from xfast.training.trainer import Trainer
    trainer = Trainer(cfg)
    # Everything is built and the loaders fork their workers at the first batch. gc.freeze is
    # process-wide and keeps frozen cycles forever, so it belongs to this one-run process, not to
    # the Trainer class (a notebook, a sweep or a test session builds several).
    freeze_objects_before_fork()
    return trainer.train()


if __name__ == "__main__":
    sys.exit(main())
