"""Image decoding and CLIP-style preprocessing with Pillow and torch (no torchvision).

Evaluation: resize the shorter side to `size`, centre crop `size` x `size`. Training: random
resized crop (torchvision's sampling scheme: area fraction in `scale`, log-uniform aspect
ratio in `ratio`, 10 tries, then a centre crop) resized to `size` x `size`. Both crop and
resize happen in one Pillow `resize(box=...)` call. Normalisation is done per batch.

Baseline and progressive YCbCr/grey JPEGs decoded at full scale go through libjpeg-turbo's
TurboJPEG API (simplejpeg) instead of Pillow's decoder: the same library with the settings
Pillow uses (accurate integer IDCT, fancy upsampling), so the same pixels, at about a fifth of the
time on small images (Pillow parses the JPEG markers in Python). Each process checks once that
both give the same pixels on probe images and keeps Pillow's decoder where they do not. Other
JPEGs (CMYK, reduced-scale drafts, anything simplejpeg rejects) and other formats use Pillow.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import warnings

import numpy as np
import torch
from PIL import Image

from xfast.data.config import ImageConfig
from xfast.data.skips import SampleSkipped

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_JPEG_START = b"\xff\xd8"
_TURBO_COLORSPACES = ("YCbCr", "Gray")  # CMYK/YCCK: Pillow inverts Adobe CMYK and converts it itself
_PROBED_SUBSAMPLINGS = ("444", "422", "420", "440", "411", "Gray")  # those turbo_matches_pillow checks

log = logging.getLogger("xfast.data")


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode to 8-bit RGB. Palette, alpha, CMYK and grey convert as Pillow does; 16-bit grey keeps
    its top 8 bits (Pillow's own conversion clips it at 255, which turns such images white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if image.mode != "I" or values.max() > 255:  # mode I holds 8- or 16-bit grey (PNG, TIFF)
            values = np.clip(values, 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode == "RGB":  # convert() would copy it
        image.load()
        return image
    return image.convert("RGB")


def center_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The central square in source pixels: resizing it to `size` equals resize-shorter-side + centre crop."""
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


