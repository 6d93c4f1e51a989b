"""A small built-in demo dataset, generated procedurally in a few seconds.

- images (img2dataset layout: key.jpg + key.txt + key.json): two coloured shapes in a spatial
  relation, captioned compositionally, e.g. "a red circle to the left of a blue square";
- audio (LAION-CLAP layout: key.flac + key.json with "text"): loud or quiet, short or long
  beeps, chirps or noise bursts at a pitch, repeated a number of times, e.g.
  "a loud high beeping tone, short, repeated three times";
- sentences (one per line) for unsupervised SimCSE training of the text tower;
- NLI triplets (SimCSE's CSV: sent0, sent1, hard_neg) for supervised SimCSE: a caption, a
  paraphrase that it entails, and a minimal edit that contradicts it (relation, colour,
  loudness, pitch or count changed);
- tokenizer/: a small WordPiece tokenizer trained on all of the above (for random text towers).

Captions are a function of what is drawn or heard, so a model that learns gets retrieval far
above chance. In the test split every caption is distinct (each item is a different
combination), so text-to-media retrieval has exactly one right answer. Everything derives
from one seed: two generations with the same arguments write identical samples.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from xfast.training.config import demo_data_root

FORMAT_VERSION = 1
IMAGE_SIZE = 64
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
SHARD_SIZE = 256

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "above")
PITCHES = {"low": 220.0, "medium": 550.0, "high": 1400.0}
SOUNDS = ("beeping tone", "rising chirp", "falling chirp", "noise burst")
COUNTS = {1: "played once", 2: "repeated twice", 3: "repeated three times"}
LOUDNESS = {"quiet": 0.08, "loud": 0.7}
LENGTHS = {"short": 0.3, "long": 0.75}  # fraction of a one-third slot each event lasts
TOKENIZER_VOCAB = 400


def image_combos() -> list[tuple]:
    """Every ((colour, shape), (colour, shape), relation) with two different objects."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    return [(a, b, r) for a in objects for b in objects if a != b for r in RELATIONS]


def sound_combos() -> list[tuple]:
    """Every (loudness, pitch, sound, length, count)."""
    return [(v, p, s, n, c) for v in LOUDNESS for p in PITCHES for s in SOUNDS for n in LENGTHS for c in COUNTS]


default_root = demo_data_root  # $XFAST_DEMO_DATA, else ~/.cache/xfast/demo-data


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, colour) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def make_image(rng: np.random.Generator, combo: tuple) -> tuple[Image.Image, str, dict]:
    """Two (colour, shape) objects in a relation (an image_combos() entry), with jittered
    positions, sizes and background; returns (image, caption, attributes)."""
    first, second, relation = combo
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    quarter, jitter = IMAGE_SIZE / 4, IMAGE_SIZE / 16
    along = [quarter, 3 * quarter]  # first object before the second along the relation's axis
    for (colour, shape), main in zip((first, second), along):
        across = IMAGE_SIZE / 2 + rng.uniform(-2 * jitter, 2 * jitter)
        main = main + rng.uniform(-jitter, jitter)
        centre = (main, across) if relation == "to the left of" else (across, main)
        _draw_shape(draw, shape, centre, rng.uniform(0.14, 0.2) * IMAGE_SIZE, COLOURS[colour])
    caption = f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"
    return image, caption, {"objects": [list(first), list(second)], "relation": relation}


def make_sound(rng: np.random.Generator, combo: tuple) -> tuple[np.ndarray, str, dict]:
    """Events of one kind (a sound_combos() entry) with jittered pitch and timing; returns
    (waveform, caption, attributes)."""
    loudness, pitch, sound, length_name, count = combo
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    wave = np.zeros(n, dtype=np.float32)
    slot = n // 3
    length = int(slot * LENGTHS[length_name])
    t = np.arange(length) / SAMPLE_RATE
    base = PITCHES[pitch] * rng.uniform(0.92, 1.08)
    envelope = np.sin(np.pi * np.arange(length) / length) ** 0.5
    for i in range(count):
        if sound == "beeping tone":
            event = np.sin(2 * np.pi * base * t)
        elif sound in ("rising chirp", "falling chirp"):
            ratio = 2.0 if sound == "rising chirp" else 0.5  # one octave up or down
            freq = base * ratio ** (t / t[-1])
            event = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
        else:  # noise band-passed around the pitch
            spectrum = np.fft.rfft(rng.standard_normal(length))
            freqs = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
            spectrum *= np.exp(-0.5 * (np.log2(np.maximum(freqs, 1.0) / base) / 0.5) ** 2)
            event = np.fft.irfft(spectrum, length)
            event /= np.abs(event).max() + 1e-9
        start = i * slot + int(rng.integers(0, slot - length))
        wave[start:start + length] += (LOUDNESS[loudness] * envelope * event).astype(np.float32)
    wave += 0.005 * rng.standard_normal(n).astype(np.float32)
    caption = f"a {loudness} {pitch} {sound}, {length_name}, {COUNTS[count]}"
    attrs = {"loudness": loudness, "pitch": pitch, "sound": sound, "length": length_name, "count": count}
    return np.clip(wave, -1, 1), caption, attrs


