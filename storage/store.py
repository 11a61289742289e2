"""The on-disk store: image table, MAC vectors, quantised activation maps, whitening, global vectors.

Layout (one folder; see docs/architecture.md)::

    STORE/manifest.json      format 2, configuration, segments (what each growth added), committed index
    STORE/ids/p000012.json   partition 12's image ids, source paths (a task reads only its own)
    STORE/parts/p000012.json partition 12's records + checksums, written last by its task (done marker)
    STORE/arrays/            Zarr v3 group: mac, maps/ (one array of sparse codes per partition, see
                             storage/maps.py), scale, map_hw, image_hw, ok, and after indexing rmac, macw
    STORE/whitening/         Zarr group (attrs: the set's hash ``id``): ``regional/`` learned on regional
                             vectors (R-MAC), ``mac/`` on one MAC per image (MAC filtering); each holds
                             mean, proj, eigvals (+ attrs, with its content hash ``id``)
    STORE/index/             FAISS shards (storage/index.py) and per-partition vector checksums
    STORE/runs.jsonl         one line per extract / index run
    STORE/lock               the writer lock (storage/lock.py)

Partition ``p`` owns rows ``[p*P, p*P + n_p)`` of every array (``n_p <= P``; a store that grew has a
partly filled partition before each growth, whose remaining rows stay empty): each Zarr chunk or shard
is written by exactly one task, so workers never contend. Nothing here is pickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from rmac.storage import checksums, ids as id_tables
from rmac.storage import maps as _maps

# 2: growing stores with checksums, the maps stored sparse, one array of codes per partition
# (storage/maps.py), and two whitenings (regional, mac); 1 held the maps dense and padded, one whitening.
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
    """Write JSON so that a reader sees the old file or the whole new one, never a torn one; fsync'd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Arrays written by `rmac index`, not by extraction (their checksums live with the index).
INDEX_ARRAYS = ("rmac", "macw")
RUN_LOG = "runs.jsonl"


