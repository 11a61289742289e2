"""The stored form of the quantised activation maps: per partition, only each image's valid cells and
only its non-zeros (store format 2).

One Zarr array per partition, ``arrays/maps/p000123``: 1-D uint8, one chunk, **no Zarr compressor**
(encoding `FRAMES_ENCODING`), holding one zstd frame (level 9) per image, concatenated:

    [zstd([positions of image 0][levels of image 0])][zstd([positions of image 1][levels of image 1])]...

Zarr is only the container (checksums, `rmac verify` and Zarr reads see the stored bytes); the
compression is per image so that a reader that needs a few maps of a partition (a re-ranking short-list
spread over a large store needs about one per partition) reads and decompresses only their frames.

An image's non-zeros are taken in the order of its ``(K, h, w)`` map (channel-major, then row-major
cells; ``h x w`` the valid cells only). Positions are delta-coded: the gap to the previous non-zero's
flat index, minus one, as an LEB128 varint (7 bits a byte, so most gaps take one byte; a silent channel
is just a longer gap). Levels are one byte each (``1..levels``). The array's attributes say where each
image's part is: ``frame_bytes`` (compressed bytes of its frame; frames follow each other), ``map_hw``
``[[h, w], ...]``, ``nnz`` (non-zeros per image), ``gap_bytes`` (bytes of its positions: a frame
decompresses to ``gap_bytes + nnz`` bytes), ``channels`` K, ``length`` (bytes of all frames); and
``image_hw`` (a copy of the rows of the ``image_hw`` array, written in the same call) so that one read
gives a re-ranking task all it needs, pixel boxes included. A failed image (and a map without any
non-zero) has ``nnz = 0`` and an empty frame of 0 bytes; a failed one also ``h = w = 0``.

The earlier layout (`JOINT_ENCODING`, still read: format-2 stores written before per-image frames) put
``[positions of image 0][positions of image 1]...[levels of image 0][levels of image 1]...`` in one
chunk compressed by Zarr (bytes + zstd 9), so reading one map decompressed the whole partition.
Measured on the 186 dev photos (EfficientNet-Lite0, 1024 px, 31 levels; `docs/benchmarks.md`, issue 9
and issue 12 "Per-image frames"): 13.9 kB per image in per-image frames, 13.3 kB in one partition-wide
stream (+4 %, the price of reading one map without decompressing its partition: a re-ranking read of
1000 rows spread over 100k images took half the time); cell-major order, or channel/cell indices
instead of gaps, compress 20-45 % worse.

Decoding (`decode_partition`, numba) goes straight to `rmac.ops.integral.SparseMaps`, the form the
re-ranking kernel reads (non-zeros sorted by cell, compact channel ids): two passes over the varints,
the second placing each non-zero at its cell's cursor. No dense or padded intermediate.

Writers call `write_partition_maps(arrays_path, p, maps, image_hw)` with the quantised maps of the
partition's images (a list of uint8 ``(K, h, w)``, ``None`` or a ``(K, 0, 0)`` array for a failed image)
and their image sizes; `rmac.storage.store.Store.write_partition` does. Readers: `read_partition(arrays_path,
p, select=None)` -> `PartitionMaps` (with ``select``, only those frames are read from the chunk file);
`PartitionCache` keeps decoded partitions per worker process.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import zarr
from numba import njit
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from rmac.ops.integral import SparseMaps

# zstd 9: 13.3 kB per dev image against 14.1 kB at level 3 and 12.7 at 19 (whose encoding takes ~0.3 s per
# partition), measured on the joint layout; decoding speed does not depend on the level.
ZSTD_LEVEL = 9
_ZSTD_WRITE = Zstd(level=ZSTD_LEVEL)
_ZSTD = Zstd()  # decoding only: the level is the writer's
# The layout before per-image frames: one zstd stream per partition, by Zarr (read, no longer written).
JOINT_ENCODING = "channel-major LEB128 gaps, then uint8 levels"
JOINT_CODEC = ZstdCodec(level=ZSTD_LEVEL)
# What the writers write: one zstd frame per image, the array itself uncompressed.
FRAMES_ENCODING = "per-image zstd frames of channel-major LEB128 gaps, then uint8 levels"
ENCODING = FRAMES_ENCODING


class PartitionMaps(NamedTuple):
    """A decoded partition: its maps and the images' sizes ``(n, 2)`` ``(H, W)`` in pixels."""

    maps: SparseMaps
    image_hw: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.maps.nbytes + self.image_hw.nbytes


