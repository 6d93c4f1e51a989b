"""Regular files of a tar stream, read with one header parse per member.

tarfile builds a TarInfo per member in Python (about 40 us each here); a WebDataset sample is
2-3 members, so at batch 4096 that was a third of a data worker's time. This reader parses the
512-byte ustar/GNU header itself: name (with the ustar prefix, GNU long names and pax "path"),
size (octal, base-256 or pax "size"), type and checksum. Gzip, bzip2 and xz streams are
decompressed on the fly, as tarfile's "r|*" does. It never seeks, so pipes work.

Problems raise TarFormatError; `at_start` tells a stream that is not a tar at all (nothing was
read) from one that breaks after some members.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")          # regular, old regular, contiguous
_SKIPPED_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6", b"K", b"g")  # links, devices, dirs, fifos, link names, pax globals
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


class TarFormatError(Exception):
    """`member`: the name of the file whose data was cut short (its header was whole), else None."""

    def __init__(self, message: str, at_start: bool, member: str | None = None):
        super().__init__(message)
        self.at_start = at_start
        self.member = member


def _number(field: bytes) -> int:
    if field[0] in (0x80, 0xFF):  # GNU base-256 (sizes >= 8 GiB)
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """pax extended header records: "<length> <key>=<value>\\n"."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record of length 0")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read(stream: BinaryIO, size: int, what: str, member: str | None = None) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"the data ends inside {what} ({len(data)} of {size} bytes)", at_start=False,
                             member=member)
    return data


def decompressed(stream: BinaryIO) -> BinaryIO:
    """`stream`, or a decompressing reader over it when it starts with a gzip/bzip2/xz signature.
    Needs a stream with peek() (io.BufferedReader: files opened with buffering, Popen.stdout)."""
    head = stream.peek(6)[:6]
    for magic, reader in _COMPRESSED:
        if head.startswith(magic):
            return reader(stream)
    return stream


def iter_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in archive order, up to the end-of-archive block."""
    long_name = pax = None
    first = True
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise TarFormatError("empty file" if first and not header else
                                 "no end-of-archive block" if not header else
                                 f"the data ends inside a header ({len(header)} of {BLOCK} bytes)", at_start=first)
        if header == _ZERO_BLOCK:
            if first:
                raise TarFormatError("the first header is empty", at_start=True)
            return
        try:
            checksum = _number(header[148:156])
            size = _number(header[124:136])
        except ValueError:
            raise TarFormatError("a header with malformed numbers (not a tar, or corrupt)", at_start=first) from None
        # The checksum field counts as 8 spaces; old tars summed signed bytes.
        if checksum != sum(header) - sum(header[148:156]) + 256:
            if checksum != sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256:
                raise TarFormatError("a header with a bad checksum (not a tar, or corrupt)", at_start=first)
        first = False
        kind = header[156:157]
        if pax is not None and "size" in pax:
            size = int(pax["size"])
        if size < 0:
            raise TarFormatError("a member of negative size", at_start=False)
        padding = -size % BLOCK
        if kind in (b"x", b"L"):
            data = _read(stream, size, "an extended header")
            _read(stream, padding, "an extended header")
            if kind == b"L":
                long_name = _text(data)
            else:
                try:
                    pax = _pax(data)
                except (ValueError, UnicodeDecodeError) as err:
                    raise TarFormatError(f"a malformed pax header: {err}", at_start=False) from None
            continue
        if kind in _FILE_TYPES:
            name = _text(header[:100])
            if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: directory prefix
                name = _text(header[345:500]) + "/" + name
            if long_name is not None:
                name = long_name
            if pax is not None and "path" in pax:
                name = pax["path"]
            data = _read(stream, size, f"file {name}", name)
            _read(stream, padding, f"file {name}", name)
            if not name.endswith("/"):  # old tars mark directories by the name alone
                yield name, data
        elif kind in _SKIPPED_TYPES:
            _read(stream, size + padding, "a skipped member")
        else:
            raise TarFormatError(f"unsupported member type {kind!r} (e.g. GNU sparse files)", at_start=False)
        long_name = pax = None