class Store:
    """A handle on a store folder. Cheap to create; safe to send to Dask workers (it is just a path).

    Opening reads only ``manifest.json``; the whole id table (``ids``, ``paths``) is read on first use,
    which the client does and tasks do not (they use `partition_ids`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise StoreError(f"{self.path} is not an rmac store (no manifest.json): run `rmac extract` first")
        try:
            self.manifest: dict = json.loads(manifest.read_text())
        except ValueError as e:
            raise StoreError(f"{manifest} is not valid JSON ({e}): the store is damaged") from None
        if self.manifest.get("format") == FORMAT_VERSION and \
                self.manifest.get("checksum") != _manifest_checksum(self.manifest):
            raise StoreError(f"{manifest} does not match its checksum (edited or damaged): "
                             "run `rmac verify` on the store")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format {self.manifest.get('format')} is not {FORMAT_VERSION}: this version "
                "of rmac cannot read it (it stores the maps sparse, two whitenings): re-extract the images into a new "
                "--store (`rmac extract`), then `rmac index` it")
        try:
            self.config = StoreConfig(**self.manifest["config"])
            self.segments: list[list[int]] = [[int(a), int(b)] for a, b in self.manifest["segments"]]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{manifest} is damaged ({type(e).__name__}: {e})") from None
        self._table: tuple[list, list] | None = None

    def reload(self) -> None:
        """Read the manifest again (another process may have changed the store)."""
        self.__init__(self.path)

    def __reduce__(self):  # ship the path, not the open arrays
        return (Store, (str(self.path),))

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create_empty(cls, path: str | os.PathLike, config: StoreConfig) -> "Store":
        """Create a store holding no image, atomically: it is built in a temporary folder beside
        ``path`` and renamed into place. When another process created it first, that store is opened
        (and must match ``config``)."""
        path = Path(path)
        if (path / "manifest.json").exists():
            return cls.open_matching(path, config)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path} exists and is not an rmac store: choose another --store")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.creating-"))
        try:
            P, K, S = config.partition_size, config.channels, config.map_side
            group = zarr.open_group(tmp / "arrays", mode="w")
            rows = 0
            group.create_array("mac", shape=(rows, K), chunks=(P, K), dtype="float32", fill_value=0.0,
                               compressors=VECTOR_CODEC)
            _maps.create_maps_group(tmp / "arrays")
            group.create_array("scale", shape=(rows,), chunks=(P,), dtype="float32", fill_value=0.0)
            group.create_array("map_hw", shape=(rows, 2), chunks=(P, 2), dtype="int32", fill_value=0)
            group.create_array("image_hw", shape=(rows, 2), chunks=(P, 2), dtype="int32", fill_value=0)
            group.create_array("ok", shape=(rows,), chunks=(P,), dtype="bool", fill_value=False)
            for sub in ("parts", id_tables.FOLDER):
                (tmp / sub).mkdir()
            _write_json_atomic(tmp / "manifest.json", _with_checksum({
                "format": FORMAT_VERSION, "config": config.__dict__, "n_images": 0, "segments": [],
            }))
            try:
                os.rename(tmp, path)  # replaces a missing or empty folder; fails if another won the race
            except OSError:
                if not (path / "manifest.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open_matching(path, config)

    @classmethod
    def create(cls, path: str | os.PathLike, ids: Sequence[str], paths: Sequence[str],
               config: StoreConfig) -> "Store":
        """Create a store for ``ids`` (rows in this order)."""
        if (Path(path) / "manifest.json").exists():
            raise StoreError(f"{path} already holds a store")
        store = cls.create_empty(path, config)
        store.append(ids, paths)
        return cls(path)

    @classmethod
    def open_matching(cls, path: str | os.PathLike, config: StoreConfig) -> "Store":
        """Open the store at ``path``, refusing one extracted with another configuration."""
        store = cls(path)
        if not store.config.compatible(config):
            raise StoreError(
                f"{path} was extracted with {store.config.backbone} ({store.config.weights} weights) at max "
                f"size {store.config.max_size}, {store.config.levels} levels; asked for {config.backbone} "
                f"({config.weights}) at {config.max_size}, {config.levels} levels: use another --store")
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, ids: Sequence[str], paths: Sequence[str],
                       config: StoreConfig) -> "Store":
        """Open (or create) the store at ``path`` and append the ``ids`` it does not hold yet.
        The caller holds the store's lock (storage/lock.py) when other writers may run."""
        store = cls.create_empty(path, config)
        held = set(i for i in store.ids if i is not None)
        new = [(i, p) for i, p in zip(ids, paths) if i not in held]
        if new:
            store.append(*zip(*new))
            store = cls(path)
        return store

    def append(self, ids: Sequence[str], paths: Sequence[str]) -> list[int]:
        """Add ``ids`` as new partitions after the last one (existing rows never move). The id tables
        and resized arrays are written first, the manifest (the commit) last: a kill in between leaves
        the store as it was. Returns the new partitions."""
        ids, paths = list(ids), [str(p) for p in paths]
        if not ids:
            return []
        P = self.config.partition_size
        first = self.n_partitions
        news = []
        for k, start in enumerate(range(0, len(ids), P)):
            id_tables.write_table(self.path, first + k, ids[start:start + P], paths[start:start + P])
            news.append(first + k)
        rows = (first + len(news) - 1) * P + (len(ids) - (len(news) - 1) * P)
        g = self.arrays
        for name in g.array_keys():  # row arrays chunked by partition (a killed append may have grown some)
            a = g[name]
            if name not in INDEX_ARRAYS and a.ndim and a.shape[0] >= self.n_images and (a.shards or a.chunks)[0] == P:
                a.resize((rows, *a.shape[1:]))
        segments = self.segments + [[first, len(ids)]]
        self.update_manifest(segments=segments, n_images=sum(n for _, n in segments))
        self.segments, self._table = segments, None
        return news

    # -- geometry ------------------------------------------------------------------------------
    def partition_count(self, p: int) -> int:
        """How many images partition ``p`` holds (``<= partition_size``)."""
        P = self.config.partition_size
        for first, n in reversed(self.segments):
            if p >= first:
                return max(0, min(P, n - (p - first) * P))
        return 0

    @property
    def n_partitions(self) -> int:
        if not self.segments:
            return 0
        P = self.config.partition_size
        first, n = self.segments[-1]
        return first + (n + P - 1) // P

    @property
    def n_images(self) -> int:
        """Rows of every array (the row numbers' range); rows past a partly filled partition's images
        are empty and never valid. `n_held` counts the images."""
        if not self.segments:
            return 0
        p = self.n_partitions - 1
        return p * self.config.partition_size + self.partition_count(p)

    @property
    def n_held(self) -> int:
        return sum(n for _, n in self.segments)

    def partition_rows(self, p: int) -> range:
        P = self.config.partition_size
        return range(p * P, p * P + self.partition_count(p))

    def partition_of(self, row: int) -> int:
        return row // self.config.partition_size

    @property
    def arrays(self) -> zarr.Group:
        return zarr.open_group(self.path / "arrays", mode="r+")

    # -- ids -------------------------------------------------------------------------------------
    def partition_ids(self, p: int) -> tuple[list[str], list[str]]:
        """(ids, paths) of partition ``p``'s images: one small file."""
        try:
            return id_tables.read_table(self.path, p)
        except (OSError, ValueError, KeyError) as e:
            raise StoreError(f"{self.path}: id table of partition {p} is missing or damaged ({e}): "
                             "run `rmac verify` on the store") from None

    def _load_table(self) -> tuple[list, list]:
        if self._table is None:
            ids: list = [None] * self.n_images
            paths: list = [None] * self.n_images
            for p in range(self.n_partitions):
                rows = self.partition_rows(p)
                pi, pp = self.partition_ids(p)
                ids[rows.start:rows.stop], paths[rows.start:rows.stop] = pi, pp
            self._table = (ids, paths)
        return self._table

    @property
    def ids(self) -> list:
        """Id of every row (None for an empty row); reads every partition's table once."""
        return self._load_table()[0]

    @property
    def paths(self) -> list:
        return self._load_table()[1]

    # -- partitions ----------------------------------------------------------------------------
    def _part_file(self, p: int) -> Path:
        return self.path / "parts" / f"p{p:06d}.json"

    def done_partitions(self) -> set[int]:
        return {int(f.stem[1:]) for f in (self.path / "parts").glob("p*.json")}

    def pending_partitions(self) -> list[int]:
        done = self.done_partitions()
        return [p for p in range(self.n_partitions) if p not in done]

    def forget_partitions(self, parts: Iterable[int]) -> None:
        """Mark partitions pending again (their record files removed) so that extraction redoes them.
        Bumps the manifest's ``revision`` first: an index built before no longer matches the rows."""
        parts = list(parts)
        if not parts:
            return
        self.update_manifest(revision=int(self.manifest.get("revision", 0)) + 1)
        (self.path / "parts" / "redo").mkdir(exist_ok=True)
        for p in parts:
            if self._part_file(p).exists():  # kept aside: the redo reuses the rows that did not change
                os.replace(self._part_file(p), self._redo_file(p))

    def _redo_file(self, p: int) -> Path:
        return self.path / "parts" / "redo" / f"p{p:06d}.json"

    def redo_records(self, p: int) -> list[dict] | None:
        """The records partition ``p`` had before it was marked for a redo (None: not a redo)."""
        try:
            return json.loads(self._redo_file(p).read_text())["records"]
        except (OSError, ValueError, KeyError):
            return None

    def clear_redo(self, p: int) -> None:
        self._redo_file(p).unlink(missing_ok=True)

    def write_partition(self, p: int, records: list[dict], mac: np.ndarray,
                        maps: Sequence[np.ndarray | None] | np.ndarray, scale: np.ndarray, map_hw: np.ndarray,
                        image_hw: np.ndarray) -> None:
        """Write partition ``p``'s rows, then its record file (the done marker, with the checksums of
        what was written) last.

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
        with zarr.config.set({"array.write_empty_chunks": True}):  # a missing file must mean damage
            g["mac"][sl] = mac
            _maps.write_partition_maps(self.path / "arrays", p, maps, image_hw, self.config.channels)
            g["scale"][sl] = scale
            g["map_hw"][sl] = map_hw
            g["image_hw"][sl] = image_hw
            g["ok"][sl] = np.array([r["status"] == "done" for r in records], dtype=bool)
        self.write_record(p, records)

    def write_record(self, p: int, records: list[dict]) -> None:
        """The done marker of partition ``p``: its records and a checksum of each of its arrays' rows,
        read back from the store (so the sum covers what is really there, whatever arrays it has)."""
        rows = self.partition_rows(p)
        g = self.arrays
        names = checksums.row_arrays(g, self.n_images, exclude=INDEX_ARRAYS)
        sums = checksums.digest_each_row(g, rows.start, rows.stop, names)
        maps_sum = _maps.codes_digest(self.path / "arrays", p)  # the sparse codes: one array per partition
        _write_json_atomic(self._part_file(p), {"records": records, "row_checksums": sums, "maps_checksum": maps_sum})

    def partition_problems(self, p: int, read_data: bool = True) -> list[str]:
        """What is wrong with finished partition ``p``: its record vs its id table, chunk files missing,
        and (``read_data``) each array's rows vs the checksum recorded at extraction."""
        return self._partition_check(p, read_data)[0]

    def _partition_check(self, p: int, read_data: bool) -> tuple[list[str], _maps.SparseMaps | None]:
        """`partition_problems`, and the partition's maps as the check decoded them (None where it did not)."""
        out = []
        try:
            doc = self.partition_doc(p)
            ids, _ = self.partition_ids(p)
        except StoreError as e:
            return [str(e)], None
        rows = self.partition_rows(p)
        if [r.get("id") for r in doc["records"]] != ids or len(ids) != len(rows):
            out.append(f"partition {p}: record holds {len(doc['records'])} images, the id table {len(ids)}, "
                       f"the manifest {len(rows)}")
        out += [f"partition {p}: chunk missing: arrays/{m}" for m in self.missing_chunks(rows.start, rows.stop)]
        if not _maps.chunk_file(self.path / "arrays", p).is_file():
            out.append(f"partition {p}: chunk missing: arrays/maps/{_maps.partition_name(p)}/c/0")
        maps = None
        if read_data and not out:
            out += self.row_problems(p, rows.start, rows.stop, doc=doc)
            problems, maps = self._maps_check(p, doc)
            out += problems
        return out, (maps if not out else None)

    def maps_problems(self, p: int, doc: dict | None = None) -> list[str]:
        """Partition ``p``'s sparse map codes read back, decoded and compared with its record's checksum."""
        return self._maps_check(p, doc)[0]

    def _maps_check(self, p: int, doc: dict | None) -> tuple[list[str], _maps.SparseMaps | None]:
        doc = doc if doc is not None else self.partition_doc(p)
        name = f"arrays/maps/{_maps.partition_name(p)}"
        try:
            maps = _maps.read_partition(self.path / "arrays", p).maps
            got = _maps.codes_digest(self.path / "arrays", p)
        except Exception as e:  # a truncated / corrupt chunk: any codec error
            return [f"partition {p}: {name} unreadable ({type(e).__name__}: {e})"], None
        if "maps_checksum" not in doc:
            return [f"partition {p}: no checksum recorded for {name}"], None
        if got != doc["maps_checksum"]:
            return [f"partition {p}: {name} does not match its checksum"], None
        return [], maps

    def row_problems(self, p: int, start: int, stop: int, names: Iterable[str] | None = None,
                     doc: dict | None = None, data: dict[str, np.ndarray] | None = None) -> list[str]:
        """Rows ``[start, stop)`` of partition ``p`` read back (or given as ``data``, name -> rows) and
        compared with the per-row checksums its record holds; each mismatch names the image."""
        doc = doc if doc is not None else self.partition_doc(p)
        sums = doc.get("row_checksums", {})
        first = self.partition_rows(p).start
        g = self.arrays
        names = list(names) if names is not None else checksums.row_arrays(g, self.n_images, exclude=INDEX_ARRAYS)
        out = []
        for name in names:
            if name not in sums:
                out.append(f"partition {p}: no checksum recorded for arrays/{name}")
                continue
            try:
                block = data[name] if data is not None else g[name][start:stop]
            except Exception as e:  # a truncated / corrupt chunk file: any codec error
                out.append(f"partition {p}: arrays/{name} unreadable ({type(e).__name__}: {e})")
                continue
            for r, row in zip(range(start, stop), block):
                if checksums.digest(row) != sums[name][r - first]:
                    out.append(f"partition {p}: arrays/{name} row {r} "
                               f"({doc['records'][r - first].get('id')}) does not match its checksum")
        return out

    def verify_partition(self, p: int) -> _maps.SparseMaps:
        """Refuse a damaged partition (StoreError naming what is wrong); return its maps as the check
        decoded them, for a caller that reads them next (`read_sparse_rows(..., decoded=)`)."""
        problems, maps = self._partition_check(p, True)
        if problems:
            raise StoreError(f"{self.path}: {problems[0]}{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}"
                             f": the store is damaged; run `rmac verify {self.path}`")
        return maps

    def partition_doc(self, p: int) -> dict:
        """The record file of partition ``p``: ``{"records": [...], "row_checksums": {array: [sha per row]}}``."""
        try:
            doc = json.loads(self._part_file(p).read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
                raise ValueError("not a record file")
            return doc
        except (OSError, ValueError) as e:
            raise StoreError(f"{self._part_file(p)}: unreadable record file ({e}): run `rmac verify`") from None

    def partition_digest(self, p: int) -> str:
        """Hash of partition ``p``'s record file: what an index built from it records."""
        return checksums.digest_bytes(self._part_file(p).read_bytes())

    def records(self) -> list[dict]:
        """All finished records, in row order; each carries its ``row``."""
        out: list[dict] = []
        for p in sorted(self.done_partitions()):
            for row, rec in zip(self.partition_rows(p), self.partition_doc(p)["records"]):
                out.append({"row": row, **rec})
        return out

    def valid_rows(self, rows: range | None = None) -> np.ndarray:
        """Boolean mask over ``rows`` (default: all): extracted successfully."""
        rows = rows if rows is not None else range(self.n_images)
        self.require_chunks(rows.start, rows.stop, names=("ok",))
        return self.arrays["ok"][rows.start:rows.stop]

    def require_complete(self) -> None:
        pending = self.pending_partitions()
        if pending:
            raise StoreError(f"{self.path}: extraction unfinished ({len(pending)} of {self.n_partitions} "
                             "partitions pending): re-run `rmac extract` to finish it")

    def missing_chunks(self, start: int, stop: int, names: Iterable[str] | None = None,
                       exclude: Iterable[str] = INDEX_ARRAYS) -> list[str]:
        """Chunk files of rows ``[start, stop)`` that should exist and do not (see storage/checksums.py)."""
        return checksums.missing_chunks(self.path / "arrays", start, stop, names, exclude, self.n_images)

    def missing_partition_chunks(self, partitions: Iterable[int]) -> list[str]:
        """`missing_chunks` of whole partitions, the arrays' layout looked up once (a query's short-list
        touches up to one partition per row)."""
        ranges = [(r.start, r.stop) for r in map(self.partition_rows, partitions)]
        return checksums.missing_chunks_in(self.path / "arrays", ranges, None, INDEX_ARRAYS, self.n_images)

    def require_chunks(self, start: int, stop: int, names: Iterable[str] | None = None,
                       exclude: Iterable[str] = INDEX_ARRAYS) -> None:
        """Refuse to read rows whose data files are gone (Zarr would read them as zeros)."""
        if stop <= start:
            return
        ranges = []
        for p in range(self.partition_of(start), self.partition_of(stop - 1) + 1):
            # pending partitions hold no data yet: nothing to miss. One stat per partition of the range, not a
            # listing of all of them (at 1M that listing was 80 ms a call, once per partition indexed)
            if self._part_file(p).is_file():
                rows = self.partition_rows(p)
                ranges.append((max(start, rows.start), min(stop, rows.stop)))
        missing = checksums.missing_chunks_in(self.path / "arrays", ranges, names, exclude, self.n_images)
        if missing:
            raise StoreError(f"{self.path}: data missing ({', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}): the store is damaged; "
                             f"run `rmac verify {self.path}`")

    # -- run log ---------------------------------------------------------------------------------
    def log_run(self, entry: dict) -> None:
        """Append one JSON line to the run log (``runs.jsonl``), fsync'd."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry})
        with open(self.path / RUN_LOG, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def runs(self) -> list[dict]:
        """Every run logged (a torn last line, from a kill, is skipped)."""
        out = []
        try:
            lines = (self.path / RUN_LOG).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # -- reading ---------------------------------------------------------------------------------
    def read_maps(self, rows: Iterable[int]) -> list[tuple[np.ndarray, float]]:
        """The quantised maps of ``rows`` as dense uint8 ``(K, h, w)`` (their valid cells), with their
        scales. Each partition's codes are read and decoded once."""
        return [(maps.dense(i), scale) for maps, i, scale in self.read_sparse_rows(rows)]

    def read_sparse_rows(self, rows: Iterable[int], decoded: dict[int, _maps.SparseMaps] | None = None
                         ) -> list[tuple[_maps.SparseMaps, int, float]]:
        """Per row of ``rows``: its partition's `SparseMaps`, the row's map number in them and its scale.
        Each partition's codes are read and decoded once (not at all where ``decoded`` has its maps, e.g.
        from `verify_partition`); the rows' data files must be there and their scales match the record."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        lo, hi = min(rows), max(rows) + 1
        self.require_chunks(lo, hi)
        scale = self.read_checked(lo, hi, ("scale",))["scale"]  # checked against the record
        given = decoded or {}
        maps = {p: given[p] if p in given else self.read_sparse(p).maps
                for p in sorted({self.partition_of(r) for r in rows})}
        first = {p: self.partition_rows(p).start for p in maps}
        return [(maps[p], r - first[p], float(scale[r - lo]))
                for r, p in ((r, self.partition_of(r)) for r in rows)]

    def prefetch_maps(self, wanted: dict[int, np.ndarray | None]) -> None:
        """Start reading, all at once, the maps about to be read: partition -> offsets in it (None: all)
        (`rmac.storage.maps.prefetch`; hints only)."""
        _maps.prefetch(self.path / "arrays", wanted)

    def read_sparse_many(self, wanted: dict[int, np.ndarray]) -> _maps.PartitionMaps:
        """The maps ``wanted`` (partition -> offsets in it) as one `PartitionMaps`, partition by partition
        in the order of ``wanted``, each in its offsets' order: decoded all together (`maps.read_many`);
        where that fails, or a partition is stored otherwise, read partition by partition with
        `read_sparse` (whose errors name the partition)."""
        from rmac.ops.integral import take_maps

        if not wanted:
            raise ValueError("no maps wanted")
        try:
            many = _maps.read_many(self.path / "arrays", wanted)
        except Exception:  # noqa: BLE001  (damage, a bad offset: the reads below say which and where)
            many = None
        if many is not None:
            return many
        parts = [self.read_sparse(p, select=sel) for p, sel in wanted.items()]
        return _maps.PartitionMaps(take_maps([(pm.maps, np.arange(len(pm.image_hw))) for pm in parts]),
                                   np.concatenate([pm.image_hw for pm in parts]))

    def read_sparse(self, p: int, cache: "_maps.PartitionCache | None" = None,
                    select: np.ndarray | None = None) -> _maps.PartitionMaps:
        """Every map of partition ``p`` as `SparseMaps` (map ``i`` is row ``partition_rows(p)[i]``; a
        failed row is 0 x 0) with the images' pixel sizes, read in one go and decoded straight into the
        kernel's form; through ``cache`` if given. ``select``: only these maps (offsets in the partition),
        in that order, decoded alone (not cached); an offset outside the partition is the caller's
        ValueError, not damage."""
        if select is not None:
            select = np.asarray(select, dtype=np.int64).reshape(-1)
            n = len(self.partition_rows(p))
            if select.size and (select.min() < 0 or select.max() >= n):
                raise ValueError(f"select: offsets {select.min()}..{select.max()} outside partition {p}'s {n} images")
        try:
            if select is not None:
                return _maps.read_partition(self.path / "arrays", p, select)
            if cache is not None:
                return cache.get(self.path / "arrays", p)
            return _maps.read_partition(self.path / "arrays", p)
        except _maps.UnknownEncoding as e:  # not damage: a newer rmac wrote it
            raise StoreError(str(e)) from None
        except Exception as e:  # missing, truncated or corrupt codes: any codec error
            raise StoreError(f"{self.path}: maps of partition {p} unreadable ({type(e).__name__}: {e}): the store "
                             f"is damaged; run `rmac verify {self.path}`") from None

    def read_checked(self, start: int, stop: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of the named arrays, checked against the per-row checksums of their
        partitions' records: damaged data raises StoreError instead of being used."""
        g = self.arrays
        try:
            data = {name: g[name][start:stop] for name in names}
        except Exception as e:  # a truncated or corrupt chunk: Zarr's codecs raise various errors
            raise StoreError(f"{self.path}: rows {start}..{stop} unreadable ({type(e).__name__}: {e}): the "
                             f"store is damaged; run `rmac verify {self.path}`") from None
        for p in range(self.partition_of(start), self.partition_of(stop - 1) + 1):
            r = self.partition_rows(p)
            a, b = max(start, r.start), min(stop, r.stop)
            if a >= b:
                continue
            problems = self.row_problems(p, a, b, names, data={k: v[a - start:b - start] for k, v in data.items()})
            if problems:
                raise StoreError(f"{self.path}: {problems[0]}: the store is damaged; run `rmac verify {self.path}`")
        return data

    def map_bytes(self) -> int:
        """Bytes on disk of the stored activation maps (compressed codes and their Zarr metadata)."""
        root = self.path / "arrays" / "maps"
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    # -- whitening -------------------------------------------------------------------------------
    def save_whitening(self, whitenings: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, dict]],
                       aside: bool = False) -> str:
        """Save the whitenings (``{"regional": (mean, proj, eigvals, attrs), "mac": ...}``) as
        ``whitening/<kind>``, replacing the previous set as a whole (written beside, then renamed).
        Returns the set's id, a hash of every array, that the index records and readers check.
        ``aside``: leave it beside (``.whitening.<id>``) for `install_whitening` once an index commits."""
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".whitening.new-"))
        root = zarr.open_group(tmp, mode="w")
        kind_ids = {}
        for kind, (mean, proj, eigvals, attrs) in whitenings.items():
            arrays = _whitening_arrays(mean, proj, eigvals)
            kind_ids[kind] = whitening_id(**arrays)
            g = root.create_group(kind)
            for name, a in arrays.items():
                g.create_array(name, data=a)
            g.attrs.update({**attrs, "id": kind_ids[kind]})
        wid = _set_id(kind_ids)
        root.attrs.update({"id": wid, "kinds": kind_ids})
        staged = self.path / f".whitening.{wid}"
        shutil.rmtree(staged, ignore_errors=True)
        os.rename(tmp, staged)
        if not aside:
            self.install_whitening(wid)
        return wid

    def install_whitening(self, wid: str) -> None:
        """Put the staged whitening ``wid`` in place of the current one (idempotent; a kill between the
        two renames leaves no ``whitening/``, which the next run's roll-forward repairs)."""
        staged = self.path / f".whitening.{wid}"
        if not staged.exists():
            return
        final, old = self.path / "whitening", self.path / f".whitening.old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)

    def load_whitening(self, kind: str = "regional") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """One saved whitening (``regional`` or ``mac``), checked against its hash (a missing or changed
        chunk is refused); its attrs carry the set's ``id`` (what the index records) and its own ``kind_id``."""
        folder = self.path / "whitening"
        if not (folder / kind).exists():
            raise StoreError(f"{self.path} has no {kind} whitening: run `rmac index {self.path}` first")
        root = zarr.open_group(folder, mode="r")
        g = root[kind]
        attrs = dict(g.attrs)
        try:
            missing = [n for n in ("mean", "proj", "eigvals")
                       if checksums.missing_chunks(folder / kind, 0, 1 << 62, names=[n])]
            if missing:
                raise StoreError(f"{self.path}: whitening/{kind}/{', '.join(missing)} data missing: "
                                 f"run `rmac index {self.path} --refit`")
            mean, proj, eigvals = g["mean"][:], g["proj"][:], g["eigvals"][:]
        except KeyError as e:
            raise StoreError(f"{self.path}/whitening/{kind}: array {e} missing") from None
        kind_ids = dict(root.attrs.get("kinds", {}))
        if attrs.get("id") != whitening_id(mean, proj, eigvals) or kind_ids.get(kind) != attrs.get("id") \
                or root.attrs.get("id") != _set_id(kind_ids):
            raise StoreError(f"{self.path}/whitening/{kind} does not match its checksum (damaged or half-written): "
                             f"run `rmac index {self.path} --refit`")
        return mean, proj, eigvals, {**attrs, "kind_id": attrs["id"], "id": root.attrs["id"]}

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        _write_json_atomic(self.path / "manifest.json", _with_checksum(self.manifest))


