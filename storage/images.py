"""Reading images safely, and listing an image collection.

``load_image`` returns an upright RGB image or raises ``BadImage`` whose ``.reason`` is one of
``REASONS``. Policy:
- a truncated or corrupt file is refused (PIL's ``LOAD_TRUNCATED_IMAGES`` is left False, so a half
  decoded JPEG is never padded with grey);
- an image with more than ``max_pixels`` pixels is refused from its header, before decoding
  (per call; PIL's own global ``MAX_IMAGE_PIXELS`` guard is left as it is and may refuse earlier);
- an image whose shorter side is under ``min_side`` (32 px: one cell of a stride-32 network) is
  refused;
- CMYK, 16-bit / 32-bit grey (I;16, I, F), grey, bilevel, palette and alpha images become RGB
  (16-bit values scaled by 1/257, alpha composited over white) and EXIF orientation is applied.
"""
from __future__ import annotations

import os
import stat
import struct
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000
MIN_SIDE = 32
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
REASONS = ("unreadable", "empty", "not_an_image", "truncated", "corrupt", "too_small", "too_large")


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is a short kind (one of ``REASONS``)."""

    def __init__(self, reason: str, detail: str, path: str | os.PathLike = ""):
        super().__init__(reason, detail, str(path))  # all args: survives pickling (Dask)
        self.reason = reason
        self.detail = detail
        self.path = str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}: {self.detail}" if self.path else f"{self.reason}: {self.detail}"


class ImageListError(ValueError):
    """An image source that cannot be listed: missing, an image itself, or a list that is not UTF-8."""


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = MIN_SIDE) -> Image.Image:
    """The image at ``path`` as an upright RGB PIL image; ``BadImage`` when it cannot be used."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a folder, FIFO or device: never open it
            raise BadImage("unreadable", "not a regular file", path)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BadImage("empty", "zero-byte file", path)
            try:
                im = Image.open(f)
            except Image.UnidentifiedImageError:
                raise BadImage("not_an_image", "not a recognised image format", path) from None
            except Image.DecompressionBombError as e:  # PIL's global guard, above 2x its limit
                raise BadImage("too_large", str(e), path) from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
                raise BadImage("corrupt", f"{type(e).__name__}: {e}", path) from None
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} = {w * h} pixels > {max_pixels}", path)
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{w}x{h} px, shorter side < {min_side} px", path)
            try:
                im.load()
            except Image.DecompressionBombError as e:
                raise BadImage("too_large", str(e), path) from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
                reason = "truncated" if "truncated" in str(e) else "corrupt"
                raise BadImage(reason, f"{type(e).__name__}: {e}", path) from None
    except BadImage:
        raise
    except OSError as e:  # missing, dangling link, permission, I/O error
        raise BadImage("unreadable", f"{type(e).__name__}: {e.strerror or e}", path) from None
    im = _upright(im)
    return to_rgb(im)


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not cost the image: keep it as stored
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (see the module docstring for the conversions)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif im.mode != "F":
            a = a / 257.0  # 16-bit range 0..65535 -> 0..255
        grey = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def list_images(source: str | os.PathLike) -> list[tuple[str, str]]:
    """``(id, path)`` of every image of ``source``, sorted by id.

    ``source`` is a folder (searched recursively, symlinked folders not followed, hidden files and
    folders skipped; ids are POSIX paths relative to it; extensions in ``IMAGE_EXTENSIONS``, any
    case) or a text file of paths, one per line (blank lines and ``#`` comments skipped; relative
    paths are relative to the list's folder; the id is the path relative to that folder when the
    file lies inside it, else the absolute path; duplicates collapse). Paths are absolute.
    """
    src = Path(os.path.abspath(source))
    if src.suffix.lower() in IMAGE_EXTENSIONS and src.is_file():
        raise ImageListError(f"{source} is an image: pass a folder or a text file listing images")
    if src.is_dir():
        found = {}
        for root, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and PurePath(name).suffix.lower() in IMAGE_EXTENSIONS:
                    path = Path(root) / name
                    found[path.relative_to(src).as_posix()] = str(path)
        return sorted(found.items())
    if not src.is_file():
        raise ImageListError(f"no such folder or list file: {source}")
    base = src.parent
    found = {}
    try:
        text = src.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ImageListError(f"{source}: line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                             "a list names one image path per line, in UTF-8") from None
    except OSError as e:
        raise ImageListError(f"{source}: unreadable ({e.strerror or e})") from None
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(os.path.normpath(base / Path(entry).expanduser()))
        image_id = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
        found.setdefault(image_id, str(path))
    return sorted(found.items())