INVERSE_RELATIONS = {"to the left of": "to the right of", "above": "below"}


def image_nli(rng: np.random.Generator, combo: tuple) -> tuple[str, str, str]:
    """(caption, entailed paraphrase, contradiction) of an image_combos() entry."""
    (c1, s1), (c2, s2), relation = combo
    caption = f"a {c1} {s1} {relation} a {c2} {s2}"
    inverse = INVERSE_RELATIONS[relation]
    positive = [f"a {c2} {s2} {inverse} a {c1} {s1}",
                f"there is a {c1} {s1} and a {c2} {s2}; the {c1} {s1} is {relation} the {c2} {s2}"][int(rng.integers(2))]
    if rng.integers(2) or c1 == c2:
        negative = f"a {c1} {s1} {inverse} a {c2} {s2}"
    else:
        negative = f"a {c2} {s1} {relation} a {c1} {s2}"
    return caption, positive, negative


def sound_nli(rng: np.random.Generator, combo: tuple) -> tuple[str, str, str]:
    """(caption, entailed paraphrase, contradiction) of a sound_combos() entry."""
    loudness, pitch, sound, length, count = combo
    caption = f"a {loudness} {pitch} {sound}, {length}, {COUNTS[count]}"
    positive = f"a {sound} at {pitch} pitch, {loudness} and {length}, {COUNTS[count]}"
    field = ("loudness", "pitch", "count")[int(rng.integers(3))]
    if field == "loudness":
        loudness = next(v for v in LOUDNESS if v != loudness)
    elif field == "pitch":
        pitch = [p for p in PITCHES if p != pitch][int(rng.integers(len(PITCHES) - 1))]
    else:
        count = [c for c in COUNTS if c != count][int(rng.integers(len(COUNTS) - 1))]
    return caption, positive, f"a {loudness} {pitch} {sound}, {length}, {COUNTS[count]}"


