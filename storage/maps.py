"""The stored form of the quantised activation maps: per partition, only each image's valid cells and
only its non-zeros (store format 2).

One Zarr array per partition, ``arrays/maps/p000123``: 1-D uint8, one zstd-compressed chunk, holding

    [positions of image 0][positions of image 1]...[levels of image 0][levels of image 1]...

An image's non-zeros are taken in the order of its ``(K, h, w)`` map (channel-major, then row-major
cells; ``h x w`` the valid cells only). Positions are delta-coded: the gap to the previous non-zero's
flat index, minus one, as an LEB128 varint (7 bits a byte, so most gaps take one byte; a silent channel
is just a longer gap). Levels are one byte each (``1..levels``). The array's attributes say where each
image's part is: ``map_hw`` ``[[h, w], ...]``, ``nnz`` (non-zeros per image), ``gap_bytes`` (bytes of
its positions), ``channels`` K; and ``image_hw`` (a copy of the rows of the ``image_hw`` array, written in
the same call) so that one read gives a re-ranking task all it needs, pixel boxes included. A failed
image has ``h = w = nnz = 0``.

Measured on the 186 dev photos (EfficientNet-Lite0, 1024 px, 31 levels; `docs/benchmarks.md`, issue 9):
13.3 kB per image (the dense padded shards took 22.7 kB); cell-major order, or channel/cell indices
instead of gaps, compress 20-45 % worse.

Decoding (`decode_partition`, numba) goes straight to `rmac.ops.integral.SparseMaps`, the form the
re-ranking kernel reads (non-zeros sorted by cell, compact channel ids): two passes over the varints,
the second placing each non-zero at its cell's cursor. No dense or padded intermediate.

Writers call `write_partition_maps(arrays_path, p, maps, image_hw)` with the quantised maps of the
partition's images (a list of uint8 ``(K, h, w)``, ``None`` or a ``(K, 0, 0)`` array for a failed image)
and their image sizes; `rmac.storage.store.Store.write_partition` does. Readers: `read_partition(arrays_path,
p)` -> `PartitionMaps`; `PartitionCache` keeps decoded partitions per worker process.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import zarr
from numba import njit
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from rmac.ops.integral import SparseMaps

# zstd 9: 13.3 kB per dev image against 14.1 kB at level 3 and 12.7 at 19 (whose encoding takes ~0.3 s per
# partition); decoding speed does not depend on the level.
CODES_CODEC = ZstdCodec(level=9)
_ZSTD = Zstd()  # decoding only: the level is the writer's
ENCODING = "channel-major LEB128 gaps, then uint8 levels"


class PartitionMaps(NamedTuple):
    """A decoded partition: its maps and the images' sizes ``(n, 2)`` ``(H, W)`` in pixels."""

    maps: SparseMaps
    image_hw: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.maps.nbytes + self.image_hw.nbytes


class CorruptMaps(ValueError):
    """Stored map codes that do not decode to the map sizes their attributes give."""


def partition_name(p: int) -> str:
    return f"p{p:06d}"


# ---------------------------------------------------------------------------------------------
# encoding