class CorruptMaps(ValueError):
    """Stored map codes that do not decode to the map sizes their attributes give."""


class UnknownEncoding(ValueError):
    """Map codes in an encoding this version of rmac does not know (written by a newer one)."""


def check_encoding(attrs: dict, where: str = "map codes") -> str:
    """The ``encoding`` attribute of a maps array, if this rmac can read it; else `UnknownEncoding`."""
    enc = attrs.get("encoding")
    if enc not in (FRAMES_ENCODING, JOINT_ENCODING):
        raise UnknownEncoding(f"{where}: unknown encoding {enc!r} (made by a newer rmac? this one reads "
                              f"{FRAMES_ENCODING!r} and {JOINT_ENCODING!r})")
    return enc


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


def _image_codes(maps: Sequence[np.ndarray | None], channels: int | None) -> tuple[list, dict]:
    """Each image's ``(gaps, levels)`` (uint8; empty for a failed one) and the attributes both encodings
    share."""
    K = int(channels) if channels is not None else next((int(m.shape[0]) for m in maps if m is not None), 0)
    codes, hw, nnz, nbytes = [], [], [], []
    empty = np.zeros(0, np.uint8)
    for m in maps:
        if m is not None and (np.ndim(m) != 3 or m.shape[0] != K):
            raise ValueError(f"expected uint8 maps (K={K}, h, w), got {m.dtype} {m.shape}")
        if m is None or m.size == 0:
            codes.append((empty, empty))
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
        codes.append((g, flat[idx]))
        hw.append([int(m.shape[1]), int(m.shape[2])])
        nnz.append(int(idx.size))
        nbytes.append(int(g.size))
    return codes, {"channels": K, "map_hw": hw, "nnz": nnz, "gap_bytes": nbytes}


def encode_maps(maps: Sequence[np.ndarray | None], channels: int | None = None) -> tuple[np.ndarray, dict]:
    """The partition buffer (uint8: one zstd frame per image, `FRAMES_ENCODING`) and its attributes for
    quantised maps ``(K, h, w)`` (None: failed); ``channels`` K (default: the maps'). An image without
    any non-zero has an empty frame."""
    codes, attrs = _image_codes(maps, channels)
    frames = [_ZSTD_WRITE.encode(np.concatenate([g, v]).tobytes()) if len(v) else b"" for g, v in codes]
    buf = np.frombuffer(b"".join(frames), np.uint8)
    attrs = {"encoding": FRAMES_ENCODING, **attrs, "frame_bytes": [len(f) for f in frames], "length": int(buf.size)}
    return buf, attrs


def encode_maps_joint(maps: Sequence[np.ndarray | None], channels: int | None = None) -> tuple[np.ndarray, dict]:
    """The layout before per-image frames (`JOINT_ENCODING`, uncompressed: Zarr compressed the whole
    partition); no longer written by rmac, kept to test and measure that it still reads."""
    codes, attrs = _image_codes(maps, channels)
    parts = [g for g, _ in codes] + [v for _, v in codes]
    buf = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buf.astype(np.uint8, copy=False), {"encoding": JOINT_ENCODING, **attrs, "length": int(buf.size)}


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


