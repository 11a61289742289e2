"""The on-disk store: image table, MAC vectors, quantised activation maps, whitening, global vectors.

Layout (one folder; see docs/architecture.md)::

    STORE/manifest.json      backbone, max_size, channels, levels, partition size, image count
    STORE/ids.json           ordered image ids and their source paths
    STORE/parts/p000012.json per-partition records, written last by the partition's task (its done marker)
    STORE/arrays/            Zarr v3 group: mac, maps/ (one array of sparse codes per partition, see
                             storage/maps.py), scale, map_hw, image_hw, and after indexing rmac, macw
    STORE/whitening/         Zarr group: mean, proj, eigvals (+ attrs)

Partition ``p`` owns rows ``[p*P, (p+1)*P)`` of every array: each Zarr chunk or shard is written by
exactly one task, so workers never contend. Nothing here is pickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rmac.storage import maps as _maps

# 2: the maps are stored sparse, one array of codes per partition (storage/maps.py); 1 held them dense.
FORMAT_VERSION = 2
VECTOR_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)


class StoreError(RuntimeError):
    """A store is missing, incomplete or incompatible with the request."""


@dataclass(frozen=True)
class StoreConfig:
    """What a store was extracted with; a store never mixes two configurations."""

    backbone: str
    channels: int
    max_size: int
    map_side: int
    levels: int
    partition_size: int
    weights: str = "pretrained"  # "pretrained", "random" (benchmarks only) or a weights file name

    def compatible(self, other: "StoreConfig") -> bool:
        return (self.backbone, self.channels, self.max_size, self.levels, self.weights) == (
            other.backbone, other.channels, other.max_size, other.levels, other.weights)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class Store:
    """A handle on a store folder. Cheap to create; safe to send to Dask workers (it is just a path)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise StoreError(f"{self.path} is not an rmac store (no manifest.json): run `rmac extract` first")
        self.manifest: dict = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {self.manifest.get('format')} is not {FORMAT_VERSION} "
                             "(this rmac stores maps sparse): re-extract it with `rmac extract` into a new --store")
        table = json.loads((self.path / "ids.json").read_text())
        self.ids: list[str] = table["ids"]
        self.paths: list[str] = table["paths"]
        self.config = StoreConfig(**self.manifest["config"])

    def __reduce__(self):  # ship the path, not the open arrays
        return (Store, (str(self.path),))

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, ids: Sequence[str], paths: Sequence[str],
               config: StoreConfig) -> "Store":
        """Create an empty store for ``ids`` (rows in this order)."""
        path = Path(path)
        if (path / "manifest.json").exists():
            raise StoreError(f"{path} already holds a store")
        path.mkdir(parents=True, exist_ok=True)
        n, P, K = len(ids), config.partition_size, config.channels
        group = zarr.open_group(path / "arrays", mode="w")
        rows = max(n, 1)
        group.create_array("mac", shape=(rows, K), chunks=(P, K), dtype="float32", fill_value=0.0,
                           compressors=VECTOR_CODEC)
        _maps.create_maps_group(path / "arrays")
        group.create_array("scale", shape=(rows,), chunks=(P,), dtype="float32", fill_value=0.0)
        group.create_array("map_hw", shape=(rows, 2), chunks=(P, 2), dtype="int32", fill_value=0)
        group.create_array("image_hw", shape=(rows, 2), chunks=(P, 2), dtype="int32", fill_value=0)
        group.create_array("ok", shape=(rows,), chunks=(P,), dtype="bool", fill_value=False)
        _write_json_atomic(path / "ids.json", {"ids": list(ids), "paths": [str(p) for p in paths]})
        (path / "parts").mkdir(exist_ok=True)
        _write_json_atomic(path / "manifest.json", {
            "format": FORMAT_VERSION, "config": config.__dict__, "n_images": n,
        })
        return cls(path)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, ids: Sequence[str], paths: Sequence[str],
                       config: StoreConfig) -> "Store":
        """Open the store at ``path`` if it exists (checking it matches), else create it."""
        if not (Path(path) / "manifest.json").exists():
            return cls.create(path, ids, paths, config)
        store = cls(path)
        if not store.config.compatible(config):
            raise StoreError(
                f"{path} was extracted with {store.config.backbone} ({store.config.weights} weights) at max "
                f"size {store.config.max_size}, {store.config.levels} levels; asked for {config.backbone} "
                f"({config.weights}) at {config.max_size}, {config.levels} levels: use another --store")
        if list(ids) != store.ids:
            raise StoreError(
                f"{path} holds a different image list ({len(store.ids)} images, asked {len(ids)}): "
                "a store is extracted from one list; use another --store for other images")
        return store

    # -- geometry ------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.ids)

    @property
    def n_partitions(self) -> int:
        P = self.config.partition_size
        return (self.n_images + P - 1) // P

    def partition_rows(self, p: int) -> range:
        P = self.config.partition_size
        return range(p * P, min((p + 1) * P, self.n_images))

    def partition_of(self, row: int) -> int:
        return row // self.config.partition_size

    @property
    def arrays(self) -> zarr.Group:
        return zarr.open_group(self.path / "arrays", mode="r+")

    # -- partitions ----------------------------------------------------------------------------
    def _part_file(self, p: int) -> Path:
        return self.path / "parts" / f"p{p:06d}.json"

    def done_partitions(self) -> set[int]:
        return {int(f.stem[1:]) for f in (self.path / "parts").glob("p*.json")}

    def pending_partitions(self) -> list[int]:
        done = self.done_partitions()
        return [p for p in range(self.n_partitions) if p not in done]

    def write_partition(self, p: int, records: list[dict], mac: np.ndarray,
                        maps: Sequence[np.ndarray | None] | np.ndarray, scale: np.ndarray, map_hw: np.ndarray,
                        image_hw: np.ndarray) -> None:
        """Write partition ``p``'s rows, then its record file (the done marker) last.

        ``maps``: the quantised maps of the partition's images, a list of uint8 ``(K, h, w)`` arrays
        (``None`` for a failed image), or a padded ``(n, K, S, S)`` array cropped here to ``map_hw``.
        Only their non-zeros are stored (`storage/maps.py`)."""
        rows = self.partition_rows(p)
        if len(records) != len(rows):
            raise ValueError(f"partition {p}: {len(records)} records for {len(rows)} rows")
        if len(maps) != len(rows):
            raise ValueError(f"partition {p}: {len(maps)} maps for {len(rows)} rows")
        map_hw = np.asarray(map_hw)
        if isinstance(maps, np.ndarray):
            maps = [m[:, :int(h), :int(w)] for m, (h, w) in zip(maps, map_hw)]
        for m, hw in zip(maps, map_hw):
            if (m.shape[1:] if m is not None else (0, 0)) != tuple(int(v) for v in hw):
                raise ValueError(f"partition {p}: a map of shape {m.shape} recorded as {tuple(hw)}")
        sl = slice(rows.start, rows.stop)
        g = self.arrays
        g["mac"][sl] = mac
        _maps.write_partition_maps(self.path / "arrays", p, maps, image_hw, self.config.channels)
        g["scale"][sl] = scale
        g["map_hw"][sl] = map_hw
        g["image_hw"][sl] = image_hw
        g["ok"][sl] = np.array([r["status"] == "done" for r in records], dtype=bool)
        _write_json_atomic(self._part_file(p), records)

    def records(self) -> list[dict]:
        """All finished records, in row order; each carries its ``row``."""
        out: list[dict] = []
        for p in sorted(self.done_partitions()):
            recs = json.loads(self._part_file(p).read_text())
            for row, rec in zip(self.partition_rows(p), recs):
                out.append({"row": row, **rec})
        return out

    def valid_rows(self, rows: range | None = None) -> np.ndarray:
        """Boolean mask over ``rows`` (default: all): extracted successfully."""
        rows = rows if rows is not None else range(self.n_images)
        return self.arrays["ok"][rows.start:rows.stop]

    def require_complete(self) -> None:
        pending = self.pending_partitions()
        if pending:
            raise StoreError(f"{self.path}: extraction unfinished ({len(pending)} of {self.n_partitions} "
                             "partitions pending): re-run `rmac extract` to finish it")

    # -- reading ---------------------------------------------------------------------------------
    def read_maps(self, rows: Iterable[int]) -> list[tuple[np.ndarray, float]]:
        """The quantised maps of ``rows`` as dense uint8 ``(K, h, w)`` (their valid cells), with their
        scales. Each partition's codes are read and decoded once."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        lo, hi = min(rows), max(rows) + 1
        scale = self.arrays["scale"][lo:hi]
        decoded = {p: self.read_sparse(p).maps for p in sorted({self.partition_of(r) for r in rows})}
        P = self.config.partition_size
        return [(decoded[r // P].dense(r - (r // P) * P), float(scale[r - lo])) for r in rows]

    def read_sparse(self, p: int, cache: "_maps.PartitionCache | None" = None) -> _maps.PartitionMaps:
        """Every map of partition ``p`` as `SparseMaps` (map ``i`` is row ``p * P + i``; a failed row is
        0 x 0) with the images' pixel sizes, read in one go and decoded straight into the kernel's form;
        through ``cache`` if given."""
        if cache is not None:
            return cache.get(self.path / "arrays", p)
        return _maps.read_partition(self.path / "arrays", p)

    def map_bytes(self) -> int:
        """Bytes on disk of the stored activation maps (compressed codes and their Zarr metadata)."""
        root = self.path / "arrays" / "maps"
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    # -- whitening -------------------------------------------------------------------------------
    def save_whitening(self, mean: np.ndarray, proj: np.ndarray, eigvals: np.ndarray, attrs: dict) -> None:
        g = zarr.open_group(self.path / "whitening", mode="w")
        g.create_array("mean", data=np.asarray(mean, dtype="float32"))
        g.create_array("proj", data=np.asarray(proj, dtype="float32"))
        g.create_array("eigvals", data=np.asarray(eigvals, dtype="float64"))
        g.attrs.update(attrs)

    def load_whitening(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        if not (self.path / "whitening").exists():
            raise StoreError(f"{self.path} has no whitening: run `rmac index {self.path}` first")
        g = zarr.open_group(self.path / "whitening", mode="r")
        return g["mean"][:], g["proj"][:], g["eigvals"][:], dict(g.attrs)

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        _write_json_atomic(self.path / "manifest.json", self.manifest)
