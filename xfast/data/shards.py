"""`xfast shards`: write WebDataset shards from a media folder and a caption table; check shards.

Written layout (readable by img2dataset/open_clip and LAION-CLAP loaders alike):
  image: KEY.jpg|png|webp + KEY.txt (first caption) + KEY.json {"text", "caption", "file"}
  audio: KEY.flac|wav|mp3|ogg + KEY.json {"text", "tag", "file"}
Keys are running numbers (000000000, 000000001, ...); sizes.json maps shard names to counts.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from xfast.data.audio import AUDIO_EXTENSIONS
from xfast.data.image import IMAGE_EXTENSIONS
from xfast.data.skips import SampleSkipped, empty_counts
from xfast.data.sources import expand_urls, read_shard, sizes_table
from xfast.data.config import TextConfig
from xfast.data.text import find_captions, nli_triplet, sample_json

TEXT = TextConfig()
CAPTION_KEYS = TEXT.caption_keys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xfast shards",
        description="Write WebDataset tar shards (with sizes.json) from a folder of images or audio files and a "
                    "CSV/JSONL table of captions, or check existing shards with --check.",
        epilog="examples:\n  xfast shards photos/ --captions captions.csv --out shards/ --shard-size 1000\n"
               "  xfast shards clips/ --captions clips.jsonl --out audio_shards/ --modality audio\n"
               "  xfast shards --check 'shards/shards-{0000..0003}.tar'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("media_dir", nargs="?", metavar="MEDIA_DIR", help="folder holding the media files named in the caption table")
    parser.add_argument("--captions", help="CSV (with a header row) or JSONL (.jsonl) table: one row per media "
                                           "file, naming the file and its caption(s)")
    parser.add_argument("--out", help="output folder for the shards and sizes.json (created if missing)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--modality", choices=["image", "audio"], default="image",
                        help="kind of media files: image (jpg/png/webp) or audio (flac/wav/mp3/ogg); default image")
    parser.add_argument("--prefix", default="shards", help="shard file name prefix (default: shards)")
    parser.add_argument("--file-column", default="file",
                        help="column holding the media path relative to MEDIA_DIR (default: file)")
    parser.add_argument("--caption-column", default="caption",
                        help="column holding the caption; in JSONL it may be a list of captions (default: caption)")
    parser.add_argument("--tag-column", default="tag",
                        help="optional column of labels, kept as the json 'tag' field; in CSV, labels are "
                             "separated by ';' (default: tag)")
    parser.add_argument("--no-verify", action="store_true",
                        help="write media without decoding them first (faster; broken files go into the shards)")
    parser.add_argument("--check", metavar="URLS",
                        help="instead of writing, read these shards (brace pattern, directory or pipe:) and report "
                             "sample counts, decode errors and mismatches with sizes.json; exit status 1 on problems")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check is not None:
        if args.media_dir is not None:
            _parser().error("--check takes no MEDIA_DIR")
        return check_shards(args.check)
    if args.media_dir is None or args.captions is None or args.out is None:
        _parser().error("writing shards needs MEDIA_DIR, --captions and --out (or use --check URLS)")
    if args.shard_size <= 0:
        _parser().error(f"--shard-size must be > 0, got {args.shard_size}")
    return write_shards(args)


# Writing ---------------------------------------------------------------------------------------

def _read_table(path: str, args) -> list[dict]:
    """Rows of the caption table as {"file", "captions", "tags"}; errors name the line."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((line_no, json.loads(line)))
                    except ValueError as err:
                        raise SystemExit(f"{path}:{line_no}: not JSON: {err}")
        else:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or args.file_column not in reader.fieldnames \
                    or args.caption_column not in reader.fieldnames:
                raise SystemExit(f"{path}: needs columns {args.file_column!r} and {args.caption_column!r}, "
                                 f"has {reader.fieldnames}")
            records = [(line_no, row) for line_no, row in enumerate(reader, 2)]
    for line_no, record in records:
        if not isinstance(record, dict) or args.file_column not in record:
            raise SystemExit(f"{path}:{line_no}: no {args.file_column!r} field")
        captions = record.get(args.caption_column)
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise SystemExit(f"{path}:{line_no}: {args.caption_column!r} must be a string or a list of strings")
        tags = record.get(args.tag_column) or []
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(";") if t.strip()]
        rows.append({"file": record[args.file_column], "captions": [c.strip() for c in captions],
                     "tags": [str(t) for t in tags], "line": line_no})
    return rows