def _varint(g: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative int64 ``g`` (7 bits a byte, least significant first)."""
    n = np.ones(len(g), np.int64)
    for b in (7, 14, 21, 28, 35, 42, 49, 56):
        n += g >= (1 << b)
    out = np.empty(int(n.sum()), np.uint8)
    at = np.cumsum(n) - n
    v = g.copy()
    for b in range(int(n.max(initial=0))):
        m = n > b
        more = n[m] > b + 1
        out[at[m] + b] = ((v[m] & 127) | np.where(more, 128, 0)).astype(np.uint8)
        v >>= 7
    return out


def encode_maps(maps: Sequence[np.ndarray | None], channels: int | None = None) -> tuple[np.ndarray, dict]:
    """The partition buffer (uint8) and its attributes for quantised maps ``(K, h, w)`` (None: failed);
    ``channels`` K (default: the maps')."""
    K = int(channels) if channels is not None else next((int(m.shape[0]) for m in maps if m is not None), 0)
    gaps, levels, hw, nnz, nbytes = [], [], [], [], []
    for m in maps:
        if m is not None and (np.ndim(m) != 3 or m.shape[0] != K):
            raise ValueError(f"expected uint8 maps (K={K}, h, w), got {m.dtype} {m.shape}")
        if m is None or m.size == 0:
            hw.append([0, 0])
            nnz.append(0)
            nbytes.append(0)
            continue
        m = np.asarray(m)
        if m.ndim != 3 or m.dtype != np.uint8 or m.shape[0] != K:
            raise ValueError(f"expected uint8 maps (K={K}, h, w), got {m.dtype} {m.shape}")
        flat = np.ascontiguousarray(m).reshape(-1)
        idx = np.flatnonzero(flat)
        g = _varint(np.diff(idx, prepend=-1) - 1)
        gaps.append(g)
        levels.append(flat[idx])
        hw.append([int(m.shape[1]), int(m.shape[2])])
        nnz.append(int(idx.size))
        nbytes.append(int(g.size))
    buf = np.concatenate(gaps + levels) if gaps else np.zeros(0, np.uint8)
    attrs = {"encoding": ENCODING, "channels": K, "map_hw": hw, "nnz": nnz, "gap_bytes": nbytes,
             "length": int(buf.size)}
    return buf.astype(np.uint8, copy=False), attrs


# ---------------------------------------------------------------------------------------------
# decoding


@njit(cache=True)
def _decode(codes, gap_start, gap_end, val_start, nnz, map_hw, K, cell_start, nz_start, chan_buf, n_chan, cell_nnz,
            nz_chan, nz_level, cursor, nz_cell, nz_j):
    """Fill the SparseMaps arrays of a partition (see `decode_partition`); returns the index of the first
    map whose codes do not fit its size (-1: all good). One pass over the varints notes each non-zero's
    cell and compact channel (`nz_cell`, `nz_j`: scratch of the map's nnz; channels found by stepping
    over channel boundaries, no division), a second over those places it at its cell's cursor."""
    for i in range(map_hw.shape[0]):
        cells = map_hw[i, 0] * map_hw[i, 1]
        limit = K * cells
        cs = cell_start[i]
        for c in range(cells):
            cell_nnz[cs + c] = 0
        p = gap_start[i]
        end = gap_end[i]
        pos = -1
        k = -1
        base = -cells  # first flat index of channel k
        C = 0
        for t in range(nnz[i]):
            if p >= end:
                return i
            g = np.int64(codes[p])
            p += 1
            if g >= 128:  # most gaps take one byte
                g &= 127
                shift = 7
                while True:
                    if p >= end or shift > 56:
                        return i
                    b = codes[p]
                    p += 1
                    g |= np.int64(b & 127) << shift
                    shift += 7
                    if b < 128:
                        break
            pos += g + 1
            if pos >= limit:
                return i
            if pos >= base + cells:
                k = pos // cells if pos >= base + 2 * cells else k + 1  # a gap may skip silent channels
                base = k * cells
                chan_buf[i * K + C] = k
                C += 1
            c = pos - base
            nz_cell[t] = c
            nz_j[t] = C - 1
            cell_nnz[cs + c] += 1
        if p != end:
            return i
        n_chan[i] = C
        at = nz_start[i]
        for c in range(cells):
            cursor[c] = at
            at += cell_nnz[cs + c]
        v = val_start[i]
        for t in range(nnz[i]):
            c = nz_cell[t]
            q = cursor[c]
            cursor[c] += 1
            nz_chan[q] = nz_j[t]
            nz_level[q] = codes[v + t]
    return -1


def decode_partition(codes: np.ndarray, attrs: dict, select: np.ndarray | None = None) -> SparseMaps:
    """`SparseMaps` of every image of a partition from its buffer and attributes (`encode_maps`), or of
    the images ``select`` only, in that order (each image's codes stand apart: a query that needs one map
    of a partition decodes one)."""
    hw = np.asarray(attrs["map_hw"], dtype=np.int64).reshape(-1, 2)
    nnz = np.asarray(attrs["nnz"], dtype=np.int64)
    gb = np.asarray(attrs["gap_bytes"], dtype=np.int64)
    K = int(attrs["channels"])
    n = len(hw)
    codes = np.ascontiguousarray(codes[: int(attrs["length"])], dtype=np.uint8)
    gap_start = np.concatenate([[0], np.cumsum(gb)]).astype(np.int64)
    all_nz = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    if len(nnz) != n or len(gb) != n or gap_start[-1] + all_nz[-1] != len(codes):
        raise CorruptMaps(f"map codes of {len(codes)} bytes do not match their index "
                          f"({gap_start[-1]} + {all_nz[-1]} bytes)")
    val_start = gap_start[-1] + all_nz[:-1]
    gap_end = gap_start[1:]
    if select is not None:
        select = np.asarray(select, dtype=np.int64).reshape(-1)
        if (select < 0).any() or (select >= n).any():
            raise ValueError(f"select must index the partition's {n} images")
        hw, nnz, gap_start, gap_end, val_start = hw[select], nnz[select], gap_start[select], gap_end[select], \
            val_start[select]
        n = len(select)
    nz_start = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    cells = hw[:, 0] * hw[:, 1]
    cell_start = np.concatenate([[0], np.cumsum(cells)]).astype(np.int64)
    chan_buf = np.empty(n * K, np.int32)
    n_chan = np.zeros(n, np.int64)
    cell_nnz = np.empty(cell_start[-1], np.uint16)
    nz_chan = np.empty(nz_start[-1], np.uint16)
    nz_level = np.empty(nz_start[-1], np.uint8)
    cursor = np.empty(int(cells.max(initial=0)), np.int64)
    most = int(nnz.max(initial=0))
    bad = _decode(codes, gap_start, gap_end, val_start, nnz, hw, K, cell_start, nz_start, chan_buf, n_chan, cell_nnz,
                  nz_chan, nz_level, cursor, np.empty(most, np.int64), np.empty(most, np.int32))
    if bad >= 0:
        which = bad if select is None else int(select[bad])
        raise CorruptMaps(f"map codes of image {which} of the partition do not decode to its {hw[bad]} map")
    chan_start = np.concatenate([[0], np.cumsum(n_chan)]).astype(np.int64)
    chans = np.concatenate([chan_buf[i * K:i * K + n_chan[i]] for i in range(n)]) if n else np.zeros(0, np.int32)
    return SparseMaps(K, hw, chan_start, chans, cell_start, cell_nnz, nz_start, nz_chan, nz_level)


# ---------------------------------------------------------------------------------------------
# Zarr


def write_partition_maps(arrays_path: str | os.PathLike, p: int, maps: Sequence[np.ndarray | None],
                         image_hw: np.ndarray | None = None, channels: int | None = None) -> int:
    """Write partition ``p``'s quantised maps (one uint8 ``(K, h, w)`` per image, None for a failed one)
    and its images' pixel sizes ``(n, 2)`` as ``arrays/maps/p000123``; returns the bytes before
    compression. ``channels``: K (needed when every image failed)."""
    buf, attrs = encode_maps(maps, channels)
    ihw = np.zeros((len(maps), 2), np.int64) if image_hw is None else np.asarray(image_hw, np.int64).reshape(-1, 2)
    if len(ihw) != len(maps):
        raise ValueError(f"{len(ihw)} image sizes for {len(maps)} maps")
    attrs["image_hw"] = ihw.tolist()
    group = zarr.open_group(Path(arrays_path) / "maps", mode="a")
    n = max(1, buf.size)  # a Zarr chunk has at least one element; `length` says how many are real
    arr = group.create_array(partition_name(p), shape=(n,), chunks=(n,), dtype="uint8", fill_value=0,
                             compressors=CODES_CODEC, overwrite=True, attributes=attrs)
    if buf.size:
        arr[:] = buf
    return int(buf.size)


def partition_path(arrays_path: str | os.PathLike, p: int) -> Path:
    return Path(arrays_path) / "maps" / partition_name(p)


def read_partition(arrays_path: str | os.PathLike, p: int, select: np.ndarray | None = None) -> PartitionMaps:
    """Read and decode every map of partition ``p`` (or the maps ``select``, in that order): its metadata
    and its one chunk file."""
    path = os.path.join(arrays_path, "maps", partition_name(p))  # strings: a query reads ~1000 of these
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no stored maps for partition {p}") from None
    attrs = meta["attributes"]
    chunk = os.path.join(path, "c", "0")
    if attrs["length"] and not os.path.isfile(chunk):  # Zarr would read zeros
        raise FileNotFoundError(f"{chunk}: the codes of partition {p} are missing")
    codes = _read_codes(Path(path), meta) if attrs["length"] else np.zeros(0, np.uint8)
    image_hw = np.asarray(attrs["image_hw"], np.int64).reshape(-1, 2)
    return PartitionMaps(decode_partition(codes, attrs, select), image_hw if select is None else image_hw[select])


def _read_codes(path: Path, meta: dict) -> np.ndarray:
    """The codes of one partition array. The layout `write_partition_maps` writes (one chunk, bytes +
    zstd) is read straight from its chunk file: through Zarr's asynchronous machinery the same read cost
    ~1.5 ms per partition, five times the file read and the decompression together, and a query's
    re-ranking reads ~70 partitions. Any other layout goes through Zarr."""
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    if codecs == ["bytes", "zstd"] and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]:
        with open(os.path.join(path, "c", "0"), "rb") as f:
            raw = np.frombuffer(_ZSTD.decode(f.read()), np.uint8)
        if raw.size != meta["shape"][0]:
            raise CorruptMaps(f"{path}: {raw.size} bytes of codes where its metadata says {meta['shape'][0]}")
        return raw
    return zarr.open_array(path, mode="r", zarr_format=3)[:]


def chunk_file(arrays_path: str | os.PathLike, p: int) -> Path:
    """The one chunk file of partition ``p``'s codes."""
    return partition_path(arrays_path, p) / "c" / "0"


def codes_digest(arrays_path: str | os.PathLike, p: int) -> str:
    """SHA-256 (32 hex) of partition ``p``'s stored codes (decoded bytes) and their attributes."""
    import hashlib
    import json

    arr = zarr.open_array(partition_path(arrays_path, p), mode="r")
    h = hashlib.sha256(json.dumps(arr.attrs.asdict(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(arr[:]).tobytes())
    return h.hexdigest()[:32]


def create_maps_group(arrays_path: str | os.PathLike) -> None:
    zarr.open_group(Path(arrays_path) / "maps", mode="a")


# ---------------------------------------------------------------------------------------------
# per-process cache of decoded partitions


class PartitionCache:
    """A bounded LRU of decoded partitions, keyed by the partition's file identity (path, inode, size,
    mtime of its ``zarr.json``), so a rewritten or re-created store is never served stale maps."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, PartitionMaps] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @staticmethod
    def _key(arrays_path: str | os.PathLike, p: int) -> tuple:
        path = partition_path(arrays_path, p)
        try:
            st = os.stat(path / "zarr.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no stored maps for partition {p}") from None
        return (str(Path(arrays_path).resolve()), p, st.st_ino, st.st_size, st.st_mtime_ns)

    def holds(self, arrays_path: str | os.PathLike, p: int) -> bool:
        """Whether partition ``p`` is cached (as it is on disk now)."""
        try:
            key = self._key(arrays_path, p)
        except FileNotFoundError:
            return False
        with self._lock:
            return key in self._items

    def get(self, arrays_path: str | os.PathLike, p: int) -> PartitionMaps:
        key = self._key(arrays_path, p)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
        sp = read_partition(arrays_path, p)
        with self._lock:
            self.misses += 1
            if sp.nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = sp
                self._bytes += sp.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return sp

    def clear(self) -> None:
        """Drop every decoded partition and reset the hit and miss counts."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0
