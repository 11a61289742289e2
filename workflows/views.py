"""`rmac make-views SRC OUT`: a harder copy of a dataset where each positive shows its landmark small,
off-centre, seen from another viewpoint and pasted into a cluttered scene, with the exact box recorded.

Per positive database image (good/ok for some query), seeded from ``(seed, image id)``:
cut the photo to the object (see :func:`object_box`) → shrink so that the pasted object's bounding box
covers a fraction of the scene drawn from ``scale_range`` → recolour (brightness, contrast, saturation,
hue) → blur or JPEG-compress → warp by a random perspective → paste into a scene made of distractor
photos (one photo, or a mosaic of 2-4 crops) → save. Distractors and junk-only images are copied
unchanged; queries keep their original photos and boxes. Layout and schema: docs/views.md.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from rmac.storage.datasets import Box, Dataset, DatasetError, Query, load_dataset, save_json
from rmac.storage.images import load_image  # upright RGB, as extraction sees it: boxes agree
from rmac.workflows.args import float_range, int_range, new_or_existing_dir, nonnegative_int
from rmac.workflows.errors import UsageError

__all__ = ["ViewParams", "make_views", "add_arguments", "main", "perspective_coeffs", "random_quad",
           "render_scene", "paste_object", "object_box", "QUERY_SUFFIX"]

QUERY_SUFFIX = "__query"  # id of the untouched copy of a query photo whose database entry became a view
_ATTRIBUTION = ("ATTRIBUTION.md", "sources.json", "licenses")
_MANAGED = ("jpg", "gt", "dataset.json", "views.json") + _ATTRIBUTION


@dataclass(frozen=True)
class ViewParams:
    """Every knob of the generator; written to ``OUT/views.json``."""

    seed: int = 0
    scale_range: tuple[float, float] = (0.05, 0.40)  # area of the pasted box / area of the scene
    scene_size: tuple[int, int] = (800, 600)  # landscape (W, H); portrait scenes swap it
    portrait_prob: float = 1 / 3
    mosaic_prob: float = 0.5  # else the scene is one distractor photo
    max_panels: int = 4  # a mosaic has 2..max_panels distractor crops
    max_yaw: float = 0.35  # foreshortening of the left or right edge (fraction of the height)
    max_pitch: float = 0.2  # foreshortening of the top or bottom edge (fraction of the width)
    max_rotation: float = 12.0  # in-plane rotation, degrees
    corner_jitter: float = 0.03  # std of independent corner moves, fraction of the short side
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.6, 1.4)
    max_hue: float = 0.05  # hue shift, fraction of the colour circle
    blur_prob: float = 0.5  # else JPEG compression
    blur_radius: tuple[float, float] = (0.5, 1.5)
    jpeg_quality: tuple[int, int] = (25, 60)
    out_quality: int = 92  # JPEG quality of the saved scenes


# ------------------------------------------------------------------------------------------- geometry
def perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """The 8 coefficients PIL's ``Image.transform(..., PERSPECTIVE, ...)`` needs to send output point
    ``dst[i]`` to input point ``src[i]`` (4 points each, ``(x, y)``), by least squares:
    ``x_in = (a x + b y + c) / (g x + h y + 1)``, ``y_in = (d x + e y + f) / (g x + h y + 1)``.
    """
    dst, src = np.asarray(dst, np.float64), np.asarray(src, np.float64)
    A = np.zeros((8, 8))
    rhs = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        A[2 * i] = [x, y, 1, 0, 0, 0, -x * u, -y * u]
        A[2 * i + 1] = [0, 0, 0, x, y, 1, -x * v, -y * v]
        rhs[2 * i], rhs[2 * i + 1] = u, v
    coeffs = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return tuple(float(c) for c in coeffs)


def random_quad(w: float, h: float, rng: np.random.Generator, p: ViewParams) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of a ``w x h`` rectangle seen from a random viewpoint, shifted so that
    their bounding box starts at (0, 0). The quad stays convex for the default limits."""
    q = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) - [w / 2, h / 2]
    yaw = rng.uniform(-p.max_yaw, p.max_yaw)
    pitch = rng.uniform(-p.max_pitch, p.max_pitch)
    # Turning away shortens the far edge and compresses the rectangle along the turn.
    far = [1, 2] if yaw > 0 else [0, 3]
    q[far, 1] *= 1 - abs(yaw)
    q[:, 0] *= 1 - abs(yaw) / 2
    far = [2, 3] if pitch > 0 else [0, 1]
    q[far, 0] *= 1 - abs(pitch)
    q[:, 1] *= 1 - abs(pitch) / 2
    q += rng.normal(0, p.corner_jitter * min(w, h), size=(4, 2))
    t = math.radians(rng.uniform(-p.max_rotation, p.max_rotation))
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    q = q @ rot.T
    return q - q.min(axis=0)