def _verify(data: bytes, modality: str) -> None:
    if modality == "image":
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
        except Exception as err:
            raise SampleSkipped("corrupt_image", str(err)) from None
    else:
        try:
            wave, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as err:
            raise SampleSkipped("corrupt_audio", str(err)) from None
        if wave.shape[0] == 0 or not np.isfinite(wave).all():
            raise SampleSkipped("corrupt_audio", "empty or non-finite audio")


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shards(args) -> int:
    rows = _read_table(args.captions, args)
    extensions = IMAGE_EXTENSIONS if args.modality == "image" else AUDIO_EXTENSIONS
    os.makedirs(args.out, exist_ok=True)
    num_shards = max(1, -(-len(rows) // args.shard_size))
    digits = max(4, len(str(num_shards - 1)))
    sizes: dict[str, int] = {}
    problems: dict[str, int] = {}
    archive, shard_path, shard_count, written = None, None, 0, 0

    def close_shard():
        nonlocal archive
        if archive is not None:
            archive.close()
            os.replace(shard_path + ".tmp", shard_path)
            sizes[os.path.basename(shard_path)] = shard_count
            archive = None

    for row in tqdm(rows, desc="writing shards", unit="sample"):
        ext = os.path.splitext(row["file"])[1].lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        reason = None
        if ext not in extensions:
            reason = f"not a {args.modality} file extension ({'|'.join(extensions)})"
        elif not any(c for c in row["captions"]):
            reason = "missing_caption"
        else:
            try:
                with open(os.path.join(args.media_dir, row["file"]), "rb") as f:
                    data = f.read()
                if not args.no_verify:
                    _verify(data, args.modality)
            except OSError as err:
                reason = f"unreadable file ({err.strerror})"
            except SampleSkipped as skip:
                reason = skip.kind
        if reason is not None:
            problems[reason] = problems.get(reason, 0) + 1
            continue
        if archive is None or shard_count == args.shard_size:
            close_shard()
            shard_path = os.path.join(args.out, f"{args.prefix}-{len(sizes):0{digits}d}.tar")
            archive = tarfile.open(shard_path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
            shard_count = 0
        key = f"{written:09d}"
        captions = [c for c in row["captions"] if c]
        meta = {"text": captions if len(captions) > 1 else captions[0], "file": row["file"]}
        _add(archive, f"{key}.{ext}", data)
        if args.modality == "image":
            meta["caption"] = captions[0]
            _add(archive, f"{key}.txt", captions[0].encode())
        if row["tags"]:
            meta["tag"] = row["tags"]
        _add(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        shard_count += 1
        written += 1
    close_shard()
    if written == 0:
        print(f"error: no usable row in {args.captions}: {problems}", file=sys.stderr)
        return 1
    with open(os.path.join(args.out, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)
    pattern = os.path.join(args.out, f"{args.prefix}-{{{0:0{digits}d}..{len(sizes) - 1:0{digits}d}}}.tar")
    print(f"wrote {written} samples in {len(sizes)} shards: {pattern}")
    for reason, count in sorted(problems.items()):
        print(f"  left out {count} rows: {reason}")
    return 0


# Checking --------------------------------------------------------------------------------------

def _check_sample(sample: dict) -> None:
    """Decode the sample's media and find its text, raising SampleSkipped like the pipeline."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    audio_ext = next((e for e in AUDIO_EXTENSIONS if e in sample), None)
    if image_ext or audio_ext:
        find_captions(sample, CAPTION_KEYS)
        if image_ext:
            _verify(sample[image_ext], "image")
        else:
            _verify(sample[audio_ext], "audio")
    elif "csv" in sample:
        nli_triplet(sample, TEXT)
    elif "txt" in sample:
        find_captions(sample, CAPTION_KEYS)
    elif "json" in sample and any(field in (sample_json(sample) or {}) for field in TEXT.nli_fields):
        nli_triplet(sample, TEXT)
    else:
        raise SampleSkipped("missing_media", f"no media or text in {sorted(k for k in sample if k[:2] != '__')}")


def check_shards(urls: str) -> int:
    """Read every shard, decode every sample; print counts and problems. 0 when all is well."""
    try:
        shard_urls = expand_urls(urls, "--check")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes_tables: dict[str, dict] = {}
    totals = empty_counts()
    total_samples = 0
    mismatches = []
    for url in tqdm(shard_urls, desc="checking shards", unit="shard"):
        counts = empty_counts()
        samples = 0
        for sample in read_shard(url, lambda kind, detail: counts.__setitem__(kind, counts[kind] + 1)):
            samples += 1
            try:
                _check_sample(sample)
            except SampleSkipped as skip:
                counts[skip.kind] += 1
        directory, name = os.path.split(url)
        if not url.startswith("pipe:"):
            if directory not in sizes_tables:
                sizes_tables[directory] = sizes_table(directory)
            expected = sizes_tables[directory].get(name)
            if expected is not None and expected != samples:
                mismatches.append(f"{url}: sizes.json says {expected}, read {samples}")
        bad = {k: v for k, v in counts.items() if v}
        if bad:
            tqdm.write(f"{url}: {samples} samples, problems: {bad}")
        total_samples += samples
        for kind, count in counts.items():
            totals[kind] += count
    bad = {k: v for k, v in totals.items() if v}
    print(f"{len(shard_urls)} shards, {total_samples} samples")
    for kind, count in bad.items():
        print(f"  {kind}: {count}")
    for line in mismatches:
        print(f"  size mismatch: {line}")
    if not bad and not mismatches:
        print("  no problems found")
    return 1 if bad or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