def make_nli(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """`count` NLI triplets, half from image captions and half from sound captions."""
    images, sounds = image_combos(), sound_combos()
    triplets = []
    for i in range(count):
        if i % 2 == 0:
            triplets.append(image_nli(rng, images[int(rng.integers(len(images)))]))
        else:
            triplets.append(sound_nli(rng, sounds[int(rng.integers(len(sounds)))]))
    return triplets


def write_nli(root: Path, rng: np.random.Generator, count: int) -> dict:
    """nli/train.csv under `root` (written to a temporary name, then renamed); its manifest entry."""
    import csv

    folder = root / "nli"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".train.csv.{os.getpid()}"
    with partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        writer.writerows(make_nli(rng, count))
    os.replace(partial, folder / "train.csv")
    return {"train": {"count": count, "path": "nli/train.csv"}}


def _split_combos(combos: list[tuple], count: int, rng: np.random.Generator, distinct: bool) -> list[tuple]:
    """`count` combinations: all different (a test split) or drawn with replacement (training)."""
    if distinct:
        if count > len(combos):
            raise ValueError(f"a test split of distinct captions holds at most {len(combos)} items, asked {count}")
        return [combos[i] for i in rng.permutation(len(combos))[:count]]
    return [combos[i] for i in rng.integers(len(combos), size=count)]


def make_sentences(rng: np.random.Generator, count: int) -> list[str]:
    """Varied everyday sentences (not the demo captions verbatim) for unsupervised SimCSE."""
    subjects = ["the child", "a musician", "my neighbour", "the old dog", "a small bird", "the teacher",
                "a tired driver", "the orchestra", "a quiet student", "the red car"]
    verbs = ["waits near", "walks past", "listens to", "looks at", "runs towards", "sings beside",
             "sits under", "paints", "hears", "circles around"]
    objects = ["the blue door", "a yellow window", "the green square", "a ringing bell", "the noisy street",
               "a high whistle", "the low drum", "a round table", "the triangle sign", "a beeping alarm"]
    times = ["in the morning", "after lunch", "every evening", "twice a week", "at night", "during the storm",
             "before the concert", "on the left side", "three times", "quietly"]
    sentences = set()
    while len(sentences) < count:
        parts = [subjects[rng.integers(10)], verbs[rng.integers(10)], objects[rng.integers(10)],
                 times[rng.integers(10)]]
        sentences.add(" ".join(parts).capitalize() + ".")
    return sorted(sentences)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _write_split(folder: Path, prefix: str, count: int, write_sample, bar) -> list[str]:
    """Write `count` samples into shards of SHARD_SIZE; returns the shard file names."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, count, SHARD_SIZE):
        name = f"{prefix}-{first // SHARD_SIZE:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for index in range(first, min(first + SHARD_SIZE, count)):
                write_sample(tar, f"{prefix}{index:06d}")
                bar.update(1)
        shards.append(name)
    return shards


def generate(root: str | os.PathLike, *, train: int = 2048, test: int = 128, sentences: int = 2000,
             nli: int = 2000, seed: int = 0) -> dict:
    """Write the demo dataset under `root` (replacing it) and return its manifest.

    The folder is assembled next to `root` and renamed into place, so an interrupted
    generation never leaves a half-written dataset that looks complete.
    """
    root = Path(root)
    staging = root.with_name(f".{root.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = {"version": FORMAT_VERSION, "seed": seed, "image_size": IMAGE_SIZE,
                "sample_rate": SAMPLE_RATE, "images": {}, "audio": {}}
    bar = tqdm(total=2 * (train + test), desc="demo data", unit="sample")
    captions = []
    for split, count in (("train", train), ("test", test)):
        rng_img = np.random.default_rng([seed, 0, split == "test"])
        img_plan = iter(_split_combos(image_combos(), count, rng_img, distinct=split == "test"))

        def write_image(tar, key, rng=rng_img, plan=img_plan):
            image, caption, attrs = make_image(rng, next(plan))
            captions.append(caption)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=92)
            _add(tar, f"{key}.jpg", buffer.getvalue())
            _add(tar, f"{key}.txt", caption.encode())
            meta = {"key": key, "caption": caption, "width": IMAGE_SIZE, "height": IMAGE_SIZE, **attrs}
            _add(tar, f"{key}.json", json.dumps(meta).encode())

        rng_snd = np.random.default_rng([seed, 1, split == "test"])
        snd_plan = iter(_split_combos(sound_combos(), count, rng_snd, distinct=split == "test"))

        def write_sound(tar, key, rng=rng_snd, plan=snd_plan):
            import soundfile
            wave, caption, attrs = make_sound(rng, next(plan))
            captions.append(caption)
            buffer = io.BytesIO()
            soundfile.write(buffer, wave, SAMPLE_RATE, format="FLAC")
            _add(tar, f"{key}.flac", buffer.getvalue())
            meta = {"text": [caption], "original_data": {**attrs, "sample_rate": SAMPLE_RATE}}
            _add(tar, f"{key}.json", json.dumps(meta).encode())

        shards = _write_split(staging / "images" / split, "img", count, write_image, bar)
        manifest["images"][split] = {"count": count, "shards": [f"images/{split}/{s}" for s in shards]}
        shards = _write_split(staging / "audio" / split, "snd", count, write_sound, bar)
        manifest["audio"][split] = {"count": count, "shards": [f"audio/{split}/{s}" for s in shards]}
    bar.close()
    lines = make_sentences(np.random.default_rng([seed, 2]), sentences)
    (staging / "sentences").mkdir()
    (staging / "sentences" / "train.txt").write_text("\n".join(lines) + "\n")
    manifest["sentences"] = {"train": {"count": len(lines), "path": "sentences/train.txt"}}
    manifest["nli"] = write_nli(staging, np.random.default_rng([seed, 3]), nli)
    from xfast.models import train_tokenizer
    train_tokenizer(captions + lines, TOKENIZER_VOCAB, str(staging / "tokenizer"), max_length=64)
    manifest["tokenizer"] = "tokenizer"
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, root)
    return manifest


def ensure(root: str | os.PathLike | None = None, **sizes) -> tuple[Path, dict]:
    """The demo dataset at `root` (default: default_root()), generated if absent, of an older
    format, or (when sizes such as train=2048 are given) of other sizes."""
    root = Path(root) if root is not None else default_root()
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        counts = {"train": manifest["images"]["train"]["count"], "test": manifest["images"]["test"]["count"],
                  "sentences": manifest["sentences"]["train"]["count"]}
        if manifest.get("version") == FORMAT_VERSION and all(counts.get(k) == v for k, v in sizes.items()
                                                              if k not in ("seed", "nli")):
            if "nli" not in manifest:  # a dataset written before the NLI triplets existed: add them
                manifest["nli"] = write_nli(root, np.random.default_rng([manifest["seed"], 3]), sizes.get("nli", 2000))
                partial = root / f".manifest.json.{os.getpid()}"
                partial.write_text(json.dumps(manifest, indent=1))
                os.replace(partial, manifest_path)
            return root, manifest
    return root, generate(root, **sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xfast.training.demo_data",
        description="Generate xfast's procedural demo dataset (images, sounds, sentences, NLI triplets).")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $XFAST_DEMO_DATA "
                        "or ~/.cache/xfast/demo-data)")
    parser.add_argument("--train", type=int, default=2048, help="training samples per modality (default 2048)")
    parser.add_argument("--test", type=int, default=128, help="held-out samples per modality, each caption distinct "
                        f"(default 128, at most {len(sound_combos())})")
    parser.add_argument("--sentences", type=int, default=2000, help="SimCSE sentences (default 2000)")
    parser.add_argument("--nli", type=int, default=2000, help="NLI triplets for supervised SimCSE (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    for name in ("train", "test", "sentences", "nli"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    root = args.out or default_root()
    manifest = generate(root, train=args.train, test=args.test, sentences=args.sentences, nli=args.nli,
                        seed=args.seed)
    print(f"wrote {root}: {json.dumps({k: manifest[k] for k in ('images', 'audio', 'sentences', 'nli')})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