def random_crop_box(width: int, height: int, scale: list[float], ratio: list[float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's box: area fraction in `scale`, log-uniform aspect ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    # Fallback: the largest centre crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def _turbo_decode(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] from libjpeg-turbo with Pillow's decoder settings; strict: libjpeg's
    warnings (e.g. junk data) raise, so Pillow decides on those JPEGs."""
    import simplejpeg  # imported once turbo_matches_pillow() succeeded

    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)


def _pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(to_rgb(Image.open(io.BytesIO(data))))


@functools.cache
def turbo_matches_pillow() -> bool:
    """Whether the TurboJPEG path gives Pillow's pixels here (their bundled libjpeg-turbo builds
    could differ): probe JPEGs in every chroma subsampling the path accepts, grey, progressive,
    odd sizes. False, with one warning, where simplejpeg is missing or broken."""
    try:
        import simplejpeg
    except ImportError as err:
        log.warning("simplejpeg cannot be imported (%s): JPEGs are decoded with Pillow (slower)", err)
        return False
    y, x = np.mgrid[0:37, 0:53]
    rgb = np.stack([x * 5 % 256, y * 7 % 256, (x * y) % 256], -1).astype(np.uint8)
    probes = []
    for subsampling in (0, 1, 2):  # Pillow writes 4:4:4, 4:2:2 and 4:2:0
        for progressive in (False, True):
            out = io.BytesIO()
            Image.fromarray(rgb).save(out, "JPEG", quality=85, subsampling=subsampling, progressive=progressive)
            probes.append(out.getvalue())
    out = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(out, "JPEG", quality=85)
    probes.append(out.getvalue())
    try:
        probes += [simplejpeg.encode_jpeg(rgb, quality=85, colorsubsampling=s) for s in ("440", "411")]
        same = all(np.array_equal(_turbo_decode(p), _pillow_rgb(p)) for p in probes)
    except Exception as err:  # a broken simplejpeg install: Pillow decodes everything
        log.warning("simplejpeg fails on probe JPEGs (%r): JPEGs are decoded with Pillow", err)
        return False
    if not same:
        log.warning("simplejpeg's libjpeg-turbo decodes probe JPEGs differently from Pillow's: JPEGs are decoded "
                    "with Pillow (slower)")
    return same


class ImageTransform:
    """bytes -> uint8 array [size, size, 3]; `rng` drives the training crop."""

    def __init__(self, cfg: ImageConfig, train: bool):
        self.cfg = cfg
        self.train = train
        self.filter = _FILTERS[cfg.interpolation]
        turbo_matches_pillow()  # probed here, before loader workers fork: they inherit the answer

    def __call__(self, data: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
        size = self.cfg.size
        image = self._turbo_jpeg(data) if data[:2] == _JPEG_START else None
        if image is None:
            image = self._pillow(data)
        width, height = image.size
        if width < 1 or height < 1:
            raise SampleSkipped("corrupt_image", f"empty image {width}x{height}")
        if self.train:
            box = random_crop_box(width, height, self.cfg.train_crop_scale, self.cfg.train_crop_ratio, rng)
        else:
            box = center_crop_box(width, height)
        image = image.resize((size, size), self.filter, box=box)
        return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size, size, 3)

    def _draft_side(self) -> int:
        """The side a JPEG draft must still cover: the output, or the smallest training crop's side."""
        size = self.cfg.size
        return size if not self.train else math.ceil(size / math.sqrt(self.cfg.train_crop_scale[0]))

    def _turbo_jpeg(self, data: bytes) -> Image.Image | None:
        """The decoded JPEG through TurboJPEG, or None where Pillow must decode it: where Pillow's
        draft would reduce the scale, above Pillow's decompression-bomb limit, for colour spaces
        Pillow converts itself, and for data TurboJPEG rejects (Pillow then decides: it accepts
        some JPEGs with warnings)."""
        if not turbo_matches_pillow():
            return None
        import simplejpeg

        try:
            height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
        except Exception:  # not a JPEG TurboJPEG reads
            return None
        if colorspace not in _TURBO_COLORSPACES or subsampling not in _PROBED_SUBSAMPLINGS:
            return None
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            return None
        if self.cfg.jpeg_draft:
            need = self._draft_side()
            if min(width // need, height // need) >= 2:  # Pillow's draft would decode at 1/2 .. 1/8 scale
                return None
        try:
            pixels = _turbo_decode(data)
        except Exception:
            return None
        return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)

    def _pillow(self, data: bytes) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if self.cfg.jpeg_draft and image.format == "JPEG":
                    # Decode at the smallest DCT scale whose crop still covers `size` pixels.
                    need = self._draft_side()
                    image.draft("RGB", (need, need))
                return to_rgb(image)  # decodes
        except Exception as err:  # Pillow raises many types for broken files
            raise SampleSkipped("corrupt_image", str(err)) from None


class ImageNormalizer:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised with the configured mean/std."""

    def __init__(self, cfg: ImageConfig):
        std = torch.tensor(cfg.std, dtype=torch.float32)
        mean = torch.tensor(cfg.mean, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add.
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)

    def __call__(self, pixels: np.ndarray, shared: bool = False) -> torch.Tensor:
        """shared: build the batch in shared memory (in a DataLoader worker: sending it to the
        training process then copies nothing, as torch's default_collate does there)."""
        if shared:
            batch = shared_empty((pixels.shape[0], 3, *pixels.shape[1:3]), torch.float32)
            batch.copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        else:
            # Channels first on the uint8 bytes (a quarter of the float copy), then one float pass.
            batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float()
        return batch.mul_(self.scale).add_(self.shift)


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory."""
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
