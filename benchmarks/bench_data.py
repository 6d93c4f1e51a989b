"""Samples per second of the image and audio pipelines (0, 1, 2 workers) vs a naive loop.

Data are made on the fly: 640x480 JPEG images with captions (img2dataset layout) and 5-30 s
44.1 kHz FLAC clips with caption lists (LAION-CLAP layout; 10 s at 48 kHz go to the model). The naive
loop reads the same tars with tarfile and handles one sample at a time: full-size decode,
resize + crop, normalise, tokenise; for audio: decode, resample the whole file, crop/pad and a
per-clip torch.stft log-mel. The process is pinned to 2 cores and uses 1 torch thread (as
DataLoader workers do); throughput is over the whole epoch, worker start-up included (the time
to the first batch is shown too). Samples per CPU-second (this process and its workers) is the
efficiency, which other load on a shared machine does not distort as it does wall time.

    .venv/bin/python benchmarks/bench_data.py                    # full run, prints the table
    .venv/bin/python benchmarks/bench_data.py --save             # ... and writes benchmarks/results/data.json
    .venv/bin/python benchmarks/bench_data.py --before /tmp/old  # and an older checkout, side by side
    .venv/bin/python benchmarks/bench_data.py --quick            # fewer samples, one round
    .venv/bin/python benchmarks/bench_data.py --stages --batch-size 1024  # us per sample of each stage

Each row runs in its own process (with the xfast of its checkout), rows interleaved over rounds.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import soundfile
import soxr
import torch
from PIL import Image

from xfast.config import parse
from xfast.data import DataConfig, build_loader
from xfast.data.audio import mel_filterbank, pad_or_trim
from xfast.data.image import ImageNormalizer

CLIP_SECONDS = (5, 10, 20, 30)  # LAION-CLAP's sources mix short and long recordings
WORDS = "a the dog cat bird car rain sea wind bell runs sits sings on in red blue small big photo sound".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=8))


def _write(path: str, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def make_image_shards(directory: str, count: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    for shard in range(count // per_shard):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            pixels = np.stack([(x + i) % 256, (y * 2) % 256, (x + y + 7 * i) % 256], -1)
            pixels = (pixels + rng.integers(0, 40, size=pixels.shape)).clip(0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
            text = _caption(rng)
            samples.append({"__key__": f"{i:09d}", "jpg": out.getvalue(), "txt": text.encode(),
                            "json": json.dumps({"caption": text}).encode()})
        _write(os.path.join(directory, f"img-{shard:04d}.tar"), samples)
    return os.path.join(directory, f"img-{{0000..{count // per_shard - 1:04d}}}.tar")


def make_audio_shards(directory: str, count: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    for shard in range(count // per_shard):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            t = np.arange(44100 * CLIP_SECONDS[i % len(CLIP_SECONDS)]) / 44100
            wave = 0.4 * np.sin(2 * np.pi * (200 + 20 * i) * t * (1 + 0.1 * t)) + 0.02 * rng.standard_normal(t.shape)
            out = io.BytesIO()
            soundfile.write(out, wave.astype(np.float32), 44100, format="FLAC")
            meta = {"text": [_caption(rng), _caption(rng)], "tag": ["synth"]}
            samples.append({"__key__": f"{i:09d}", "flac": out.getvalue(), "json": json.dumps(meta).encode()})
        _write(os.path.join(directory, f"aud-{shard:04d}.tar"), samples)
    return os.path.join(directory, f"aud-{{0000..{count // per_shard - 1:04d}}}.tar")


def _tar_samples(pattern: str):
    from xfast.data import expand_urls

    for url in expand_urls(pattern):
        with tarfile.open(url) as archive:
            sample: dict = {}
            for member in archive:
                key, ext = member.name.split(".", 1)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = archive.extractfile(member).read()
            if sample:
                yield sample


def naive_image(pattern: str, cfg: DataConfig, tokenizer):
    """One sample at a time: full decode, resize shorter side, centre crop, normalise, tokenise."""
    normalize = ImageNormalizer(cfg.image)
    size = cfg.image.size
    for sample in _tar_samples(pattern):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        normalize(np.array(image)[None])
        tokenizer(sample["txt"].decode(), padding="max_length", truncation=True, max_length=cfg.text.max_length,
                  return_tensors="pt")
        yield


def naive_audio(pattern: str, cfg: DataConfig, tokenizer):
    """One clip at a time, the plain torch way: decode, resample the whole file, crop/pad,
    torch.stft power spectrum, mel matmul, dB, tokenise."""
    audio = cfg.audio
    window = torch.hann_window(audio.n_fft)
    filters = mel_filterbank(audio.sample_rate, audio.n_fft, audio.n_mels, audio.fmin, audio.fmax).T.contiguous()
    for sample in _tar_samples(pattern):
        wave, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        wave = soxr.resample(wave, rate, audio.sample_rate)
        wave = torch.from_numpy(pad_or_trim(wave, audio.num_samples, "repeatpad"))
        spec = torch.stft(wave, audio.n_fft, audio.hop_length, window=window, return_complex=True)
        mel = filters @ spec.abs().square()
        10 * torch.log10(mel.clamp(min=1e-10))
        tokenizer(json.loads(sample["json"])["text"][0], padding="max_length", truncation=True,
                  max_length=cfg.text.max_length, return_tensors="pt")
        yield


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (finished DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_naive(pattern: str, modality: str, tokenizer) -> dict:
    cfg = parse(DataConfig, {"sources": [{"urls": pattern}], "modality": modality}, "data")
    naive = naive_image if modality == "image" else naive_audio
    start, cpu = time.perf_counter(), _cpu_seconds()
    count = sum(1 for _ in naive(pattern, cfg, tokenizer))
    return {"samples_per_s": count / (time.perf_counter() - start),
            "samples_per_cpu_s": count / (_cpu_seconds() - cpu), "first_batch_s": None}


def run_pipeline(pattern: str, modality: str, workers: int, batch_size: int, tokenizer) -> dict:
    """Training mode (shuffle buffer, random crops); throughput over the whole epoch, start-up included."""
    cfg = parse(DataConfig, {"sources": [{"urls": pattern}], "modality": modality, "batch_size": batch_size,
                             "num_workers": workers, "shuffle_buffer": 256, "drop_last": False,
                             "persistent_workers": False}, "data")  # workers exit (and are reaped) at the end
    loader = build_loader(cfg, tokenizer, train=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    first, count = None, 0
    for batch in loader:
        first = first or time.perf_counter()
        count += len(batch["__key__"])
    wall = time.perf_counter() - start
    return {"samples_per_s": count / wall, "samples_per_cpu_s": count / (_cpu_seconds() - cpu),
            "first_batch_s": first - start}


def _child(job: dict) -> int:
    """One row in a fresh process (its own xfast, from PYTHONPATH): prints its result as JSON."""
    _pin()
    tokenizer = _tokenizer()
    if job["workers"] is None:
        result = run_naive(job["pattern"], job["modality"], tokenizer)
    else:
        result = run_pipeline(job["pattern"], job["modality"], job["workers"], job["batch_size"], tokenizer)
    print(json.dumps(result))
    return 0


def _pin() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    # One torch thread everywhere, as in DataLoader workers: the naive loop and the 0-worker
    # loader are single streams too (and 2 torch threads on 2 busy cores only add contention).
    torch.set_num_threads(1)


def _run_row(job: dict, tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)], env=env,
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"benchmark row {job} with xfast from {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _git_label(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.path.basename(os.path.abspath(tree))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and one round (smoke run)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all rows, interleaved; each figure is the median over rounds (default 3)")
    parser.add_argument("--before", metavar="DIR",
                        help="also time the xfast package in DIR (another checkout, e.g. `git worktree add DIR "
                             "<commit>`) in the same run, rows interleaved with this one's")
    parser.add_argument("--modality", choices=["image", "audio", "both"], default="both",
                        help="which pipelines to time (default both)")
    parser.add_argument("--clips", type=int, help="audio clips in the epoch (default 512, --quick 32)")
    parser.add_argument("--images", type=int, help="images in the epoch (default 1024, --quick 256)")
    parser.add_argument("--save", action="store_true",
                        help="write the results to benchmarks/results/data.json (with --modality, only that "
                             "pipeline's rows are replaced)")
    parser.add_argument("--out", help="write the results as JSON to this path instead")
    parser.add_argument("--stages", action="store_true",
                        help="instead: microseconds per sample of each loader stage on the demo training data "
                             "(batch --batch-size), in one process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child))
    _pin()
    if args.stages:
        for modality in ["image", "audio"] if args.modality == "both" else [args.modality]:
            for row in stages(modality, args.batch_size):
                print(f"{row['pipeline']:6s} {row['stage']:26s} {row['us_per_sample']:8.1f} us/sample")
        return 0
    n_images, n_clips = (256, 32) if args.quick else (1024, 512)
    n_images, n_clips = args.images or n_images, args.clips or n_clips
    rounds = 1 if args.quick else args.rounds
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("xfast", here)] + ([(f"xfast before ({_git_label(args.before)})", args.before)] if args.before else [])
    modalities = ["image", "audio"] if args.modality == "both" else [args.modality]
    rows = []
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for modality in modalities:
            pattern = (make_image_shards(tmp, n_images, 64) if modality == "image"
                       else make_audio_shards(tmp, n_clips, 32))
            jobs = [("naive loop", here, None)] + [(f"{label}, {w} workers", tree, w)
                                                    for w in (0, 1, 2) for label, tree in trees]
            results: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
            for _ in range(rounds):
                for name, tree, workers in jobs:
                    job = {"pattern": pattern, "modality": modality, "workers": workers,
                           "batch_size": args.batch_size}
                    results[name].append(_run_row(job, tree))
            for name, _, _ in jobs:
                per_round = results[name]
                speedups = [r["samples_per_s"] / n["samples_per_s"] for r, n in zip(per_round, results["naive loop"], strict=True)]
                first = [r["first_batch_s"] for r in per_round if r["first_batch_s"] is not None]
                rows.append({"pipeline": modality, "loader": name,
                             "samples_per_s": float(np.median([r["samples_per_s"] for r in per_round])),
                             "speedup": float(np.median(speedups)),
                             "samples_per_cpu_s": float(np.median([r["samples_per_cpu_s"] for r in per_round])),
                             "first_batch_s": float(np.median(first)) if first else None,
                             "epoch_samples": n_images if modality == "image" else n_clips, "rounds": rounds,
                             "load_average_1min_at_start": load_at_start})
    lines = ["| pipeline | loader | samples/s | vs naive | samples per CPU-s | first batch (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        first = "" if row["first_batch_s"] is None else f"{row['first_batch_s']:.2f}"
        lines.append(f"| {row['pipeline']} | {row['loader']} | {row['samples_per_s']:.1f} | "
                     f"{row['speedup']:.2f}x | {row['samples_per_cpu_s']:.1f} | {first} |")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"(median of {rounds} interleaved rounds; load average at the start {load_at_start:.1f}, at the end "
                 f"{os.getloadavg()[0]:.1f}, on {cores} cores)")
    print("\n".join(lines))
    out = args.out or (os.path.join(os.path.dirname(__file__), "results", "data.json") if args.save else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if os.path.exists(out):  # timing one pipeline replaces its rows and keeps the other's
            with open(out) as f:
                rows = [r for r in json.load(f)["rows"] if r["pipeline"] not in modalities] + rows
            rows.sort(key=lambda r: r["pipeline"] != "image")
        with open(out, "w") as f:
            json.dump({"rows": rows, "batch_size": args.batch_size, "cores": cores,
                       "cpu": _cpu_model(), "machine": platform.platform(), "python": sys.version.split()[0],
                       "torch": torch.__version__}, f, indent=1)
        print(f"wrote {out}")
    return 0


def stages(modality: str, batch_size: int, repeat: int = 3) -> list[dict]:
    """Per-sample cost of each loader stage, in this process (best of `repeat`), over the demo
    training data that benchmarks/bench_train.py feeds: tar reading, the per-sample augmentation
    generator, decoding + augmentation, collate (tokenisation and batching) and the whole
    0-worker loader."""
    from transformers import AutoTokenizer

    from xfast.data.pipeline import ShardStream
    from xfast.data.sources import read_shard
    from xfast.training import demo_data
    from xfast.training.config import resolve_config_path

    root, _ = demo_data.ensure()
    model, folder = ("clip", "images") if modality == "image" else ("clap", "audio")
    raw = json.loads(resolve_config_path(f"demo_{model}_tiny").read_text())["data"]
    raw.update(sources=[{"urls": str(root / folder / "train")}], batch_size=batch_size, num_workers=0,
               resampled=True, samples_per_epoch=10**7)
    cfg = parse(DataConfig, raw, "data")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    urls = sorted(str(p) for p in (root / folder / "train").glob("*.tar"))

    def best(fn):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    rows = []
    seconds, samples = best(lambda: [s for url in urls for s in read_shard(url, lambda kind, detail: None)])
    rows.append(("tar reading", seconds / len(samples)))
    stream = ShardStream(cfg, tokenizer, [urls], rank=0, world_size=1, train=True, shared_epoch=None)
    seconds, rngs = best(lambda: [stream._augment_rng(0, s) for s in samples])
    rows.append(("augmentation generator", seconds / len(samples)))
    seconds, items = best(lambda: [stream.processor.process(s, r) for s, r in zip(samples, rngs)])
    rows.append(("decode + augment", seconds / len(samples)))
    items = (items * (batch_size // len(items) + 1))[:batch_size]
    seconds, _ = best(lambda: stream.processor.collate(items))
    rows.append((f"collate (batch {batch_size})", seconds / batch_size))
    seconds, _ = best(lambda: stream.processor.tokenize([item["text"] for item in items]))
    rows.append(("  of which tokenisation", seconds / batch_size))
    batches = iter(build_loader(cfg, tokenizer))
    next(batches)
    seconds, _ = best(lambda: next(batches))
    rows.append(("whole loader, 0 workers", seconds / batch_size))
    return [{"pipeline": modality, "stage": name, "us_per_sample": value * 1e6} for name, value in rows]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