def _cover_crop(img: Image.Image, size: tuple[int, int], rng: np.random.Generator,
                max_zoom: float = 1.5) -> tuple[Image.Image, list[float]]:
    """A random crop of ``img`` with the aspect of ``size``, zoomed in up to ``max_zoom``, resized."""
    W, H = img.size
    tw, th = size
    scale = max(tw / W, th / H) * rng.uniform(1.0, max_zoom)
    cw, ch = min(W, tw / scale), min(H, th / scale)
    x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
    box = [x0, y0, x0 + cw, y0 + ch]
    return img.resize(size, Image.Resampling.LANCZOS, box=tuple(box)), [round(v, 2) for v in box]


def _split(panels: list[list[int]], n: int, rng: np.random.Generator) -> list[list[int]]:
    """Split the largest panel along its long side until there are ``n`` panels ``[x0, y0, x1, y1]``."""
    panels = [list(b) for b in panels]
    while len(panels) < n:
        k = max(range(len(panels)), key=lambda i: (panels[i][2] - panels[i][0]) * (panels[i][3] - panels[i][1]))
        x0, y0, x1, y1 = panels.pop(k)
        f = rng.uniform(0.35, 0.65)
        if x1 - x0 >= y1 - y0:
            xm = int(round(x0 + f * (x1 - x0)))
            panels += [[x0, y0, xm, y1], [xm, y0, x1, y1]]
        else:
            ym = int(round(y0 + f * (y1 - y0)))
            panels += [[x0, y0, x1, ym], [x0, ym, x1, y1]]
    return panels


def render_scene(distractors: Sequence[tuple[str, Path]], size: tuple[int, int], rng: np.random.Generator,
                 p: ViewParams) -> tuple[Image.Image, dict[str, Any]]:
    """A ``size`` scene: one distractor photo, or a mosaic of 2..max_panels distractor crops."""
    if not distractors:
        raise DatasetError("make-views needs at least one distractor image (in no query's ok/junk list)")
    W, H = size
    mosaic = rng.random() < p.mosaic_prob
    n = int(rng.integers(2, p.max_panels + 1)) if mosaic else 1
    panels = _split([[0, 0, W, H]], n, rng)
    picks = rng.choice(len(distractors), size=n, replace=n > len(distractors))
    scene = Image.new("RGB", size)
    record: dict[str, Any] = {"mode": "mosaic" if mosaic else "single", "size": [W, H], "panels": []}
    for panel, k in zip(panels, picks):
        name, path = distractors[int(k)]
        crop, src_box = _cover_crop(load_image(path), (panel[2] - panel[0], panel[3] - panel[1]), rng)
        scene.paste(crop, (panel[0], panel[1]))
        record["panels"].append({"image": name, "panel": panel, "crop": src_box})
    return scene, record


# ------------------------------------------------------------------------------------------ the object
def _recolour(img: Image.Image, rng: np.random.Generator, p: ViewParams) -> tuple[Image.Image, dict[str, float]]:
    b, c, s = (float(rng.uniform(*r)) for r in (p.brightness, p.contrast, p.saturation))
    hue = float(rng.uniform(-p.max_hue, p.max_hue))
    img = ImageEnhance.Brightness(img).enhance(b)
    img = ImageEnhance.Contrast(img).enhance(c)
    img = ImageEnhance.Color(img).enhance(s)
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(hue * 256))) % 256
    img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img, {"brightness": round(b, 4), "contrast": round(c, 4), "saturation": round(s, 4), "hue": round(hue, 4)}


