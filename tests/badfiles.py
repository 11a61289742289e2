"""Bad and awkward image files for tests: ``write_bad_files(folder)``.

Built from a real photo of ``rmac.data.LANDMARKS_DEV``. The expected outcome of
``rmac.storage.images.load_image`` (default arguments) is a ``BadImage.reason`` or ``"ok"``.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rmac.data import LANDMARKS_DEV

SOURCE_PHOTO = LANDMARKS_DEV / "jpg" / "distractor_151.jpg"  # a cheetah, 800x450
PHOTO_SIZE = (256, 144)  # (w, h) the photo is reduced to for the convertible cases
EXIF_STORED_SIZE = PHOTO_SIZE  # exif_rotate6.jpg is stored landscape and displays portrait
MARK = 24  # side of the red square painted at the stored top-left corner of exif_rotate6.jpg


def photo() -> Image.Image:
    """The RGB photo the convertible files are made from."""
    with Image.open(SOURCE_PHOTO) as im:
        return im.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BILINEAR)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png_bomb(path: Path, side: int) -> None:
    """A valid all-black 1-bit PNG of side x side pixels; a few KB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(side)] + [z.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def write_bad_files(folder: str | os.PathLike) -> dict[str, str]:
    """Write the fixture files into ``folder``; returns file name -> expected outcome."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    expected: dict[str, str] = {}

    data = SOURCE_PHOTO.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "truncated"

    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty"

    (folder / "text.jpg").write_text("this is not a JPEG\n" * 20)
    expected["text.jpg"] = "not_an_image"

    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "tiny.png")
    expected["tiny.png"] = "too_small"

    # 400 MP: above twice PIL's global limit, refused by PIL as soon as the header is read
    write_png_bomb(folder / "bomb_400mp.png", 20000)
    expected["bomb_400mp.png"] = "too_large"
    # 144 MP: PIL would only warn; load_image's own per-call limit (100 MP) refuses it
    write_png_bomb(folder / "bomb_144mp.png", 12000)
    expected["bomb_144mp.png"] = "too_large"

    # not readable as a file (tests run as root, where chmod 000 does not block reading)
    os.symlink(folder / "missing-target.jpg", folder / "dangling.jpg")
    expected["dangling.jpg"] = "unreadable"
    (folder / "folder.jpg").mkdir(exist_ok=True)
    expected["folder.jpg"] = "unreadable"

    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = "ok"

    grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16
    expected["grey16.png"] = "ok"

    rgb.convert("L").save(folder / "grey.jpg", quality=95)
    expected["grey.jpg"] = "ok"

    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize(rgb.size))
    rgba.save(folder / "rgba.png")
    expected["rgba.png"] = "ok"
    rgba.convert("LA").save(folder / "la.png")
    expected["la.png"] = "ok"

    palette = rgb.quantize(64)
    palette.putpixel((0, 0), 63)
    palette.info["transparency"] = 63  # palette entry 63 is see-through
    palette.save(folder / "palette_alpha.png", transparency=63)
    expected["palette_alpha.png"] = "ok"

    marked = rgb.copy()
    marked.paste((255, 0, 0), (0, 0, MARK, MARK))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise
    marked.save(folder / "exif_rotate6.jpg", quality=95, exif=exif)
    expected["exif_rotate6.jpg"] = "ok"

    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    (folder / "jpeg_named.png").write_bytes(buf.getvalue())  # content, not the name, decides
    expected["jpeg_named.png"] = "ok"
    return expected
