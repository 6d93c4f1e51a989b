"""xfast.data.tar against tarfile (the reference reader) on archives tarfile writes."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from xfast.data.tar import TarFormatError, decompressed, iter_files


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]


def _ours(data: bytes) -> list[tuple[str, bytes]]:
    return list(iter_files(decompressed(io.BufferedReader(io.BytesIO(data)))))


def _archive(fmt: int, compression: str = "") -> bytes:
    rng = np.random.default_rng(fmt)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w", format=fmt) as archive:
        def add(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(payload) if kind == tarfile.REGTYPE else 0
            for key, value in attrs.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)

        add("dir", kind=tarfile.DIRTYPE)
        for size in (0, 1, 511, 512, 513, 4096, 70000):  # block boundaries either side
            add(f"dir/{size:06d}.bin", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        add("dir/link.txt", kind=tarfile.SYMTYPE, linkname="000001.bin")
        if fmt != tarfile.USTAR_FORMAT:  # long names and non-ASCII names need GNU or pax headers
            add("d" * 150 + "/" + "k" * 120 + ".jpg", b"long name")
            add("caf\u00e9/s\u00e4mple.txt", "caf\u00e9".encode())
        add("p" * 90 + "/" + "q" * 80 + ".txt", b"ustar prefix")  # name > 100 bytes: prefix field
        big = {} if fmt == tarfile.USTAR_FORMAT else {"mtime": 2**33 + 5}  # past the octal field: base-256 or pax
        add("last.json", b"{}", **big)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_same_files_as_tarfile(fmt, compression):
    data = _archive(fmt, compression)
    expected = _reference(data)
    assert len(expected) >= 9 and _ours(data) == expected


def test_every_cut_raises_and_keeps_the_files_before_it():
    data = _archive(tarfile.GNU_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
    end = members[-1].offset_data + members[-1].size + (-members[-1].size % 512)  # the end-of-archive block
    for cut in [*range(0, end + 512, 97), end + 511]:  # a cut anywhere before a whole end-of-archive block
        files = []
        with pytest.raises(TarFormatError) as err:
            for name, _ in iter_files(io.BufferedReader(io.BytesIO(data[:cut]))):
                files.append(name)
        assert err.value.at_start == (cut < 512)  # no whole header: not known to be a tar
        whole = [m.name for m in members if m.offset_data + m.size + (-m.size % 512) <= cut]
        assert files == whole, cut
        inside = [m.name for m in members if m.offset_data <= cut < m.offset_data + m.size + (-m.size % 512)]
        assert err.value.member == (inside[0] if inside else None), cut  # its header was whole


def test_not_a_tar_and_a_corrupt_header():
    for junk in (b"", b"\x00garbage" * 100, bytes(1024), b"x" * 100):
        with pytest.raises(TarFormatError) as err:
            _ours(junk)
        assert err.value.at_start
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        third = [m for m in archive.getmembers() if m.isfile()][2]
    data[third.offset + 3] ^= 0x20  # a changed name byte: the checksum no longer fits
    files = []
    with pytest.raises(TarFormatError, match="checksum") as err:
        for name, _ in iter_files(io.BufferedReader(io.BytesIO(bytes(data)))):
            files.append(name)
    assert not err.value.at_start and len(files) == 2