def _degrade(img: Image.Image, rng: np.random.Generator, p: ViewParams) -> tuple[Image.Image, dict[str, Any]]:
    if rng.random() < p.blur_prob:
        r = float(rng.uniform(*p.blur_radius))
        return img.filter(ImageFilter.GaussianBlur(r)), {"kind": "blur", "radius": round(r, 4)}
    q = int(rng.integers(p.jpeg_quality[0], p.jpeg_quality[1] + 1))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), {"kind": "jpeg", "quality": q}


def paste_object(scene: Image.Image, obj: Image.Image, rng: np.random.Generator,
                 p: ViewParams) -> tuple[Image.Image, Box, dict[str, Any]]:
    """Shrink, recolour, degrade and perspective-warp ``obj``, paste it at a random place of a copy of
    ``scene``; return the new scene, the pasted box ``(x1, y1, x2, y2)`` and what was done."""
    W, H = scene.size
    ow, oh = obj.size
    quad = random_quad(float(ow), float(oh), rng, p)
    bw, bh = quad.max(axis=0)
    lo, hi = p.scale_range
    fits = min(W / bw, H / bh) ** 2 * bw * bh / (W * H)  # largest area fraction that fits the scene
    frac = float(rng.uniform(min(lo, fits), min(hi, fits)))
    s = math.sqrt(frac * W * H / (bw * bh))
    quad, rw, rh = quad * s, max(1, round(ow * s)), max(1, round(oh * s))
    cw, ch = min(W, math.ceil(bw * s)), min(H, math.ceil(bh * s))

    small = obj.resize((rw, rh), Image.Resampling.LANCZOS)
    small, colour = _recolour(small, rng, p)
    small, degrade = _degrade(small, rng, p)
    coeffs = perspective_coeffs(quad, [[0, 0], [rw, 0], [rw, rh], [0, rh]])
    warped = small.transform((cw, ch), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    mask = Image.new("L", (rw, rh), 255).transform((cw, ch), Image.Transform.PERSPECTIVE, coeffs,
                                                   Image.Resampling.BILINEAR)
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    out = scene.copy()
    out.paste(warped, (x0, y0), mask)
    x1, y1 = x0 + bw * s, y0 + bh * s
    box = (float(x0), float(y0), float(min(W, x1)), float(min(H, y1)))
    record = {"area_fraction": frac, "object_size": [rw, rh],
              "quad": [[round(x0 + x, 3), round(y0 + y, 3)] for x, y in quad],
              "recolour": colour, "degrade": degrade}
    return out, box, record


def object_box(ds: Dataset, image: str, size: tuple[int, int]) -> Box:
    """Where the object is in positive ``image``: the union of every box the dataset knows there (query
    boxes of queries on that image, ``boxes`` of queries listing it), else the whole image."""
    known = [q.bbox for q in ds.queries if q.image == image]
    known += [q.boxes[image] for q in ds.queries if q.boxes and image in q.boxes and image in q.ok]
    W, H = size
    if not known:
        return (0.0, 0.0, float(W), float(H))
    b = np.array(known, np.float64)
    x1, y1 = max(0.0, b[:, 0].min()), max(0.0, b[:, 1].min())
    x2, y2 = min(float(W), b[:, 2].max()), min(float(H), b[:, 3].max())
    if x2 - x1 < 8 or y2 - y1 < 8:  # degenerate or off-image box: fall back to the whole photo
        return (0.0, 0.0, float(W), float(H))
    return (float(x1), float(y1), float(x2), float(y2))


# ----------------------------------------------------------------------------------------- the dataset
def _rng(seed: int, image: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def _copy_jpeg(src: Path, dst: Path, quality: int) -> None:
    if src.suffix.lower() in (".jpg", ".jpeg"):
        shutil.copyfile(src, dst)
    else:
        load_image(src).save(dst, "JPEG", quality=quality)


def source_folders(ds: Dataset) -> list[Path]:
    """Every folder a dataset is read from: its root and the folder of each of its image files."""
    folders = {Path(ds.root).resolve()}
    folders.update(Path(p).resolve().parent for p in ds.image_paths.values())
    return sorted(folders)


def check_out_apart(out: Path, ds: Dataset) -> None:
    """Refuse an output folder that is, contains or lies inside a folder the source is read from:
    writing (or, with overwrite, deleting) there would destroy the source."""
    o = out.resolve()
    for f in source_folders(ds):
        if o == f or f.is_relative_to(o) or o.is_relative_to(f):
            how = "is" if o == f else ("contains" if f.is_relative_to(o) else "lies inside")
            raise UsageError(f"output folder {out} {how} the source folder {f}: choose an output apart from "
                             "the source")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "output folder is not empty (use --overwrite)", str(out))
        for name in _MANAGED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(exist_ok=True)


def _fmt(v: float) -> str:
    return repr(float(v))


def make_views(src: str | Path, out: str | Path, seed: int = 0,
               scale_range: tuple[float, float] = (0.05, 0.40), overwrite: bool = False,
               **params: Any) -> dict[str, Any]:
    """Write the cluttered-views copy of dataset ``src`` (Oxford folder or JSON form) to ``out``.

    ``params`` override other :class:`ViewParams` fields. Same inputs and seed → byte-identical files.
    Returns a summary (counts, output paths, seconds).
    """
    t0 = time.perf_counter()
    p = replace(ViewParams(), seed=int(seed), scale_range=(float(scale_range[0]), float(scale_range[1])), **params)
    if not 0 < p.scale_range[0] <= p.scale_range[1] < 1:
        raise UsageError(f"scale range must satisfy 0 < min <= max < 1, got {p.scale_range}")
    ds = load_dataset(src)
    out = Path(out)
    check_out_apart(out, ds)
    _prepare_out(out, overwrite)

    positives = sorted({i for q in ds.queries for i in q.ok})
    listed = {i for q in ds.queries for i in q.ok + q.junk}
    missing = sorted(set(positives) - set(ds.images))
    if missing:
        raise DatasetError(f"{len(missing)} positives are not in the database: {', '.join(missing[:5])}")
    qimages = {q.image for q in ds.queries}
    pool = [(i, ds.image_paths[i]) for i in ds.images if i not in listed and i not in qimages]
    query_copy = {i: i + QUERY_SUFFIX for i in sorted(qimages) if i in set(positives)}
    outside = sorted(qimages - set(ds.images))  # revisited: query photos are not database images
    clash = set(query_copy.values()) & set(ds.image_paths)
    if clash:
        raise DatasetError(f"query copy ids clash with existing images: {sorted(clash)[:5]}")

    views: dict[str, dict[str, Any]] = {}
    pasted: dict[str, Box] = {}
    for image in positives:
        rng = _rng(p.seed, image)
        photo = load_image(ds.image_paths[image])
        cut = object_box(ds, image, photo.size)
        obj = photo.crop(tuple(int(round(v)) for v in cut))
        size = p.scene_size if rng.random() >= p.portrait_prob else p.scene_size[::-1]
        scene, scene_rec = render_scene(pool, tuple(size), rng, p)
        view, box, rec = paste_object(scene, obj, rng, p)
        view.save(out / "jpg" / f"{image}.jpg", "JPEG", quality=p.out_quality)
        pasted[image] = box
        views[image] = {"cut": list(cut), "box": list(box), "scene": scene_rec, **rec}
    for image in ds.images:
        if image not in pasted:
            _copy_jpeg(ds.image_paths[image], out / "jpg" / f"{image}.jpg", p.out_quality)
    for image, copy in query_copy.items():
        _copy_jpeg(ds.image_paths[image], out / "jpg" / f"{copy}.jpg", p.out_quality)
    for image in outside:
        _copy_jpeg(ds.image_paths[image], out / "jpg" / f"{image}.jpg", p.out_quality)

    # Every file in OUT/jpg is in the text form's database: untouched photos of a query's landmark are junk.
    untouched = {**query_copy, **{i: i for i in outside}}
    queries = [_view_query(q, query_copy, untouched, pasted) for q in ds.queries]
    for q in queries:
        x1, y1, x2, y2 = q.bbox
        (out / "gt" / f"{q.name}_query.txt").write_text(f"{q.image} {_fmt(x1)} {_fmt(y1)} {_fmt(x2)} {_fmt(y2)}\n")
        (out / "gt" / f"{q.name}_good.txt").write_text("".join(f"{i}\n" for i in q.ok))
        (out / "gt" / f"{q.name}_ok.txt").write_text("")
        (out / "gt" / f"{q.name}_junk.txt").write_text("".join(f"{i}\n" for i in q.junk))
    images = sorted(ds.images + list(query_copy.values()) + outside)
    paths = {i: out / "jpg" / f"{i}.jpg" for i in images + sorted(qimages)}
    view_ds = Dataset(f"{ds.name}-views", out, images, paths, queries, revisited=ds.revisited)
    save_json(view_ds, out / "dataset.json")
    _copy_attribution(ds.root, out)

    counts = {"views": len(pasted), "query_copies": len(query_copy), "copied": len(ds.images) - len(pasted),
              "distractor_pool": len(pool), "queries": len(queries), "images": len(images)}
    doc = {"source": ds.name, "params": asdict(p), "counts": counts,
           "notes": "views[id]: cut = object box in the source photo; box = pasted box in the view; "
                    "quad = warped corners (TL, TR, BR, BL) in the view",
           "views": views}
    (out / "views.json").write_text(json.dumps(doc, indent=1) + "\n")
    return {"out": str(out), **counts, "seconds": round(time.perf_counter() - t0, 2)}


def _view_query(q: Query, query_copy: dict[str, str], untouched: dict[str, str], pasted: dict[str, Box]) -> Query:
    """The query on the views: its photo (the untouched copy), same positives (now views) with their
    pasted boxes; untouched photos of its own image, positives and junk join its junk."""
    image = query_copy.get(q.image, q.image)
    related = [q.image] + q.ok + q.junk
    junk = list(dict.fromkeys(q.junk + [untouched[i] for i in related if i in untouched]))
    boxes = {i: pasted[i] for i in q.ok if i in pasted}
    return Query(q.name, image, q.bbox, list(q.ok), junk, easy=q.easy, hard=q.hard, boxes=boxes)


def _copy_attribution(src_root: Path, out: Path) -> None:
    for name in _ATTRIBUTION:
        s = src_root / name
        if s.is_dir():
            shutil.copytree(s, out / name)
        elif s.is_file():
            shutil.copyfile(s, out / name)


# ---------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rmac make-views``."""
    parser.add_argument("src", help="source dataset: Oxford folder (gt/ + jpg/), dataset.json, or 'landmarks-dev'")
    parser.add_argument("out", type=new_or_existing_dir,
                        help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--scale-range", type=float_range(0, 1, lo_open=True, hi_open=True), nargs=2,
                        default=(0.05, 0.40), metavar=("MIN", "MAX"),
                        help="area of the pasted object's box as a fraction of the scene (default 0.05 0.40)")
    parser.add_argument("--scene-size", type=int_range(64, 8192), nargs=2, default=(800, 600), metavar=("W", "H"),
                        help="landscape scene size; a third of the scenes are portrait (default 800 600)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in OUT")


def main(args: argparse.Namespace) -> int:
    """Run ``rmac make-views`` from parsed arguments."""
    summary = make_views(args.src, args.out, seed=args.seed, scale_range=tuple(args.scale_range),
                         overwrite=args.overwrite, scene_size=tuple(args.scene_size))
    print(json.dumps(summary, indent=1))
    return 0