def whitening_id(mean: np.ndarray, proj: np.ndarray, eigvals: np.ndarray) -> str:
    """Content hash of a whitening (what an index records it was built with)."""
    return checksums.digest_bytes("".join(checksums.digest(np.asarray(a)) for a in (mean, proj, eigvals)).encode())


def _whitening_arrays(mean, proj, eigvals) -> dict[str, np.ndarray]:
    return {"mean": np.asarray(mean, dtype="float32"), "proj": np.asarray(proj, dtype="float32"),
            "eigvals": np.asarray(eigvals, dtype="float64")}


def whitening_set_id(whitenings: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> str:
    """The id `Store.save_whitening` gives this set (``{kind: (mean, proj, eigvals)}``), without saving it."""
    return _set_id({kind: whitening_id(**_whitening_arrays(*arrays)) for kind, arrays in whitenings.items()})


def _set_id(kind_ids: dict[str, str]) -> str:
    """The id of a set of whitenings: a hash of each one's content hash."""
    return checksums.digest_bytes(json.dumps(kind_ids, sort_keys=True).encode())


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return checksums.digest_bytes(json.dumps(body, sort_keys=True).encode())


def _with_checksum(manifest: dict) -> dict:
    """The manifest carries a hash of the rest of it: a hand edit or a torn copy is refused."""
    manifest["checksum"] = _manifest_checksum(manifest)
    return manifest
