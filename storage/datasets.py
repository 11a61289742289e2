"""Retrieval datasets: Oxford/Paris text ground truth, revisited ground truth, and a JSON form.

Three on-disk forms load into one :class:`Dataset`:

* Oxford5k / Paris6k layout (:func:`load_oxford`): ``ROOT/jpg/<id>.jpg`` and ``ROOT/gt/<q>_query.txt``
  (``<image> x1 y1 x2 y2``), ``<q>_good.txt``, ``<q>_ok.txt``, ``<q>_junk.txt`` (one image id a line).
* Revisited ROxford / RParis (:func:`load_revisited`): ``ROOT/gnd_<name>.pkl`` and ``ROOT/jpg/``. The
  pickle is read by a restricted unpickler that admits only containers and numpy arrays.
* The JSON form (:func:`save_json` / :func:`load_json`), schema in docs/views.md::

    {"name": str, "image_root": str,            # relative to the JSON file's folder, or absolute
     "images": [id, ...],                        # the database, sorted
     "image_paths"?: {id: path},                 # only ids whose file is not image_root/<id>.jpg
     "queries": [{"name", "image", "bbox": [x1, y1, x2, y2], "ok": [id], "junk": [id],
                  "easy"?: [id], "hard"?: [id], "boxes"?: {id: [x1, y1, x2, y2]}}]}

Pixel boxes are ``(x1, y1, x2, y2)`` floats, as in the Oxford ``*_query.txt`` files.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Box", "Query", "Dataset", "DatasetError", "UnsafePickle",
    "load_oxford", "load_revisited", "load_json", "save_json", "load_dataset", "restricted_loads",
]

Box = tuple[float, float, float, float]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_OXFORD_QUERY_PREFIX = "oxc1_"  # Oxford5k's query files name images "oxc1_<id>"; the jpg is "<id>.jpg"


class DatasetError(ValueError):
    """A dataset folder or file is missing something or is inconsistent."""


class UnsafePickle(pickle.UnpicklingError, DatasetError):
    """A pickle asked for a global outside the allow-list of :func:`restricted_loads` (a `DatasetError`
    too: the command line reports it in one line)."""


@dataclass
class Query:
    """One query: an image id, the box of the object in it, and its ground truth (image ids).

    ``ok`` holds every positive (Oxford good + ok; revisited easy + hard), ``junk`` the images removed
    from the ranking. ``easy``/``hard`` are set only for revisited datasets. ``boxes`` maps a positive
    to the box of the object in that image's pixels, where known (e.g. synthesised views).
    """

    name: str
    image: str
    bbox: Box
    ok: list[str]
    junk: list[str]
    easy: list[str] | None = None
    hard: list[str] | None = None
    boxes: dict[str, Box] | None = None


@dataclass
class Dataset:
    """A database (sorted ``images``), its queries, and where every image file is.

    ``image_paths`` covers the database and the query images (revisited queries are not in the
    database). ``root`` is the dataset folder.
    """

    name: str
    root: Path
    images: list[str]
    image_paths: dict[str, Path]
    queries: list[Query]
    revisited: bool = False

    def gnd(self, index_of: Mapping[str, int], strict: bool = False) -> list[dict[str, Any]]:
        """Ground truth as row-index lists, in the form ``rmac.ops.evaluate`` consumes.

        One dict per query: ``ok``, ``junk`` and ``bbx``; revisited datasets add ``easy`` and ``hard``
        (``ok`` = easy + hard, the Medium protocol). Ids absent from ``index_of`` (images that failed to
        load, Paris6k's corrupt files) are dropped, or raise ``KeyError`` when ``strict``.
        """
        def rows(ids: Sequence[str]) -> list[int]:
            if strict:
                return [int(index_of[i]) for i in ids]
            return [int(index_of[i]) for i in ids if i in index_of]

        out = []
        for q in self.queries:
            g: dict[str, Any] = {"ok": rows(q.ok), "junk": rows(q.junk), "bbx": list(q.bbox)}
            if self.revisited:
                g["easy"] = rows(q.easy or [])
                g["hard"] = rows(q.hard or [])
            out.append(g)
        return out

    def unknown_ids(self) -> list[str]:
        """Ids the ground truth names (positives, junk, easy, hard, boxes) that are not database images,
        sorted. A revisited query image is outside the database by design and is not counted."""
        known = set(self.images)
        named: set[str] = set()
        for q in self.queries:
            named.update(q.ok, q.junk, q.easy or [], q.hard or [], q.boxes or {})
        return sorted(named - known)

    def drop_unknown(self) -> None:
        """Remove the `unknown_ids` from every query's ground truth."""
        known = set(self.images)
        for q in self.queries:
            q.ok = [i for i in q.ok if i in known]
            q.junk = [i for i in q.junk if i in known]
            if q.easy is not None:
                q.easy = [i for i in q.easy if i in known]
            if q.hard is not None:
                q.hard = [i for i in q.hard if i in known]
            if q.boxes is not None:
                q.boxes = {i: b for i, b in q.boxes.items() if i in known}

    def query(self, name: str) -> Query:
        """The query called ``name``."""
        for q in self.queries:
            if q.name == name:
                return q
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------- Oxford
def _list_image_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in out:
                raise DatasetError(f"two files share the image id {p.stem!r}: {out[p.stem].name}, {p.name}")
            out[p.stem] = p
    return out


def _read_text(path: Path) -> str:
    """A ground-truth text file as UTF-8; `DatasetError` naming the file when it cannot be."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise DatasetError(f"{path}: unreadable ({e.strerror or e})") from None


def _read_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _number(text: Any, where: str) -> float:
    """A finite float from ground truth, or `DatasetError` saying where the bad value is."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise DatasetError(f"{where}: {text!r} is not a finite number")
    return v


def load_oxford(root: str | os.PathLike) -> Dataset:
    """Load the Oxford5k/Paris6k layout: ``root/jpg/`` (every image there is in the database) and
    ``root/gt/<q>_{query,good,ok,junk}.txt``. Positives are good + ok.

    A query image written ``oxc1_<id>`` (Oxford5k) is read as ``<id>`` when only that file exists.
    Missing ``_good``/``_ok``/``_junk`` files count as empty lists.
    """
    root = Path(root)
    jpg, gt = root / "jpg", root / "gt"
    if not jpg.is_dir() or not gt.is_dir():
        raise DatasetError(f"{root} is not an Oxford-format dataset: it needs gt/ and jpg/ folders")
    paths = _list_image_files(jpg)
    queries = []
    for qfile in sorted(gt.glob("*_query.txt")):
        qname = qfile.name[: -len("_query.txt")]
        fields = _read_text(qfile).split()
        if len(fields) != 5:
            raise DatasetError(f"{qfile}: expected '<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
        image = fields[0]
        if image not in paths and image.startswith(_OXFORD_QUERY_PREFIX):
            image = image[len(_OXFORD_QUERY_PREFIX):]
        if image not in paths:
            raise DatasetError(f"{qfile}: query image {fields[0]!r} is not in {jpg}")
        bbox = tuple(_number(v, str(qfile)) for v in fields[1:])
        ok = _read_ids(gt / f"{qname}_good.txt") + _read_ids(gt / f"{qname}_ok.txt")
        queries.append(Query(qname, image, bbox, ok, _read_ids(gt / f"{qname}_junk.txt")))  # type: ignore[arg-type]
    if not queries:
        raise DatasetError(f"{gt} holds no *_query.txt file")
    return Dataset(root.name, root, sorted(paths), paths, queries)


# ------------------------------------------------------------------------------------------- revisited
def _numpy_global(*candidates: tuple[str, str]) -> Any:
    """The first of ``(module, name)`` that imports: numpy 2 moved ``numpy.core`` to ``numpy._core``."""
    import importlib
    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} is importable")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import builtins

    import numpy as np

    reconstruct = _numpy_global(("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"))
    scalar = _numpy_global(("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"))
    frombuffer = _numpy_global(("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"))
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how protocol 0-2 pickles carry bytes (array buffers)
    }
    for core in ("numpy.core", "numpy._core"):  # pickles name whichever numpy wrote them
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for name in ("set", "frozenset", "list", "dict", "tuple", "bytes", "bytearray", "str", "int", "float",
                 "complex", "bool"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)  # py2 name too
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refusing to unpickle global {module}.{name}: only builtin containers and numpy arrays "
                "are allowed in a ground-truth file") from None


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` admitting only builtin containers/scalars and numpy arrays, dtypes and scalars.

    Any other global (functions, classes, ``os.system``...) raises :class:`UnsafePickle` before it is
    called.
    """
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def _id_list(indices: Any, names: Sequence[str], where: str = "gnd") -> list[str]:
    """Image ids of ``indices`` into ``names``; `DatasetError` for anything but in-range whole numbers
    (a negative index would otherwise silently pick an image from the end)."""
    if indices is None:
        return []
    try:
        items = list(np.asarray(indices).reshape(-1))
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: expected a list of image indices, got {type(indices).__name__}") from None
    out = []
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) and not (
                isinstance(i, (float, np.floating)) and float(i).is_integer()):
            raise DatasetError(f"{where}: image index {i!r} is not a whole number")
        if not 0 <= int(i) < len(names):
            raise DatasetError(f"{where}: image index {int(i)} is out of range (imlist holds {len(names)} images)")
        out.append(names[int(i)])
    return out


def load_revisited(root: str | os.PathLike, name: str) -> Dataset:
    """Load revisited ROxford/RParis: ``root/gnd_<name>.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``
    with per-query ``bbx``, ``easy``, ``hard``, ``junk`` index lists into ``imlist``) and ``root/jpg/``.

    Query images (``qimlist``) are not in the database; their paths are in ``image_paths``. Queries are
    named after their image (``<image>_<k>`` when an image is the query of several).
    """
    root = Path(root)
    pkl = root / f"gnd_{name}.pkl"
    if not pkl.is_file():
        raise DatasetError(f"{pkl} not found (revisited ground truth)")
    try:
        cfg = restricted_loads(pkl.read_bytes())
    except UnsafePickle as e:
        raise UnsafePickle(f"{pkl}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as e:  # what a damaged pickle raises
        raise DatasetError(f"{pkl}: not a readable ground-truth pickle ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{pkl}: expected a dict with imlist, qimlist and gnd")
    for key in ("imlist", "qimlist", "gnd"):
        if not isinstance(cfg[key], (list, tuple, np.ndarray)):
            raise DatasetError(f"{pkl}: {key} is a {type(cfg[key]).__name__}, expected a list")
    imlist = [_name(i, pkl) for i in cfg["imlist"]]
    qimlist = [_name(i, pkl) for i in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(qimlist):
        raise DatasetError(f"{pkl}: {len(cfg['gnd'])} gnd entries for {len(qimlist)} queries")
    queries = []
    repeated = {i for i, n in Counter(qimlist).items() if n > 1}
    for k, (qimage, g) in enumerate(zip(qimlist, cfg["gnd"])):
        where = f"{pkl}: query {k}"
        if not isinstance(g, dict) or "bbx" not in g:
            raise DatasetError(f"{where}: expected a dict with bbx, easy, hard, junk")
        easy, hard = _id_list(g.get("easy"), imlist, where), _id_list(g.get("hard"), imlist, where)
        try:
            bbx = list(np.asarray(g["bbx"]).reshape(-1))
        except (TypeError, ValueError):
            bbx = [g["bbx"]]
        bbox = tuple(_number(v, f"{where} bbx") for v in bbx)
        if len(bbox) != 4:
            raise DatasetError(f"{where}: bbx needs 4 numbers, has {len(bbox)}")
        qname = f"{qimage}_{k}" if qimage in repeated else qimage
        queries.append(Query(qname, qimage, bbox, easy + hard,  # type: ignore[arg-type]
                             _id_list(g.get("junk"), imlist, where), easy=easy, hard=hard))
    paths = {i: root / "jpg" / f"{i}.jpg" for i in imlist + qimlist}
    return Dataset(name, root, sorted(imlist), paths, queries, revisited=True)


def _name(v: Any, where: Path) -> str:
    """An image name from ground truth: text (bytes decoded as UTF-8) without control characters."""
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: image name {v!r} is not UTF-8") from None
    if not isinstance(v, (str, np.str_)):
        raise DatasetError(f"{where}: image name {v!r} is not text")
    v = str(v)
    if not v or any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in v):
        raise DatasetError(f"{where}: image name {v!r} is empty or holds control characters")
    return v


# ------------------------------------------------------------------------------------------------ JSON
def _box(v: Any, where: str = "box") -> Box:
    if not isinstance(v, (list, tuple)):
        raise DatasetError(f"{where}: a box is a list of 4 numbers, got {v!r}")
    b = tuple(_number(x, where) for x in v)
    if len(b) != 4:
        raise DatasetError(f"{where}: a box needs 4 numbers, got {v!r}")
    return b  # type: ignore[return-value]


def save_json(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write ``dataset`` in the JSON form (schema in this module's docstring and docs/views.md).

    ``image_root`` is the folder of the first database image, written relative to the JSON file when
    it lies beneath it; images elsewhere go to ``image_paths``.
    """
    path = Path(path)
    base = path.parent.resolve()
    ids = dataset.images or sorted(dataset.image_paths)
    image_root = Path(dataset.image_paths[ids[0]]).resolve().parent if ids else base
    extra = {}
    for i, p in sorted(dataset.image_paths.items()):
        if Path(p).resolve() != image_root / f"{i}.jpg":
            extra[i] = _rel(Path(p).resolve(), base)
    doc: dict[str, Any] = {"name": dataset.name, "image_root": _rel(image_root, base), "images": list(dataset.images)}
    if extra:
        doc["image_paths"] = extra
    queries = []
    for q in dataset.queries:
        d: dict[str, Any] = {"name": q.name, "image": q.image, "bbox": list(q.bbox), "ok": list(q.ok),
                             "junk": list(q.junk)}
        if q.easy is not None:
            d["easy"] = list(q.easy)
        if q.hard is not None:
            d["hard"] = list(q.hard)
        if q.boxes is not None:
            d["boxes"] = {k: list(v) for k, v in q.boxes.items()}
        queries.append(d)
    doc["queries"] = queries
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix() or "."
    except ValueError:
        return str(p)


def load_json(path: str | os.PathLike) -> Dataset:
    """Read a dataset written by :func:`save_json` (or by hand, same schema)."""
    path = Path(path)
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    for key in ("name", "images", "image_root", "queries"):
        if key not in doc:
            raise DatasetError(f"{path}: missing key {key!r}")
    try:
        return _from_doc(doc, path)
    except (KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong kind
        raise DatasetError(f"{path}: malformed dataset ({type(e).__name__}: {e}); schema in docs/views.md") from None


def _from_doc(doc: dict, path: Path) -> Dataset:
    def names(v: Any, what: str) -> list[str]:
        if not isinstance(v, list):
            raise DatasetError(f"{path}: {what} must be a list of image ids")
        return [_name(i, path) for i in v]

    root = path.parent
    image_root = root / doc["image_root"]
    images = names(doc["images"], "images")
    queries = []
    for k, d in enumerate(doc["queries"]):
        where = f"{path}: query {k}"
        easy = names(d["easy"], f"query {k} easy") if "easy" in d else None
        hard = names(d["hard"], f"query {k} hard") if "hard" in d else None
        ok = names(d["ok"], f"query {k} ok") if "ok" in d else (easy or []) + (hard or [])
        boxes = {_name(b, path): _box(v, f"{where} boxes") for b, v in d["boxes"].items()} if "boxes" in d else None
        queries.append(Query(str(d["name"]), _name(d["image"], path), _box(d["bbox"], f"{where} bbox"), ok,
                             names(d.get("junk", []), f"query {k} junk"), easy=easy, hard=hard, boxes=boxes))
    paths = {i: image_root / f"{i}.jpg" for i in images + [q.image for q in queries]}
    paths.update({str(k): root / v for k, v in doc.get("image_paths", {}).items()})
    revisited = any(q.easy is not None for q in queries)
    return Dataset(str(doc["name"]), root, sorted(images), paths, queries, revisited=revisited)


# -------------------------------------------------------------------------------------------- dispatch
def load_dataset(path_or_name: str | os.PathLike) -> Dataset:
    """Load a dataset from whatever ``path_or_name`` is.

    ``landmarks-dev`` (or ``dev``) → the embedded dev set; ``*.json`` → :func:`load_json`;
    ``gnd_<name>.pkl`` → :func:`load_revisited`; a folder → its ``dataset.json`` if present, else its
    ``gt/`` (Oxford), else its single ``gnd_*.pkl``.
    """
    if str(path_or_name) in ("landmarks-dev", "dev"):
        from rmac.data import LANDMARKS_DEV
        return load_oxford(LANDMARKS_DEV)
    p = Path(path_or_name)
    if p.is_file():
        if p.suffix == ".json":
            return load_json(p)
        if p.suffix == ".pkl" and p.stem.startswith("gnd_"):
            return load_revisited(p.parent, p.stem[len("gnd_"):])
        raise DatasetError(f"{p}: not a dataset file (expected .json or gnd_<name>.pkl)")
    if p.is_dir():
        if (p / "dataset.json").is_file():
            return load_json(p / "dataset.json")
        if (p / "gt").is_dir():
            return load_oxford(p)
        pkls = sorted(p.glob("gnd_*.pkl"))
        if len(pkls) == 1:
            return load_revisited(p, pkls[0].stem[len("gnd_"):])
        raise DatasetError(f"{p}: no dataset.json, gt/ or single gnd_*.pkl inside")
    raise DatasetError(f"{path_or_name}: no such dataset file or folder")