def _index(attrs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``map_hw`` (n, 2), ``nnz``, ``gap_bytes`` and K from a maps array's attributes, checked."""
    hw = np.asarray(attrs["map_hw"], dtype=np.int64).reshape(-1, 2)
    nnz = np.asarray(attrs["nnz"], dtype=np.int64).reshape(-1)
    gb = np.asarray(attrs["gap_bytes"], dtype=np.int64).reshape(-1)
    if len(nnz) != len(hw) or len(gb) != len(hw) or (nnz < 0).any() or (gb < 0).any():
        raise CorruptMaps(f"map code attributes disagree: {len(hw)} map sizes, {len(nnz)} nnz, {len(gb)} gap_bytes")
    return hw, nnz, gb, int(attrs["channels"])


def _selection(select: np.ndarray | None, n: int) -> np.ndarray | None:
    if select is None:
        return None
    select = np.asarray(select, dtype=np.int64).reshape(-1)
    if (select < 0).any() or (select >= n).any():
        raise ValueError(f"select must index the partition's {n} images")
    return select


def frame_offsets(attrs: dict) -> np.ndarray:
    """Where each image's frame starts in a `FRAMES_ENCODING` array (``n + 1`` offsets, the last
    ``length``), checked against the attributes."""
    fb = np.asarray(attrs["frame_bytes"], dtype=np.int64).reshape(-1)
    n = len(attrs["map_hw"])
    if len(fb) != n or (fb < 0).any():
        raise CorruptMaps(f"{len(fb)} frame sizes for {n} images")
    off = np.concatenate([[0], np.cumsum(fb)]).astype(np.int64)
    if off[-1] != int(attrs["length"]):
        raise CorruptMaps(f"frames of {off[-1]} bytes in all where the array's length says {attrs['length']}")
    return off


def decode_partition(codes: np.ndarray, attrs: dict, select: np.ndarray | None = None) -> SparseMaps:
    """`SparseMaps` of every image of a partition from its stored bytes and attributes (`encode_maps`,
    or `encode_maps_joint` for arrays written before per-image frames), or of the images ``select`` only,
    in that order (each image's codes stand apart: a query that needs one map of a partition decodes one;
    with per-image frames it also decompresses only that one)."""
    enc = check_encoding(attrs)
    hw, nnz, gb, K = _index(attrs)
    select = _selection(select, len(hw))
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    length = int(attrs["length"])
    if len(codes) < length:
        raise CorruptMaps(f"{len(codes)} bytes of map codes where the array's length says {length}")
    codes = codes[:length]
    if enc == FRAMES_ENCODING:
        off = frame_offsets(attrs)
        which = range(len(hw)) if select is None else select
        return decode_frames([codes[off[i]:off[i + 1]] for i in which], attrs, select)
    # JOINT_ENCODING: all gaps, then all levels, decompressed already (Zarr's codec)
    codes = np.ascontiguousarray(codes)
    gap_start = np.concatenate([[0], np.cumsum(gb)]).astype(np.int64)
    all_nz = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    if gap_start[-1] + all_nz[-1] != len(codes):
        raise CorruptMaps(f"map codes of {len(codes)} bytes do not match their index "
                          f"({gap_start[-1]} + {all_nz[-1]} bytes)")
    val_start = gap_start[-1] + all_nz[:-1]
    gap_end = gap_start[1:]
    gap_start = gap_start[:-1]
    if select is not None:
        hw, nnz, gap_start, gap_end, val_start = hw[select], nnz[select], gap_start[select], gap_end[select], \
            val_start[select]
    return _sparse(codes, hw, nnz, gap_start, gap_end, val_start, K, select)


def decode_frames(frames: Sequence, attrs: dict, select: np.ndarray | None = None,
                  index: tuple | None = None) -> SparseMaps:
    """`SparseMaps` of the images ``select`` (all if None) of a `FRAMES_ENCODING` partition from their
    compressed frames (bytes-like, in the order of ``select``). Each frame must declare, and zstd then
    holds it to, exactly its image's ``gap_bytes + nnz`` bytes; the frames are decompressed in one call
    (one zstd context: a call per frame cost ~40 us more per frame). ``index``: ``_index(attrs)`` if the
    caller has it already."""
    hw, nnz, gb, K = index if index is not None else _index(attrs)
    select = _selection(select, len(hw))
    which = np.arange(len(hw)) if select is None else select
    if len(frames) != len(which):
        raise ValueError(f"{len(frames)} frames for {len(which)} images")
    return _decode_frames(frames, hw[which], nnz[which], gb[which], K, which, select)


def _decode_frames(frames: Sequence, hw, nnz, gb, K: int, which, select) -> SparseMaps:
    """`decode_frames` of images whose (selected) index entries are given; ``which``: their numbers, for
    the errors."""
    want = gb + nnz
    for i, f, size in zip(which, frames, want):
        got = _content_size(f) if len(f) else 0
        if got != size:
            raise CorruptMaps(f"the frame of image {i} of the partition holds {got} bytes, not the {size} its "
                              f"attributes give")
    joined = b"".join(frames)
    try:
        raw = _ZSTD.decode(joined) if joined else b""
    except Exception:  # numcodecs raises RuntimeError on a damaged frame: find which, to say so
        for i, f in zip(which, frames):
            try:
                if len(f):
                    _ZSTD.decode(f)
            except Exception as e:
                raise CorruptMaps(f"the frame of image {i} of the partition does not decompress ({e})") from None
        raise CorruptMaps("the frames of the partition do not decompress together") from None
    if len(raw) != want.sum():
        raise CorruptMaps(f"the frames of the partition hold {len(raw)} bytes, not the {want.sum()} their "
                          f"attributes give")
    codes = np.frombuffer(raw, np.uint8)
    gap_start = np.concatenate([[0], np.cumsum(want)[:-1]]).astype(np.int64)
    gap_end = gap_start + gb
    return _sparse(codes, hw, nnz, gap_start, gap_end, gap_end, K, select)


def read_many(arrays_path: str | os.PathLike, wanted: Mapping[int, np.ndarray]) -> PartitionMaps | None:
    """The maps ``wanted`` (partition -> offsets in it) of several partitions, decoded together: one
    `PartitionMaps`, partition by partition in the order of ``wanted``, each in its offsets' order. A
    short-list spread over a large store reads about one map per partition, and decoding them one
    partition at a time cost ~0.4 ms of Python and numpy per partition; here it is one zstd call and one
    `_decode` for all. None when a partition is not stored as per-image frames (read them one by one).
    Damage raises as in `read_partition`, but without naming the partition: callers that must name it read
    the partitions one by one again."""
    frames, hw, nnz, gb, ihw, K = [], [], [], [], [], None
    for p, select in wanted.items():
        pm = partition_meta(arrays_path, p)
        if pm.offsets is None or pm.encoding != FRAMES_ENCODING:
            return None
        select = _selection(select, len(pm.image_hw))
        select = np.arange(len(pm.image_hw)) if select is None else select
        h, z, g, k = pm.index
        if K is not None and k != K:
            raise CorruptMaps(f"partition {p} has {k} channels, others {K}")
        K = k
        frames += _read_frames(_codes_file(arrays_path, p, pm), pm.meta, pm.offsets, select)
        hw.append(h[select]), nnz.append(z[select]), gb.append(g[select]), ihw.append(pm.image_hw[select])
    if K is None:
        return None
    hw, nnz, gb = np.concatenate(hw), np.concatenate(nnz), np.concatenate(gb)
    which = np.arange(len(hw))
    return PartitionMaps(_decode_frames(frames, hw, nnz, gb, K, which, which), np.concatenate(ihw))


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _content_size(frame) -> int | None:
    """The decompressed size a zstd frame declares in its header (RFC 8878, 3.1.1.1), None if it declares
    none or is not a zstd frame. (numcodecs does not expose ZSTD_getFrameContentSize.)"""
    head = bytes(frame[:18])
    if len(head) < 5 or head[:4] != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    single = (fhd >> 5) & 1
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]  # window descriptor, dictionary id
    n = (single, 2, 4, 8)[fhd >> 6]
    if n == 0 or len(head) < at + n:
        return None
    v = int.from_bytes(head[at:at + n], "little")
    return v + 256 if n == 2 else v


