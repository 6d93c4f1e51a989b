"""`xfast shards`: write WebDataset shards from a media folder and a caption table; check shards.

Written layout (readable by img2dataset/open_clip and LAION-CLAP loaders alike):
  image: KEY.jpg|png|webp|bmp|gif|tif|tiff + KEY.txt (first caption) + KEY.json {"text", "caption", "file"}
  audio: KEY.flac|wav|mp3|ogg|opus + KEY.json {"text", "tag", "file"}
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
from PIL import Image
from tqdm import tqdm

from xfast.data.audio import AUDIO_EXTENSIONS
from xfast.data.audio_io import decode_audio
from xfast.data.config import TextConfig
from xfast.data.image import IMAGE_EXTENSIONS, to_rgb
from xfast.data.skips import SampleSkipped, empty_counts
from xfast.data.sources import expand_urls, read_shard, sizes_table
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
    parser.add_argument("--modality", choices=["image", "audio"], default=None,
                        help=f"kind of media files: image ({'/'.join(IMAGE_EXTENSIONS)}) or audio "
                             f"({'/'.join(AUDIO_EXTENSIONS)}); default: inferred from the files' extensions")
    parser.add_argument("--prefix", default="shards", help="shard file name prefix (default: shards)")
    parser.add_argument("--file-column", default="file",
                        help="column holding the media path relative to MEDIA_DIR (default: file)")
    parser.add_argument("--caption-column", default="caption",
                        help="column holding the caption; in JSONL it may be a list of captions (default: caption)")
    parser.add_argument("--tag-column", default="tag",
                        help="optional column of labels, kept as the json 'tag' field; in CSV, labels are "
                             "separated by ';' (default: tag)")
    parser.add_argument("--max-listed", type=int, default=20,
                        help="how many left-out files (or, with --check, problems) to name on the terminal; "
                             "every left-out file is also listed in OUT/left_out.csv (default: 20)")
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
        return check_shards(args.check, args.max_listed)
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
                        raise SystemExit(f"{path}:{line_no}: not JSON: {err}") from err
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


def _verify(data: bytes, ext: str) -> None:
    """Decode the whole file as the pipeline would, raising SampleSkipped when it cannot."""
    if ext in IMAGE_EXTENSIONS:
        try:
            with Image.open(io.BytesIO(data)) as image:
                to_rgb(image)
        except Exception as err:
            raise SampleSkipped("corrupt_image", str(err)) from None
        return
    try:
        wave, _ = decode_audio(data, ext)
    except Exception as err:
        raise SampleSkipped("corrupt_audio", str(err)) from None
    if wave.shape[0] == 0 or not np.isfinite(wave).all():
        raise SampleSkipped("corrupt_audio", "empty or non-finite audio")


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def infer_modality(rows: list[dict]) -> tuple[str | None, str]:
    """('image' | 'audio' | None, what was seen) from the extensions of the table's files."""
    seen = {"image": {}, "audio": {}}
    for row in rows:
        ext = _extension(row["file"])
        for modality, extensions in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS)):
            if ext in extensions:
                seen[modality][ext] = seen[modality].get(ext, 0) + 1
    described = {m: ", ".join(f"{n} .{e}" for e, n in sorted(exts.items())) for m, exts in seen.items()}
    if seen["image"] and seen["audio"]:
        return None, f"the table names image files ({described['image']}) and audio files ({described['audio']})"
    for modality in ("image", "audio"):
        if seen[modality]:
            return modality, described[modality]
    return None, (f"no file in the table has an image ({'|'.join(IMAGE_EXTENSIONS)}) or audio "
                  f"({'|'.join(AUDIO_EXTENSIONS)}) extension")


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shards(args) -> int:
    rows = _read_table(args.captions, args)
    modality = args.modality
    if modality is None:
        modality, seen = infer_modality(rows)
        if modality is None:
            print(f"error: {seen}: give --modality image or --modality audio", file=sys.stderr)
            return 2
        print(f"modality: {modality} (inferred from the files: {seen}; --modality sets it)")
    extensions = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
    os.makedirs(args.out, exist_ok=True)
    num_shards = max(1, -(-len(rows) // args.shard_size))
    digits = max(4, len(str(num_shards - 1)))
    sizes: dict[str, int] = {}
    problems: dict[str, int] = {}
    left_out: list[tuple[str, int, str]] = []  # (file, line of the table, why)
    archive, shard_path, shard_count, written = None, None, 0, 0

    def close_shard():
        nonlocal archive
        if archive is not None:
            archive.close()
            os.replace(shard_path + ".tmp", shard_path)
            sizes[os.path.basename(shard_path)] = shard_count
            archive = None

    for row in tqdm(rows, desc="writing shards", unit="sample"):
        ext = _extension(row["file"])
        kind = detail = None
        if ext not in extensions:
            kind, detail = f"not an {modality} file", f"extension not one of {'|'.join(extensions)}"
        elif not any(c for c in row["captions"]):
            kind, detail = "missing_caption", "empty caption"
        else:
            try:
                with open(os.path.join(args.media_dir, row["file"]), "rb") as f:
                    data = f.read()
                if not args.no_verify:
                    _verify(data, ext)
            except OSError as err:
                kind, detail = "unreadable file", err.strerror or str(err)
            except SampleSkipped as skip:
                kind, detail = skip.kind, str(skip)[len(skip.kind) + 2:] or skip.kind
        if kind is not None:
            problems[kind] = problems.get(kind, 0) + 1
            left_out.append((row["file"], row["line"], f"{kind}: {detail}"))
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
        if modality == "image":
            meta["caption"] = captions[0]
            _add(archive, f"{key}.txt", captions[0].encode())
        if row["tags"]:
            meta["tag"] = row["tags"]
        _add(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        shard_count += 1
        written += 1
    close_shard()
    if written:
        with open(os.path.join(args.out, "sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1)
        pattern = os.path.join(args.out, f"{args.prefix}-{{{0:0{digits}d}..{len(sizes) - 1:0{digits}d}}}.tar")
        print(f"wrote {written} samples in {len(sizes)} shards: {pattern}")
    for kind, count in sorted(problems.items()):
        print(f"  left out {count} rows: {kind}")
    _report_left_out(left_out, args)
    if written == 0:
        print(f"error: no usable row in {args.captions}", file=sys.stderr)
        return 1
    return 0


def _report_left_out(left_out: list[tuple[str, int, str]], args) -> None:
    """Name each left-out file and why: the first --max-listed here, all in OUT/left_out.csv."""
    listing = os.path.join(args.out, "left_out.csv")
    if not left_out:
        if os.path.exists(listing):  # from an earlier run into the same folder
            os.remove(listing)
        return
    with open(listing, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "line", "reason"])
        writer.writerows(left_out)
    print(f"left-out files (all {len(left_out)} in {listing}):")
    for file, line, reason in left_out[: args.max_listed]:
        print(f"  {file} (line {line}): {reason}")
    if len(left_out) > args.max_listed:
        print(f"  ... and {len(left_out) - args.max_listed} more")


# Checking --------------------------------------------------------------------------------------

def _check_sample(sample: dict) -> None:
    """Decode the sample's media and find its text, raising SampleSkipped like the pipeline."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    audio_ext = next((e for e in AUDIO_EXTENSIONS if e in sample), None)
    if image_ext or audio_ext:
        find_captions(sample, CAPTION_KEYS)
        _verify(sample[image_ext or audio_ext], image_ext or audio_ext)
    elif "csv" in sample:
        nli_triplet(sample, TEXT)
    elif "txt" in sample:
        find_captions(sample, CAPTION_KEYS)
    elif "json" in sample and any(field in (sample_json(sample) or {}) for field in TEXT.nli_fields):
        nli_triplet(sample, TEXT)
    else:
        raise SampleSkipped("missing_media", f"no media or text in {sorted(k for k in sample if k[:2] != '__')}")


def check_shards(urls: str, max_listed: int = 20) -> int:
    """Read every shard, decode every sample; print counts and each problem (shards by path,
    samples by shard and key). 0 when all is well."""
    try:
        shard_urls = expand_urls(urls, "--check")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes_tables: dict[str, dict] = {}
    totals = empty_counts()
    total_samples = 0
    problems: list[str] = []

    def on_shard_problem(kind: str, detail: str) -> None:  # detail starts with the shard's url
        totals[kind] += 1
        problems.append(f"{kind}: {detail}")

    for url in tqdm(shard_urls, desc="checking shards", unit="shard"):
        samples = 0
        for sample in read_shard(url, on_shard_problem):
            samples += 1
            try:
                _check_sample(sample)
            except SampleSkipped as skip:
                totals[skip.kind] += 1
                problems.append(f"{skip.kind}: {url} sample {sample['__key__']}{str(skip)[len(skip.kind):]}")
        directory, name = os.path.split(url)
        if not url.startswith("pipe:"):
            if directory not in sizes_tables:
                sizes_tables[directory] = sizes_table(directory)
            expected = sizes_tables[directory].get(name)
            if expected is not None and expected != samples:
                problems.append(f"size mismatch: {url}: sizes.json says {expected}, read {samples}")
        total_samples += samples
    print(f"{len(shard_urls)} shards, {total_samples} samples")
    for kind, count in totals.items():
        if count:
            print(f"  {kind}: {count}")
    if not problems:
        print("  no problems found")
        return 0
    print("problems:")
    for line in problems[:max_listed]:
        print(f"  {line}")
    if len(problems) > max_listed:
        print(f"  ... and {len(problems) - max_listed} more (--max-listed)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
