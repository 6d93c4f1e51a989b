"""Shard URLs and raw sample reading: tar shards (WebDataset layout) and plain text files.

A raw sample is a dict: "__key__", "__url__", "__index__" (position in its shard) and one entry
per file of the sample, named by extension (lower case, e.g. "jpg", "txt", "json") and holding
bytes. Text files give one sample per line ("txt"), CSV files one per row ("csv": dict of str).

Problems with a whole shard never raise: they are reported through `on_skip(kind, detail)` and
the shard yields what it could read before the problem.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import lzma
import os
import re
import subprocess
import zlib
from typing import Callable, Iterator

from braceexpand import braceexpand

from xfast.config import ConfigError
from xfast.data.tar import TarFormatError, decompressed, iter_files

log = logging.getLogger("xfast.data")

OnSkip = Callable[[str, str], None]

TEXT_SUFFIXES = {".txt": "lines", ".csv": "csv", ".jsonl": "jsonl"}

# WebDataset's convention: the key is the path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


def expand_urls(urls: str | list[str], path: str = "urls") -> list[str]:
    """Shard URLs of one source: brace patterns and '::' lists expanded, directories listed.

    Local paths (also `file:` URLs), `pipe:COMMAND` and directories (their *.tar files, sorted)
    are accepted; other schemes raise ConfigError pointing to `pipe:`.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    result: list[str] = []
    for item in items:
        # WebDataset's syntax without importing it (and torch): '::'-separated lists of brace patterns.
        for url in (expanded for part in item.split("::") for expanded in braceexpand(part)):
            if url.startswith("file:"):
                url = url[len("file:"):]
            if url.startswith("pipe:"):
                result.append(url)
                continue
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
                raise ConfigError(f"{path}: {url!r}: read object stores through a command, e.g. "
                                  f"'pipe:aws s3 cp {url} -' or 'pipe:curl -sL {url}'")
            if os.path.isdir(url):
                names = sorted(n for n in os.listdir(url) if n.endswith(".tar"))
                if not names:
                    raise ConfigError(f"{path}: directory {url!r} holds no .tar shards")
                result.extend(os.path.join(url, n) for n in names)
            else:
                result.append(url)
    if not result:
        raise ConfigError(f"{path}: no shard URLs in {urls!r}")
    return result


def shard_format(url: str) -> str:
    """'tar', or for plain text files 'lines', 'csv' or 'jsonl' (by suffix; pipe: commands too)."""
    name = url.rstrip().split()[-1] if url.startswith("pipe:") else url
    for suffix, kind in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return "tar"


def sizes_table(directory: str) -> dict:
    """The sizes.json of a directory (shard file name -> sample count), {} when absent or broken."""
    try:
        with open(os.path.join(directory, "sizes.json")) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Sample count of each shard from the sizes.json next to it (open_clip's convention), or
    None when any shard is not a local file listed there."""
    tables: dict[str, dict] = {}
    sizes = []
    for url in urls:
        if url.startswith("pipe:"):
            return None
        directory, name = os.path.split(url)
        if directory not in tables:
            tables[directory] = sizes_table(directory)
        count = tables[directory].get(name)
        if not isinstance(count, int) or isinstance(count, bool):
            return None
        sizes.append(count)
    return sizes


def read_sizes(urls: list[str]) -> int | None:
    """Total samples in `urls` from sizes.json files, None when unknown."""
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes)


@contextlib.contextmanager
def open_stream(url: str):
    """A binary stream reading the shard at `url` (a local path or `pipe:COMMAND`)."""
    if not url.startswith("pipe:"):
        with open(url, "rb", buffering=1 << 20) as f:
            yield f
        return
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
    try:
        yield proc.stdout
    finally:
        if proc.poll() is None:  # stopped reading early: the command need not finish
            proc.kill()
        proc.stdout.close()
        proc.wait()


def read_shard(url: str, on_skip: OnSkip, *, csv_columns: list[str] | None = None) -> Iterator[dict]:
    """Raw samples of one shard, in file order; shard problems go to `on_skip`."""
    kind = shard_format(url)
    try:
        with open_stream(url) as stream:
            if kind == "tar":
                yield from _read_tar(url, stream, on_skip)
            else:
                yield from _read_text(url, stream, kind, on_skip, csv_columns)
    except OSError as err:  # cannot open the file or start the command
        on_skip("unreadable_shard", f"{url}: {err}")
        log.warning("skipping unreadable shard %s: %s", url, err)


def _read_tar(url: str, stream, on_skip: OnSkip) -> Iterator[dict]:
    sample: dict | None = None
    index = 0
    try:
        for name, data in iter_files(decompressed(stream)):
            match = _KEY_EXT.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is not None and sample["__key__"] != key:  # complete: the next key has begun
                yield sample
                index += 1
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url, "__index__": index}
            sample[ext] = data
        while stream.read(1 << 16):  # the rest: end-of-archive blocks (and draining a pipe)
            pass
    except (TarFormatError, OSError, EOFError, zlib.error, lzma.LZMAError) as err:  # or a broken read/compression
        if isinstance(err, TarFormatError):
            match = _KEY_EXT.match(err.member or "")
            if sample is not None and match is not None and match.group(1) != sample["__key__"]:
                yield sample  # complete: the cut file's header begins the next key
                index += 1
        if getattr(err, "at_start", False):
            on_skip("unreadable_shard", f"{url}: {err}")
            log.warning("skipping unreadable shard %s: %s", url, err)
        else:
            on_skip("truncated_shard", f"{url}: {err}")
            log.warning("shard %s is truncated after %d samples: %s", url, index, err)
        return  # the sample being read may lack files: dropped
    if sample is not None:
        yield sample


def _read_text(url: str, stream, kind: str, on_skip: OnSkip, csv_columns) -> Iterator[dict]:
    base = os.path.basename(url.split()[-1]) if url.startswith("pipe:") else os.path.basename(url)
    lines = iter(stream)
    if kind == "csv":
        header = next(lines, b"").decode("utf-8", errors="replace").lstrip("\ufeff")
        columns = next(csv.reader([header]), [])
        missing = [c for c in (csv_columns or []) if c not in columns]
        if missing:
            on_skip("unreadable_shard", f"{url}: CSV lacks columns {missing} (has {columns})")
            log.warning("skipping %s: CSV lacks columns %s (has %s)", url, missing, columns)
            return
    for index, line in enumerate(lines):
        key = f"{base}:{index}"
        sample = {"__key__": key, "__url__": url, "__index__": index}
        line = line.rstrip(b"\r\n")
        if kind == "csv":
            try:
                values = next(csv.reader([line.decode("utf-8")]), [])
                sample["csv"] = dict(zip(columns, values))
            except (UnicodeDecodeError, csv.Error):
                sample["csv"] = None  # counted as corrupt by the text processor
        else:
            sample["txt" if kind == "lines" else "json"] = line
        yield sample