def _sparse(codes, hw, nnz, gap_start, gap_end, val_start, K: int, select: np.ndarray | None) -> SparseMaps:
    """Run `_decode` over ``codes`` for the images whose positions are ``codes[gap_start:gap_end]`` and
    levels start at ``val_start``; ``select``: their numbers in the partition (for errors)."""
    n = len(hw)
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
    and its images' pixel sizes ``(n, 2)`` as ``arrays/maps/p000123`` (per-image zstd frames in an
    uncompressed Zarr array); returns the bytes stored. ``channels``: K (needed when every image failed)."""
    buf, attrs = encode_maps(maps, channels)
    return _write_array(arrays_path, p, buf, attrs, image_hw, len(maps), None)


def write_partition_maps_joint(arrays_path: str | os.PathLike, p: int, maps: Sequence[np.ndarray | None],
                               image_hw: np.ndarray | None = None, channels: int | None = None) -> int:
    """`write_partition_maps` in the layout before per-image frames (`JOINT_ENCODING`: one stream,
    compressed by Zarr); rmac no longer writes it: tests and benchmarks use it to check old stores still
    read. Returns the bytes before compression."""
    buf, attrs = encode_maps_joint(maps, channels)
    return _write_array(arrays_path, p, buf, attrs, image_hw, len(maps), JOINT_CODEC)


def _write_array(arrays_path, p: int, buf: np.ndarray, attrs: dict, image_hw, n_maps: int, compressor) -> int:
    ihw = np.zeros((n_maps, 2), np.int64) if image_hw is None else np.asarray(image_hw, np.int64).reshape(-1, 2)
    if len(ihw) != n_maps:
        raise ValueError(f"{len(ihw)} image sizes for {n_maps} maps")
    attrs["image_hw"] = ihw.tolist()
    group = zarr.open_group(Path(arrays_path) / "maps", mode="a")
    n = max(1, buf.size)  # a Zarr chunk has at least one element; `length` says how many are real
    arr = group.create_array(partition_name(p), shape=(n,), chunks=(n,), dtype="uint8", fill_value=0,
                             compressors=compressor, overwrite=True, attributes=attrs)
    if buf.size:
        arr[:] = buf
    return int(buf.size)


def partition_path(arrays_path: str | os.PathLike, p: int) -> Path:
    return Path(arrays_path) / "maps" / partition_name(p)


class PartitionMeta(NamedTuple):
    """A partition array's ``zarr.json``, parsed and checked: what a read needs besides the codes."""

    meta: dict
    encoding: str
    index: tuple  # `_index(attrs)`: map_hw, nnz, gap_bytes, K
    image_hw: np.ndarray
    offsets: np.ndarray | None  # per-image frames in a plain chunk: where each frame starts (else None)


