"""load_image on every bad or awkward file of badfiles.py, and list_images."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from badfiles import EXIF_STORED_SIZE, MARK, photo, write_bad_files, write_png_bomb
from rmac.data import LANDMARKS_DEV
from rmac.storage.images import REASONS, BadImage, ImageListError, list_images, load_image

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_files(folder)


def _load(folder, name) -> Image.Image:
    return load_image(folder / name)


def test_every_bad_file_gives_its_documented_outcome(bad):
    folder, expected = bad
    assert len(expected) >= 16
    for name, outcome in expected.items():
        if outcome == "ok":
            image = _load(folder, name)
            assert image.mode == "RGB", name
            assert min(image.size) >= 32
        else:
            assert outcome in REASONS
            with pytest.raises(BadImage) as err:
                _load(folder, name)
            assert err.value.reason == outcome, f"{name}: {err.value}"
            assert name in str(err.value)


def test_fixtures_have_the_modes_they_claim(bad):
    folder, _ = bad
    modes = {"cmyk.jpg": "CMYK", "grey16.png": "I;16", "grey.jpg": "L", "rgba.png": "RGBA",
             "la.png": "LA", "palette_alpha.png": "P", "jpeg_named.png": "RGB"}
    for name, mode in modes.items():
        with Image.open(folder / name) as im:
            assert im.mode == mode, name
    with Image.open(folder / "jpeg_named.png") as im:
        assert im.format == "JPEG"


def test_truncated_jpeg_is_refused_not_padded(bad):
    folder, _ = bad
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(BadImage, match="truncated"):
        _load(folder, "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_conversions_keep_the_picture(bad):
    folder, _ = bad
    original = np.asarray(photo(), dtype=np.int16)
    grey = np.asarray(photo().convert("L"), dtype=np.int16)

    cmyk = np.asarray(_load(folder, "cmyk.jpg"), dtype=np.int16)
    assert np.abs(cmyk - original).mean() < 6  # only JPEG loss

    grey16 = np.asarray(_load(folder, "grey16.png"), dtype=np.int16)
    for c in range(3):  # 16-bit scaled back to 8 bits exactly, not clipped to white
        assert np.array_equal(grey16[..., c], grey)

    grey8 = np.asarray(_load(folder, "grey.jpg"), dtype=np.int16)
    assert np.array_equal(grey8[..., 0], grey8[..., 1]) and np.array_equal(grey8[..., 0], grey8[..., 2])
    assert np.abs(grey8[..., 0] - grey).mean() < 3

    rgba = np.asarray(_load(folder, "rgba.png"), dtype=np.int16)
    assert (rgba[:, 0] == 255).all()  # alpha 0 on the left edge: composited over white
    assert np.abs(rgba[:, -1] - original[:, -1]).max() <= 1  # alpha 255 on the right: the photo
    la = np.asarray(_load(folder, "la.png"), dtype=np.int16)
    assert (la[:, 0] == 255).all() and np.abs(la[:, -1, 0] - grey[:, -1]).max() <= 1

    palette = np.asarray(_load(folder, "palette_alpha.png"))
    assert tuple(palette[0, 0]) == (255, 255, 255)  # the transparent palette entry


def test_exif_orientation_is_applied(bad):
    folder, _ = bad
    image = _load(folder, "exif_rotate6.jpg")
    w, h = EXIF_STORED_SIZE
    assert image.size == (h, w)  # transposed
    a = np.asarray(image, dtype=np.int16)
    # the stored top-left red square is displayed at the top-right after a 90-degree clockwise turn
    top_right = a[2:MARK - 2, -MARK + 2:-2]
    assert (top_right[..., 0] > 200).all() and (top_right[..., 1:] < 60).all()
    top_left = a[2:MARK - 2, 2:MARK - 2]
    assert not ((top_left[..., 0] > 200) & (top_left[..., 1] < 60)).all()


def test_pixel_limit_is_per_call_and_checked_before_decoding(bad):
    folder, _ = bad
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage) as err:
        load_image(folder / "cmyk.jpg", max_pixels=256 * 144 - 1)
    assert err.value.reason == "too_large"
    assert load_image(folder / "cmyk.jpg", max_pixels=256 * 144).size == (256, 144)
    with pytest.raises(BadImage, match="144000000 pixels > 100000000"):
        load_image(folder / "bomb_144mp.png")  # PIL alone would only warn about this one
    assert Image.MAX_IMAGE_PIXELS == before
    assert os.path.getsize(folder / "bomb_144mp.png") < 100_000


def test_bad_image_survives_pickling(bad):
    import pickle

    folder, _ = bad
    with pytest.raises(BadImage) as err:
        _load(folder, "empty.jpg")
    copy = pickle.loads(pickle.dumps(err.value))  # as a Dask worker's exception travels
    assert (copy.reason, copy.detail, copy.path, str(copy)) == (
        err.value.reason, err.value.detail, err.value.path, str(err.value))


def test_a_fifo_named_jpg_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(BadImage, match="not a regular file") as err:
        load_image(tmp_path / "pipe.jpg")
    assert err.value.reason == "unreadable"


def test_png_bomb_writer_makes_a_valid_png(tmp_path):
    write_png_bomb(tmp_path / "small.png", 64)
    image = load_image(tmp_path / "small.png")
    assert image.size == (64, 64) and not np.asarray(image).any()


def test_minimum_side_is_configurable(bad):
    folder, _ = bad
    with pytest.raises(BadImage) as err:
        load_image(folder / "grey.jpg", min_side=200)
    assert err.value.reason == "too_small"


def test_real_photo_loads_unchanged():
    path = LANDMARKS_DEV / "jpg" / "tajmahal_1.jpg"
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)


# ---------------------------------------------------------------------------- list_images

def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_list_images_of_a_folder(tmp_path, monkeypatch):
    root = tmp_path / "coll"
    for rel in ["b.jpg", "a.JPEG", "sub/z.png", "sub/deeper/c.TIFF", "x.webp", "y.gif", "w.bmp",
                "notes.txt", "sub/readme.md", ".hidden.jpg", ".cache/d.jpg", "A.jpg"]:
        _touch(root / rel)
    listed = list_images(root)
    ids = [i for i, _ in listed]
    assert ids == ["A.jpg", "a.JPEG", "b.jpg", "sub/deeper/c.TIFF", "sub/z.png", "w.bmp", "x.webp", "y.gif"]
    for image_id, path in listed:
        assert os.path.isabs(path) and os.path.samefile(path, root / image_id)
    assert list_images(root) == listed  # deterministic
    monkeypatch.chdir(tmp_path)
    assert list_images("coll") == listed  # relative source, same ids and absolute paths


def test_list_images_of_the_bundled_photos():
    listed = list_images(LANDMARKS_DEV)
    assert len(listed) == 186
    assert listed[0][0] == "jpg/aero_1.jpg" and all(i.startswith("jpg/") for i, _ in listed)


def test_list_images_of_a_list_file(tmp_path):
    (tmp_path / "lists").mkdir()
    outside = tmp_path / "elsewhere" / "o.jpg"
    _touch(outside)
    _touch(tmp_path / "lists" / "imgs" / "p.jpg")
    listing = tmp_path / "lists" / "photos.txt"
    listing.write_text(f"# my photos\nimgs/p.jpg\n\n  {outside}  \n{tmp_path}/lists/imgs/p.jpg\n"
                       "imgs/./missing.png\n")
    listed = list_images(listing)
    assert listed == [
        (outside.as_posix(), str(outside)),
        ("imgs/missing.png", str(tmp_path / "lists" / "imgs" / "missing.png")),  # kept: fails later
        ("imgs/p.jpg", str(tmp_path / "lists" / "imgs" / "p.jpg")),
    ]
    with pytest.raises(ImageListError, match="no such folder"):
        list_images(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="is an image"):
        list_images(tmp_path / "lists" / "imgs" / "p.jpg")
