"""Training throughput of xfast's tiny CLAP/CLIP against a plain PyTorch loop around transformers.

Side by side in one run, on the built-in demo data (same loader, batch and sizes for both):
  xfast        xfast.models tower pair + Objective, DeepSpeed engine (1 rank, ZeRO-2 as in the
               demo configs, torch AdamW), whole-batch accumulation step (xfast.training.accumulation)
  xfast_zero0  the same with ZeRO stage 0 (no gradient bucketing: what ZeRO-2 costs on one rank)
  transformers ClapModel / CLIPModel built from config objects at the same sizes, forward with
               return_loss=True, loss.backward(), torch AdamW step
Both read batches from xfast.data's loader over the demo shards, so "data wait" (share of wall
time spent waiting for the next batch) is comparable. The architectures are matched: CLIP =
CLIP text transformer + CLIP ViT (linear projections), CLAP = RoBERTa + HTSAT (MLP projections),
hidden 32, 2 layers, embedding 32. Each measurement runs in its own subprocess; methods
alternate over --repeat rounds and the best round is reported (on a shared machine the least
disturbed one; every round is kept in the JSON).

    python benchmarks/bench_train.py                    # writes benchmarks/results/train.{json,md}
    python benchmarks/bench_train.py --steps 10 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("clap", "clip")
METHODS = ("xfast", "xfast_zero0", "transformers")


def _loader(model_name: str, batch_size: int, root: Path, tokenizer):
    from xfast.config import parse
    from xfast.data import DataConfig, build_loader
    from xfast.training.config import resolve_config_path
    raw = json.loads(resolve_config_path(f"demo_{model_name}_tiny").read_text())["data"]
    modality = "audio" if model_name == "clap" else "image"
    raw.update(sources=[{"urls": str(root / ("audio" if modality == "audio" else "images") / "train")}],
               batch_size=batch_size, num_workers=1)
    return build_loader(parse(DataConfig, raw, "data"), tokenizer, rank=0, world_size=1)


def _xfast_step_fn(model_name: str, tokenizer_dir: Path, batch_size: int, zero_stage: int = 2):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from xfast.config import parse
    from xfast.models import ModelConfig, Objective, ObjectiveConfig, build_model
    from xfast.training.accumulation import whole_batch_step
    from xfast.training.engine import build_engine, deepspeed_config, init_distributed
    from xfast.training.task import ContrastiveTask

    init_distributed()
    media = {"audio": {"type": "htsat", "preset": "tiny", "projection": "mlp"}} if model_name == "clap" else \
        {"image": {"type": "clip_vision", "preset": "tiny"}}
    text_type, projection = ("roberta", "mlp") if model_name == "clap" else ("clip_text", "linear")
    model = build_model(parse(ModelConfig, {"text": {"type": text_type, "preset": "tiny", "projection": projection,
                                                     "tokenizer": str(tokenizer_dir)},
                                            **media, "embed_dim": 32}, "model"))
    objective = Objective(parse(ObjectiveConfig, {}, "objective"))
    task = ContrastiveTask(model, objective)
    plan = objective.plan(0)
    engine = build_engine(task, ds_config=deepspeed_config(
        micro_batch_size=batch_size, accumulation_steps=1, world_size=1, zero_stage=zero_stage, precision="fp32",
        gradient_clipping=1.0), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, tower_lr={},
        warmup_steps=0, total_steps=1000, min_lr_ratio=0.0)

    def step(batch):
        loss, _, _ = whole_batch_step(engine, [{"pairs": batch, "plan": plan}],
                                      lambda f, s, group: task.loss(f, s, plan, group=group))
        return float(loss)

    parameters = sum(p.numel() for p in model.parameters())
    return model.tokenizer, step, parameters


def _transformers_step_fn(model_name: str, tokenizer_dir: Path, batch_size: int):
    import torch
    from transformers import (
        AutoTokenizer,
        ClapAudioConfig,
        ClapConfig,
        ClapModel,
        ClapTextConfig,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(small, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    if model_name == "clap":
        audio = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, patch_embeds_hidden_size=16,
                                depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, window_size=4,
                                enable_fusion=False, projection_dim=32)
        config = ClapConfig(text_config=ClapTextConfig(**dict(text, max_position_embeddings=66), projection_dim=32).to_dict(),
                            audio_config=audio.to_dict(), projection_dim=32)
        model = ClapModel(config)

        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         input_features=batch["input_features"], return_loss=True).loss
    else:
        config = CLIPConfig(text_config=CLIPTextConfig(**text, bos_token_id=tokenizer.cls_token_id,
                                                       eos_token_id=tokenizer.sep_token_id).to_dict(),
                            vision_config=CLIPVisionConfig(**small, image_size=32, patch_size=8).to_dict(),
                            projection_dim=32)
        model = CLIPModel(config)

        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], return_loss=True).loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)

    def step(batch):
        loss = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return tokenizer, step, sum(p.numel() for p in model.parameters())


def worker(model_name: str, method: str, batch_size: int, steps: int, warmup: int, root: Path) -> dict:
    """Runs in the subprocess: `warmup` untimed steps, then `steps` timed ones."""
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # both methods on one core: the 2-core CI box runs the loader beside it
    if method == "transformers":
        tokenizer, step, parameters = _transformers_step_fn(model_name, root / "tokenizer", batch_size)
    else:
        tokenizer, step, parameters = _xfast_step_fn(model_name, root / "tokenizer", batch_size,
                                                     zero_stage=0 if method == "xfast_zero0" else 2)
    source = _loader(model_name, batch_size, root, tokenizer)
    batches = iter(source)

    def next_batch():  # endless: the loader starts its next epoch when one ends
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(source)
            return next(batches)

    for _ in range(warmup):
        step(next_batch())
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t0
        step(batch)
    elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / elapsed, "data_wait_share": wait / elapsed,
            "parameters": parameters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds; the best is kept (default 5)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    from xfast.training import demo_data
    root, _ = demo_data.ensure()
    if args.worker:
        result = worker(*args.worker, args.batch_size, args.steps, args.warmup, root)
        print("RESULT " + json.dumps(result))
        return 0

    from tqdm.auto import tqdm
    runs: dict[tuple[str, str], list[dict]] = {}
    jobs = [(m, method) for _ in range(args.repeat) for m in args.models for method in METHODS]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for model_name, method in tqdm(jobs, desc="bench_train", unit="run"):
        command = [sys.executable, __file__, "--worker", model_name, method, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{model_name}/{method} failed (exit {out.returncode})")
        runs.setdefault((model_name, method), []).append(json.loads(line[len("RESULT "):]))

    rows = []
    for model_name in args.models:
        row = {"model": model_name, "batch_size": args.batch_size}
        for method in METHODS:
            results = runs[(model_name, method)]
            best = max(results, key=lambda r: r["samples_per_s"])
            row[method] = {"samples_per_s": best["samples_per_s"], "data_wait_share": best["data_wait_share"],
                           "median_samples_per_s": statistics.median(r["samples_per_s"] for r in results),
                           "parameters": results[0]["parameters"],
                           "all_samples_per_s": [r["samples_per_s"] for r in results]}
        row["speedup"] = row["xfast"]["samples_per_s"] / row["transformers"]["samples_per_s"]
        rows.append(row)
    lines = [f"Training throughput on CPU (1 process, 1 thread, batch {args.batch_size}, tiny towers, best of "
             f"{args.repeat} alternating runs of {args.steps} steps; demo data through xfast.data)", "",
             "| model | xfast (ZeRO-2) samples/s | data wait | xfast (ZeRO-0) samples/s | data wait | "
             "transformers samples/s | data wait | xfast ZeRO-2 / transformers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x, z, t = r["xfast"], r["xfast_zero0"], r["transformers"]
        lines.append(f"| tiny {r['model'].upper()} ({x['parameters'] / 1e3:.0f}k / {t['parameters'] / 1e3:.0f}k params) | "
                     f"{x['samples_per_s']:.0f} | {x['data_wait_share']:.0%} | {z['samples_per_s']:.0f} | "
                     f"{z['data_wait_share']:.0%} | {t['samples_per_s']:.0f} | {t['data_wait_share']:.0%} | "
                     f"{r['speedup']:.2f}x |")
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    (RESULTS / "train.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
