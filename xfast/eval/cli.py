"""`xfast eval`: evaluate one or more checkpoints on one task; print a table, write JSON and PNGs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from xfast.config import ConfigError
from xfast.eval import runner, tasks
from xfast.eval.plots import plot_alignment_uniformity, plot_recall_curves, plot_training_curves

MODEL_CONFIG = "xfast_config.json"  # written by xfast.models' save_pretrained
RECALL_CURVE_MAX_K = 50

EPILOG = """\
examples:
  xfast eval --ckpt runs/clap --task retrieval --data 'clotho-test-{0000..0003}.tar' --out results/clotho
  xfast eval --ckpt runs/clap/final --task zeroshot --data 'esc50-{0..4}.tar' --classnames esc50_classes.txt \\
      --templates 'This is a sound of {}.'
  xfast eval --ckpt runs/clip --task sts --data stsb/sts-test.tsv
  xfast eval --ckpt runs/base --ckpt runs/simcse --task geometry --data stsb/sts-dev.tsv --out results/geom

output: a table on stdout; OUT/TASK.json with every checkpoint's metrics; OUT/retrieval_recall.png
(recall@K curves, retrieval) or OUT/geometry_alignment_uniformity.png (geometry).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xfast eval",
        description="Evaluate contrastive image/audio-text checkpoints: zero-shot classification,\n"
                    "retrieval (R@1/5/10, median rank, mAP@10, several captions per item), STS of the\n"
                    "language encoder, and geometry of the embedding spaces (alignment, uniformity,\n"
                    "CyCLIP consistency gaps).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="DIR",
                   help="an exported model folder (with xfast_config.json) or a training run folder (its final/ "
                        "export is used); repeat to compare checkpoints (one column / plot point each)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="label of each --ckpt in the table, JSON and plots, in the same order (default: folder name)")
    p.add_argument("--task", required=True, choices=sorted(tasks.TASKS),
                   help="zeroshot: top-1/top-5 accuracy from class-name prompts; retrieval: both directions; "
                        "sts: Spearman/Pearson of cosine vs gold scores; geometry: alignment/uniformity/gaps")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="zeroshot/retrieval: evaluation shards (brace pattern, '::' list or folder); sts: a TSV/CSV "
                        "of sentence1, sentence2, score (STS-B/SICK-R layout); geometry: shards (media and "
                        "caption spaces) or an STS file (text space, SimCSE-style)")
    p.add_argument("--classnames", nargs="+", metavar="NAME",
                   help="zeroshot: class names in label-index order, or one file (.txt one a line, .json list or "
                        "{name: index}, .csv with a display_name/name/category column); default: the sorted "
                        "distinct string labels of the data")
    p.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                   help="zeroshot: prompt templates with '{}' for the class name, or one .txt file with one a "
                        "line; embeddings of a class's prompts are averaged (default: 'a photo of a {}.' for "
                        "images, 'This is a sound of {}.' for audio)")
    p.add_argument("--label-key", metavar="FIELD",
                   help="zeroshot: field of each sample's .json holding its label, a class name or index "
                        "(default: the data's text.tag_field, 'tag')")
    p.add_argument("--labels-csv", metavar="CSV",
                   help="zeroshot: CSV mapping sample keys (key/filename column) to labels (label/category/"
                        "class/tag/target column), used instead of labels stored in the shards (e.g. esc50.csv)")
    p.add_argument("--space", choices=("sentence", "joint"), default="sentence",
                   help="sts, and geometry on an STS file: compare the language encoder's own pooled sentence "
                        "embeddings ('sentence', default) or the projected shared-space text embeddings ('joint')")
    p.add_argument("--sts-positive-threshold", type=float, default=4.0, metavar="SCORE",
                   help="geometry on an STS file: pairs scoring >= SCORE are positives for text alignment "
                        "(default 4.0, on STS-B's 0-5 scale)")
    p.add_argument("--ks", type=int, nargs="+", metavar="K",
                   help="cut-offs: recall@K for retrieval (default 1 5 10), top-K accuracy for zeroshot "
                        "(default 1 5)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="items per model forward pass, media and text (default 64)")
    p.add_argument("--block", type=int, default=256, metavar="N",
                   help="query rows scored at once by the metrics: memory is N x (number of keys) (default 256)")
    p.add_argument("--max-items", type=int, metavar="N", help="read at most N media items (default: all)")
    p.add_argument("--data-config", metavar="JSON",
                   help="JSON file whose 'data' section (or the file itself) gives the image/audio/text "
                        "preprocessing of the shards; default: config.json of the --ckpt run folder if any")
    p.add_argument("--out", default="xfast-eval", metavar="DIR",
                   help="folder for TASK.json and the PNG plots (created; default ./xfast-eval)")
    p.add_argument("--device", default=None,
                   help="torch device to run the model on (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def resolve_model_dir(path: str) -> Path:
    """An exported model folder: `path` itself or a run folder's final/ export."""
    p = Path(path)
    for candidate in (p, p / "final"):
        if (candidate / MODEL_CONFIG).is_file():
            return candidate
    hint = ""
    if (p / "checkpoints").is_dir():
        hint = (" It holds DeepSpeed checkpoints but no final/ export: export one with save_pretrained "
                "(the trainer writes final/ when checkpoint.export_fp32 is on).")
    raise ValueError(f"--ckpt {path!r}: not an exported model folder (no {MODEL_CONFIG}) and no final/ export in "
                     f"it.{hint}")


def load_checkpoint(path: str, device: str):
    """(model, tokenizer, raw data section or None) for an export or a run folder."""
    from xfast.models import load_pretrained, load_tokenizer

    try:
        model_dir = resolve_model_dir(path)
    except ValueError as err:
        from xfast.config import ConfigError
        from xfast.models.sources import detect
        try:
            detect(path)
        except ConfigError:
            raise err from None
        from xfast.api import load
        model = load(path, device=device).model  # a pretrained source as is, e.g. before fine-tuning
        return model, model.tokenizer or load_tokenizer(path), None
    model = load_pretrained(str(model_dir), map_location=device)
    model.to(device)
    tokenizer = getattr(model, "tokenizer", None) or load_tokenizer(str(model_dir))
    data_config = None
    for run_config in (Path(path) / "config.json", model_dir.parent / "config.json"):
        if run_config.is_file():
            data_config = json.loads(run_config.read_text()).get("data")
            break
    return model, tokenizer, data_config


def run_metrics(path: str) -> Path | None:
    """The training run's metrics.jsonl for --ckpt (a run folder or its final/ export), if any."""
    p = Path(path)
    for candidate in (p / "metrics.jsonl", p.parent / "metrics.jsonl"):
        if candidate.is_file() and (candidate.parent / "final" == p or candidate.parent == p):
            return candidate
    return None


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def read_data_config(path: str) -> dict:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"--data-config {path!r}: expected a JSON object")
    return raw.get("data", raw)


def one_file_or_list(values: list[str] | None) -> list[str] | str | None:
    """A single existing file path stays a path; otherwise the values are the list itself."""
    if values and len(values) == 1 and Path(values[0]).is_file():
        return values[0]
    return values


def build_task(args) -> dict:
    task: dict = {"task": args.task, "data": args.data}
    if args.task == "zeroshot":
        classnames = one_file_or_list(args.classnames)
        templates = one_file_or_list(args.templates)
        if isinstance(templates, str):
            templates = [t.strip() for t in Path(templates).read_text().splitlines() if t.strip()]
        task.update(classnames=classnames, templates=templates, label_key=args.label_key, labels_csv=args.labels_csv)
    elif args.task in ("sts", "geometry"):
        task["space"] = args.space
        if args.task == "geometry":
            task["sts_positive_threshold"] = args.sts_positive_threshold
    if args.ks is not None:
        if args.task not in ("zeroshot", "retrieval"):
            raise ValueError(f"--ks applies to zeroshot and retrieval, not {args.task}")
        task["ks"] = args.ks
    return task


def checkpoint_names(args) -> list[str]:
    if args.name:
        if len(args.name) != len(args.ckpt):
            raise ValueError(f"give one --name per --ckpt ({len(args.ckpt)}), got {len(args.name)}")
        names = list(args.name)
    else:
        names = []
        for ckpt in args.ckpt:
            p = Path(ckpt).resolve()
            names.append(p.parent.name if p.name == "final" else p.name)
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint names must be distinct, got {names}; use --name")
    return names


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, checkpoints as columns."""
    names = list(results)
    metrics = list(dict.fromkeys(k for m in results.values() for k in m))
    width = max(len("metric"), *(len(k) for k in metrics))
    cols = [max(10, len(n)) for n in names]
    lines = ["  ".join(["metric".ljust(width)] + [n.rjust(c) for n, c in zip(names, cols)])]
    lines.append("  ".join(["-" * width] + ["-" * c for c in cols]))
    for key in metrics:
        cells = []
        for name, c in zip(names, cols):
            value = results[name].get(key)
            cells.append(("-" if value is None else f"{value:.4f}").rjust(c))
        lines.append("  ".join([key.ljust(width)] + cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, ConfigError, RuntimeError, OSError) as err:
        print(f"xfast eval: error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    for option in ("batch_size", "block", "max_items"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    names = checkpoint_names(args)
    task = runner.parse_task(build_task(args), "--task")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_config = read_data_config(args.data_config) if args.data_config else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, float]] = {}
    ranks = {}
    modality = None
    for name, ckpt in zip(names, args.ckpt):
        model, tokenizer, run_data = load_checkpoint(ckpt, device)
        modality = model.modality
        result = runner.run_task(model, tokenizer, task, batch_size=args.batch_size, block=args.block,
                                 max_items=args.max_items, progress=not args.no_progress,
                                 load_batches=runner.xfast_data_batches, data_config=data_config or run_data)
        results[name] = result.metrics
        if result.ranks is not None:
            ranks[name] = result.ranks
        del model

    print(format_table(results))
    record = {"task": args.task, "data": args.data, "options": dataclasses.asdict(task),
              "checkpoints": {name: {"path": ckpt, "metrics": results[name]} for name, ckpt in zip(names, args.ckpt)}}
    written = [out / f"{args.task}.json"]
    if ranks:
        written.append(plot_recall_curves(ranks, out / "retrieval_recall.png", max_k=RECALL_CURVE_MAX_K,
                                          media_name=modality))
        curve_ks = range(1, RECALL_CURVE_MAX_K + 1)
        for name, r in ranks.items():
            record["checkpoints"][name]["recall_curve"] = {
                "text_to_media": [float((r.text_to_media <= k).double().mean()) for k in curve_ks],
                "media_to_text": [float((r.media_to_text <= k).double().mean()) for k in curve_ks],
            }
    if args.task == "geometry":
        written.append(plot_alignment_uniformity(results, out / "geometry_alignment_uniformity.png"))
    for name, ckpt in zip(names, args.ckpt):
        history = run_metrics(ckpt)
        if history is not None:
            written.append(plot_training_curves(history, out / f"training_curves_{_file_safe(name)}.png"))
    written[0].write_text(json.dumps(record, indent=2))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
