"""`rmac search STORE --queries FILE --json OUT`: many queries in one job.

One cluster and one model load for the whole file; the queries' maps are extracted on the workers
(scattered), filtered together through FAISS, and re-ranked with one task per store partition holding
every query's rows there (`rerank_many`, as `rmac evaluate` does). Queries go in chunks so that the
re-ranked vectors held by the client stay bounded; the next chunk's extraction runs while the current
one is re-ranked. The answers are JSON Lines, one per query in file order, written to a temporary file
and renamed into place at the end (a failed job leaves no half-written OUT).

The query file: one query per line, ``IMAGE`` or ``IMAGE X1 Y1 X2 Y2`` (the box in pixels); blank lines
and lines starting with ``#`` are skipped; a path with spaces is quoted (shell rules); a relative path
is resolved against the file's own folder.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmac.workflows.extract import ModelChoice
from rmac.workflows.search import (Database, QueryError, SearchParams, answer, describe_at_scales, query_maps,
                                   query_vectors, rerank_many, to_json)

QUERY_CHUNK = 64  # queries re-ranked together: bounds the client's memory (top_n vectors per query)


@dataclass(frozen=True)
class QueryLine:
    """One query of a query file: its image, its box (or None: the whole image), where it was read."""

    image: str
    bbox: tuple[float, float, float, float] | None
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_queries(path: str | os.PathLike) -> list[QueryLine]:
    """Parse a query file; ``QueryError`` naming the file and line of the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QueryError(f"query file {path}: {getattr(e, 'strerror', None) or e}") from None
    base = path.resolve().parent
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            fields = shlex.split(raw)
        except ValueError as e:
            raise QueryError(f"{where}: {e}") from None
        if len(fields) not in (1, 5):
            raise QueryError(f"{where}: expected `IMAGE` or `IMAGE X1 Y1 X2 Y2`, got {len(fields)} fields")
        image = Path(fields[0]).expanduser()
        image = Path(os.path.normpath(image if image.is_absolute() else base / image))
        bbox = None
        if len(fields) == 5:
            try:
                bbox = tuple(float(v) for v in fields[1:])
            except ValueError:
                raise QueryError(f"{where}: the box {' '.join(fields[1:])!r} is not four numbers") from None
            if not all(np.isfinite(bbox)):
                raise QueryError(f"{where}: the box {' '.join(fields[1:])} is not finite")
            if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
                raise QueryError(f"{where}: the box {' '.join(fields[1:])} is empty (need x1 < x2 and y1 < y2)")
        if not image.is_file():
            raise QueryError(f"{where}: no such image file {image}")
        out.append(QueryLine(str(image), bbox, str(path), n))
    if not out:
        raise QueryError(f"query file {path} holds no query")
    return out


def _maps(client, chunk: list[QueryLine], choice: ModelChoice, max_size: int) -> list:
    return [client.submit(query_maps, q.image, q.bbox, choice, max_size, pure=False) for q in chunk]


def answer_queries(db: Database, client, queries: list[QueryLine], params: SearchParams, choice: ModelChoice,
                   k: int, chunk: int = QUERY_CHUNK):
    """Yield ``(query, JSON-able answer)`` for every query, in order (see the module docstring)."""
    cfg = db.stores[0].config
    w_future = client.scatter(db.whitenings, broadcast=True, hash=False)
    kind = "rmac" if params.filter == "rmac" else "macw"
    chunks = [queries[i:i + chunk] for i in range(0, len(queries), chunk)]
    pending = _maps(client, chunks[0], choice, cfg.max_size) if chunks else []
    for ci, qs in enumerate(chunks):
        t = time.perf_counter()
        qvs = []
        for q, fut in zip(qs, pending):
            try:
                maps, hw, bbox = fut.result()
            except QueryError as e:
                client.cancel(pending)
                raise QueryError(f"{q.where}: {e}") from None
            qvs.append(query_vectors(maps, db.whitenings, params.L, hw, bbox))
        if params.rerank and params.top_n > 0:
            qvs = describe_at_scales(client, qvs, [q.image for q in qs], choice, cfg.max_size, params.query_scales,
                                     db.whitenings, params.L)
        # the next chunk's queries are extracted while this one is filtered and re-ranked
        pending = _maps(client, chunks[ci + 1], choice, cfg.max_size) if ci + 1 < len(chunks) else []
        extract_s = (time.perf_counter() - t) / len(qs)
        reranked: list = [None] * len(qs)
        rerank_s = 0.0
        if params.rerank and params.top_n > 0:
            t = time.perf_counter()
            _, top = db.filter(kind, np.stack([qv.rmac if kind == "rmac" else qv.macw for qv in qvs]),
                               params.top_n)
            reranked = rerank_many(db, client, qvs, [r[r >= 0] for r in top], params, w_future)
            rerank_s = (time.perf_counter() - t) / len(qs)
        for q, qv, got in zip(qs, qvs, reranked):
            ranking = answer(db, client, qv, params, w_future, k=k, reranked=got)
            # per query: its share of the chunk's extraction and scattered re-ranking
            ranking.timings = {"extract_s": extract_s, **ranking.timings}
            if got is not None:
                ranking.timings["rerank_s"] = rerank_s
            res = to_json(db, qv, ranking, q.image, k)
            yield q, {"line": q.line, **res}


def search_many(store_paths: list[str], client, queries_file: str, out: str, params: SearchParams = SearchParams(),
                choice: ModelChoice | None = None, k: int = 20, chunk: int = QUERY_CHUNK) -> int:
    """Answer every query of ``queries_file``; write JSON Lines to ``out`` (``-``: stdout). Returns the
    number of queries answered."""
    from rmac.storage.store import Store, StoreError

    queries = read_queries(queries_file)
    if out != "-" and not Path(out).resolve().parent.is_dir():
        raise QueryError(f"--json {out}: no folder {Path(out).resolve().parent} to write it in")
    db = Database([Store(p) for p in store_paths])
    cfg = db.stores[0].config
    if cfg.weights == "random":
        raise StoreError(f"{db.stores[0].path} holds random-weight features (benchmarks only)")
    choice = choice or ModelChoice(cfg.backbone)
    t = time.perf_counter()
    if out == "-":
        for _, res in answer_queries(db, client, queries, params, choice, k, chunk):
            print(json.dumps(res), flush=True)
    else:
        target = Path(out)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for _, res in answer_queries(db, client, queries, params, choice, k, chunk):
                    f.write(json.dumps(res) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    print(f"answered {len(queries)} queries in {time.perf_counter() - t:.1f} s"
          + ("" if out == "-" else f"; wrote {out}"), file=sys.stderr)
    return len(queries)