# Parsed metadata kept per process: ~7 kB for a partition of 128 images, so the 7,813 partitions of 1M
# distractors fit. A re-ranking read of one map spent ~0.4 of its ~0.9 ms parsing the 16 kB of JSON and
# turning its lists into arrays; a worker serving queries reads the same partitions again and again.
META_CACHE_PARTITIONS = 16_384
RACY_NS = 2_000_000_000


def partition_meta(arrays_path: str | os.PathLike, p: int) -> PartitionMeta:
    """Partition ``p``'s metadata, from this process's cache while its ``zarr.json`` is the same file
    (inode, size, mtime: a rewritten partition is parsed again). A file changed in the last
    ``RACY_NS`` is parsed and not kept: its mtime may not yet tell it from a rewrite in the same clock
    tick (as git's "racily clean" entries)."""
    path = os.path.join(arrays_path, "maps", partition_name(p))  # strings: a query reads ~1000 of these
    try:
        st = os.stat(os.path.join(path, "zarr.json"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no stored maps for partition {p}") from None
    if time.time_ns() - st.st_mtime_ns < RACY_NS:
        return _parsed_meta.__wrapped__(path, st.st_ino, st.st_size, st.st_mtime_ns)
    pm = _parsed_meta(path, st.st_ino, st.st_size, st.st_mtime_ns)
    _HELD_META.add(path)  # parsed and kept: its zarr.json needs no hint any more
    return pm


# The partitions whose metadata `partition_meta` has kept, so that `prefetch` hints only the others'
# zarr.json (a hint costs an open and a close, ~1,000 per query at 1M, and the held metadata needs no
# read). Hints only: a partition rewritten since, or dropped by the LRU, gets its read not hinted ahead,
# never a wrong read.
_HELD_META: set[str] = set()


@functools.lru_cache(maxsize=META_CACHE_PARTITIONS)
def _parsed_meta(path: str, ino: int, size: int, mtime_ns: int) -> PartitionMeta:
    with open(os.path.join(path, "zarr.json"), "rb") as f:
        meta = json.loads(f.read())
    attrs = meta["attributes"]
    enc = check_encoding(attrs, path)
    index = _index(attrs)
    image_hw = np.asarray(attrs["image_hw"], np.int64).reshape(-1, 2)
    offsets = frame_offsets(attrs) if enc == FRAMES_ENCODING and _plain_chunk(meta, []) else None
    for a in (*index[:3], image_hw, offsets):  # shared by every later read: never to be written
        if a is not None:
            a.flags.writeable = False
    return PartitionMeta(meta, enc, index, image_hw, offsets)


def hold_meta(arrays_path: str | os.PathLike, partitions: Sequence[int], batch: int = 256) -> int:
    """Parse and keep (`partition_meta`) the metadata of ``partitions``, ``batch`` files read at once
    (`prefetch`), before queries need them; at most `META_CACHE_PARTITIONS`. Partitions without maps
    are skipped. Returns how many are held."""
    held, todo = 0, list(partitions)[:META_CACHE_PARTITIONS]
    for b in range(0, len(todo), batch):
        part = todo[b:b + batch]
        _advise_meta(arrays_path, part)
        for p in part:
            try:
                partition_meta(arrays_path, p)
                held += 1
            except FileNotFoundError:
                continue
    return held


def clear_meta_cache() -> None:
    """Forget every partition's parsed metadata (`partition_meta`) in this process."""
    _parsed_meta.cache_clear()
    _HELD_META.clear()


def read_partition(arrays_path: str | os.PathLike, p: int, select: np.ndarray | None = None) -> PartitionMaps:
    """Read and decode every map of partition ``p`` (or the maps ``select``, in that order): its metadata
    (`partition_meta`) and its one chunk file (with per-image frames and ``select``, only the selected
    frames' bytes)."""
    pm = partition_meta(arrays_path, p)
    path = os.path.join(arrays_path, "maps", partition_name(p))
    attrs = pm.meta["attributes"]
    chunk = _codes_file(arrays_path, p, pm)
    select = _selection(select, len(pm.image_hw))
    which = np.arange(len(pm.image_hw)) if select is None else select
    if pm.offsets is not None:
        maps = decode_frames(_read_frames(chunk, pm.meta, pm.offsets, select), attrs, select, pm.index)
    else:
        codes = _read_codes(Path(path), pm.meta) if attrs["length"] else np.zeros(0, np.uint8)
        maps = decode_partition(codes, attrs, select)
    return PartitionMaps(maps, pm.image_hw[which])


def prefetch(arrays_path: str | os.PathLike, wanted: Mapping[int, np.ndarray | None]) -> None:
    """Ask the kernel to start reading, all at once, what reading the maps ``wanted`` (partition ->
    offsets selected in it, None for all) needs: the metadata of every partition not held parsed yet
    (`partition_meta`) first, then the selected frames (or whole chunk files). A short-list spread over a
    large store needs about one partition per image: read one after the other from a cold page cache,
    each costs a disk round trip (at 1M, 500 images in ~490 partitions: 0.72-1.38 s in turn, 0.44-0.53 s
    prefetched). Only hints (``posix_fadvise`` WILLNEED): a missing file is left to the read that follows
    to report; a no-op without the call."""
    root = os.path.join(arrays_path, "maps")
    _advise_meta(arrays_path, [p for p in wanted if os.path.join(root, partition_name(p)) not in _HELD_META])
    for p, select in wanted.items():
        try:
            pm = partition_meta(arrays_path, p)
        except (OSError, ValueError, KeyError):  # the read reports it
            continue
        ranges = [(0, 0)]
        if pm.offsets is not None and select is not None:
            ranges = [(int(pm.offsets[i]), int(pm.offsets[i + 1] - pm.offsets[i])) for i in select
                      if 0 <= i < len(pm.offsets) - 1 and pm.offsets[i + 1] > pm.offsets[i]]
        _advise(os.path.join(root, partition_name(p), "c", "0"), ranges)


def _advise_meta(arrays_path: str | os.PathLike, partitions) -> None:
    """Hint the ``zarr.json`` of each of ``partitions`` (read whole)."""
    root = os.path.join(arrays_path, "maps")
    for p in partitions:
        _advise(os.path.join(root, partition_name(p), "zarr.json"), [(0, 0)])


def _advise(path: str, ranges: list[tuple[int, int]]) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for start, length in ranges:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _codes_file(arrays_path: str | os.PathLike, p: int, pm: PartitionMeta) -> str:
    """The path of partition ``p``'s one chunk file, which must exist when it holds codes (Zarr would
    read a missing one as zeros)."""
    chunk = os.path.join(arrays_path, "maps", partition_name(p), "c", "0")
    if pm.meta["attributes"]["length"] and not os.path.isfile(chunk):
        raise FileNotFoundError(f"{chunk}: the codes of partition {p} are missing")
    return chunk


def _plain_chunk(meta: dict, compressors: list[str]) -> bool:
    """Whether the array is one chunk whose file holds its bytes behind just ``compressors``."""
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    return (codecs == ["bytes", *compressors] and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
            and meta.get("data_type") == "uint8")


def _read_frames(chunk: str, meta: dict, off: np.ndarray, select: np.ndarray | None) -> list:
    """The compressed frames of the images ``select`` (all if None), read from the chunk file of a
    `FRAMES_ENCODING` array at the frame offsets ``off`` (`frame_offsets`): the whole file, or only the
    selected frames' byte ranges (one open)."""
    which = range(len(off) - 1) if select is None else select
    if not off[-1]:
        return [b""] * len(which)
    with open(chunk, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != meta["shape"][0] or off[-1] > size:
            raise CorruptMaps(f"{chunk}: {size} bytes where its metadata says {meta['shape'][0]} "
                              f"(frames of {off[-1]} bytes)")
        if select is None:
            buf = memoryview(f.read())
            frames = [buf[off[i]:off[i + 1]] for i in which]
        else:
            fd = f.fileno()
            frames = [os.pread(fd, int(off[i + 1] - off[i]), int(off[i])) if off[i + 1] > off[i] else b""
                      for i in which]
    for i, fr in zip(which, frames):
        if len(fr) != off[i + 1] - off[i]:
            raise CorruptMaps(f"{chunk}: the frame of image {i} is cut short")
    return frames


def _read_codes(path: Path, meta: dict) -> np.ndarray:
    """The stored bytes of one partition array (the codes, for `JOINT_ENCODING` decompressed). The
    layouts rmac writes (one chunk, bytes + zstd or bytes alone) are read straight from the chunk file:
    through Zarr's asynchronous machinery the same read cost ~1.5 ms per partition, five times the file
    read and the decompression together, and a query's re-ranking reads ~70 partitions. Any other layout
    goes through Zarr."""
    plain, zstd = _plain_chunk(meta, []), _plain_chunk(meta, ["zstd"])
    if plain or zstd:
        with open(os.path.join(path, "c", "0"), "rb") as f:
            raw = f.read()
        raw = np.frombuffer(_ZSTD.decode(raw) if zstd else raw, np.uint8)
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


def _resolved(path: str) -> str:
    """``path`` made absolute with links resolved; the links once per process (a store's folder does not
    move while it is served; resolving took ~0.14 ms, once per partition of every short-list)."""
    return _resolved_abs(os.path.abspath(path))


@functools.lru_cache(maxsize=64)
def _resolved_abs(path: str) -> str:
    return str(Path(path).resolve())


class PartitionCache:
    """A bounded LRU of decoded partitions, keyed by the partition's file identity (path, inode, size,
    mtime of its ``zarr.json``), so a rewritten or re-created store is never served stale maps."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, PartitionMaps] = OrderedDict()
        self._parts: Counter[tuple[str, int]] = Counter()  # (store, partition) -> versions held
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
        return (_resolved(str(arrays_path)), p, st.st_ino, st.st_size, st.st_mtime_ns)

    def holds(self, arrays_path: str | os.PathLike, p: int) -> bool:
        """Whether partition ``p`` is cached (as it is on disk now). No file is looked at for a partition
        of which no version is cached (a short-list over a large store asks for ~1,000 a query)."""
        if not self._parts.get((_resolved(str(arrays_path)), p)):
            return False
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
                self._parts[key[:2]] += 1
                self._bytes += sp.nbytes
                while self._bytes > self.max_bytes:
                    gone, old = self._items.popitem(last=False)
                    self._parts[gone[:2]] -= 1
                    if not self._parts[gone[:2]]:
                        del self._parts[gone[:2]]
                    self._bytes -= old.nbytes
        return sp

    def clear(self) -> None:
        """Drop every decoded partition and reset the hit and miss counts."""
        with self._lock:
            self._items.clear()
            self._parts.clear()
            self._bytes = 0
            self.hits = self.misses = 0
