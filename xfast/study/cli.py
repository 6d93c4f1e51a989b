"""`xfast study`: the paper's experiment grid in one command (see xfast.study)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  xfast study --base demo_clip_tiny --arms clip_none,clip_unsup,clip_sup --sentences demo_sentences \\
      --nli demo_nli --seeds 0,1,2 --out runs/study
  xfast study --base clip.json --base clap.json --sentences wiki1m.json --nli nli.json \\
      --sts stsb/sts-test.tsv --launcher deepspeed --ranks 8 --out runs/paper_grid      # all 12 arms
  python -m xfast.study.demo          # the demo study: MiniLM text tower, 3 arms x 3 seeds

Each (arm, seed) trains in OUT/runs/ARM/seedN with the layers: --base of the arm's media,
--sentences (unsupervised arms) or --nli (supervised arms), and the arm's objective
(xfast/configs/study/ARM.json) with train.seed. The same command again skips finished runs and
resumes an interrupted one. Then every run is evaluated on the same held-out data and
OUT/report.md, OUT/report.json and OUT/alignment_uniformity.png are written.
"""


def build_parser() -> argparse.ArgumentParser:
    from xfast.study.arms import GRID

    p = argparse.ArgumentParser(prog="xfast study", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train and compare the arms of a sentence-embedding study of "
                                            "contrastive cross-modal models (Zhao et al., 2024).")
    p.add_argument("--base", action="append", required=True, metavar="NAME|PATH",
                   help="training config (built-in name or JSON) with model, data, train, eval sections; one "
                        "per media: an image base for clip/cyclip arms, an audio base for clap/cyclap arms")
    p.add_argument("--arms", metavar="A,B,...",
                   help=f"comma-separated arms (default: every arm of the grid whose media has a base): "
                        f"{', '.join(GRID)}")
    p.add_argument("--seeds", default="0", metavar="S,S,...", help="training seeds, comma-separated (default 0)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="config override for every run, as for `xfast train` (e.g. train.steps=500); repeatable")
    p.add_argument("--sentences", metavar="NAME|PATH",
                   help="config layer with a sentence_data section, for the unsupervised SimCSE arms "
                        "(e.g. demo_sentences)")
    p.add_argument("--nli", metavar="NAME|PATH",
                   help="config layer with an nli_data section, for the supervised SimCSE arms (e.g. demo_nli)")
    p.add_argument("--eval-data", action="append", default=[], metavar="SHARDS",
                   help="held-out shards for retrieval and geometry, one per media in --base order (default: "
                        "the data of the base's first retrieval eval task)")
    p.add_argument("--sts", metavar="FILE",
                   help="scored text pairs (STS-B or SICK TSV, or sentence1<TAB>sentence2<TAB>score): STS "
                        "Spearman and sentence-space alignment/uniformity of every arm")
    p.add_argument("--zeroshot-data", metavar="SHARDS", help="labelled shards for zero-shot top-1")
    p.add_argument("--classnames", nargs="+", metavar="NAME", help="zero-shot class names (as `xfast eval`)")
    p.add_argument("--templates", nargs="+", metavar="TEMPLATE", help="zero-shot prompt templates (as `xfast eval`)")
    p.add_argument("--label-key", metavar="FIELD", help="zero-shot: .json field holding the label (as `xfast eval`)")
    p.add_argument("--launcher", choices=("python", "deepspeed", "torchrun"), default="python",
                   help="how each run is started: one process (python, default), or the deepspeed / torchrun "
                        "launcher with --ranks processes")
    p.add_argument("--ranks", type=int, default=1, metavar="N", help="processes per run with deepspeed/torchrun")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: evaluate the finished runs and write the report")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="study folder (runs/ and the report)")
    return p


def plan_from_args(args):
    from xfast.config import ConfigError
    from xfast.study.arms import parse_arms
    from xfast.study.runner import EvalSpec, StudyPlan
    from xfast.training.config import load_config

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, got {args.seeds!r}")
    if args.ranks < 1 or (args.launcher == "python" and args.ranks != 1):
        raise ConfigError("--ranks: must be >= 1, and more than 1 needs --launcher deepspeed or torchrun")
    bases, configs = {}, {}
    for base in args.base:
        cfg = load_config([base], args.overrides)
        modality = cfg.model.modality
        if modality in bases:
            raise ConfigError(f"--base: {bases[modality]} and {base} both train {modality}; give one base per media")
        bases[modality], configs[modality] = base, cfg
    if args.eval_data and len(args.eval_data) != len(args.base):
        raise ConfigError(f"--eval-data: give one per --base ({len(args.base)}), got {len(args.eval_data)}")
    heldout = {}
    for i, (modality, base) in enumerate(bases.items()):
        if args.eval_data:
            heldout[modality] = args.eval_data[i]
            continue
        tasks = configs[modality].eval.tasks
        data = next((t["data"] for t in tasks.values() if t.get("task") == "retrieval"), None)
        if data is None:
            raise ConfigError(f"--base {base}: it has no retrieval eval task, so give the held-out shards with "
                              f"--eval-data")
        heldout[modality] = data
    zeroshot = None
    if args.zeroshot_data:
        zeroshot = {"data": args.zeroshot_data, "classnames": args.classnames, "templates": args.templates,
                    "label_key": args.label_key}
    elif args.classnames or args.templates or args.label_key:
        raise ConfigError("--classnames/--templates/--label-key need --zeroshot-data")
    if args.sts and not Path(args.sts).is_file():
        raise ConfigError(f"--sts: {args.sts!r} is not a file")
    return StudyPlan(bases=bases, arms=parse_arms(args.arms, set(bases)), seeds=seeds, out=args.out,
                     overrides=args.overrides, sentences=args.sentences, nli=args.nli, launcher=args.launcher,
                     ranks=args.ranks, evaluation=EvalSpec(heldout=heldout, sts=args.sts, zeroshot=zeroshot))


def main(argv: list[str] | None = None) -> int:
    from xfast.config import ConfigError
    from xfast.study.runner import run_study
    from xfast.training.logging import setup_output

    args = build_parser().parse_args(argv)
    setup_output(progress_bar=True)  # the libraries' bars only on a terminal, warnings once
    try:
        plan = plan_from_args(args)
        run_study(plan, train=not args.report_only)
    except ConfigError as err:
        print(f"xfast study: config error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as err:
        print(f"xfast study: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
