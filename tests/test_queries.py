"""`rmac search STORE --queries FILE --json OUT`: the query file's grammar and its errors (file and line
named), then the batch job on the embedded photos — once as a user runs it (the console script starting
its own LocalCluster of two worker processes), once in this process on the session cluster with small
chunks — checked query by query against the single-query search."""
from __future__ import annotations

import json
import os

import pytest

from rmac.data import LANDMARKS_DEV
from rmac.workflows.queries import read_queries, search_many
from rmac.workflows.search import QueryError, SearchParams, search

from conftest import MAX_SIZE
from test_cli import check_clean, user_error

JPG = LANDMARKS_DEV / "jpg"


def write(path, text: str):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- the query file
def test_query_file_grammar(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b.jpg").write_bytes((JPG / "christ_1.jpg").read_bytes())
    f = write(tmp_path / "q.txt", f"# a day's queries\n\n{JPG / 'eiffel_1.jpg'}\n"
                                  f"  'sub/a b.jpg'  10 20.5 300 400  \n"
                                  f"sub/../sub/a\\ b.jpg\n")
    qs = read_queries(f)
    assert [(q.line, q.bbox) for q in qs] == [(3, None), (4, (10.0, 20.5, 300.0, 400.0)), (5, None)]
    assert qs[0].image == str(JPG / "eiffel_1.jpg")
    # relative paths are resolved against the query file's folder, not the working directory
    assert os.path.samefile(qs[1].image, tmp_path / "sub" / "a b.jpg")
    assert os.path.samefile(qs[2].image, tmp_path / "sub" / "a b.jpg")
    assert qs[1].where == f"{f}:4"


@pytest.mark.parametrize("line, says", [
    ("{img} 1 2 3", "expected `IMAGE` or `IMAGE X1 Y1 X2 Y2`, got 4 fields"),
    ("{img} 1 2 3 4 5", "got 6 fields"),
    ("{img} 1 2 x 4", "is not four numbers"),
    ("{img} 1 2 nan 4", "is not finite"),
    ("{img} 10 20 5 40", "is empty"),
    ("missing.jpg", "no such image file"),
    ("'{img}", "No closing quotation"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, says):
    f = write(tmp_path / "q.txt", f"{JPG / 'christ_1.jpg'}\n# fine so far\n{line.format(img=JPG / 'christ_2.jpg')}\n")
    with pytest.raises(QueryError) as e:
        read_queries(f)
    assert str(e.value).startswith(f"{f}:3: ") and says in str(e.value), str(e.value)


def test_an_empty_or_missing_query_file(tmp_path):
    with pytest.raises(QueryError, match="holds no query"):
        read_queries(write(tmp_path / "q.txt", "# nothing\n\n"))
    with pytest.raises(QueryError, match="query file .*nope.txt"):
        read_queries(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------- the batch job
def batch_file(tmp_path, dev_store, dev):
    """Three queries of the dev subset: relative paths, one with its ground-truth box."""
    q = dev_store.queries[0]
    rel = os.path.relpath(JPG, tmp_path)
    lines = [f"{rel}/{q.image}.jpg {' '.join(str(v) for v in q.bbox)}", f"{rel}/eiffel_1.jpg",
             f"{rel}/christ_2.jpg"]
    return write(tmp_path / "queries.txt", "\n".join(lines) + "\n"), [
        (str(JPG / f"{q.image}.jpg"), tuple(q.bbox)), (str(JPG / "eiffel_1.jpg"), None),
        (str(JPG / "christ_2.jpg"), None)]


def same_answer(got: dict, ref: dict):
    assert got["query"]["bbox"] == pytest.approx(ref["query"]["bbox"])
    assert got["query"]["image_hw"] == ref["query"]["image_hw"]
    assert [h["id"] for h in got["hits"]] == [h["id"] for h in ref["hits"]]
    for h, r in zip(got["hits"], ref["hits"]):
        assert h["score"] == pytest.approx(r["score"], abs=1e-5)
        assert h["initial_rank"] == r["initial_rank"]
        assert (h["box"] is None) == (r["box"] is None)
        if h["box"] is not None:
            assert h["box"] == pytest.approx(r["box"], abs=0.11)


@pytest.fixture(scope="module")
def single_answers(client, dev_store, dev, tmp_path_factory):
    _, specs = batch_file(tmp_path_factory.mktemp("ref"), dev_store, dev)
    params = SearchParams(top_n=24, qe=5)
    return [search([str(dev_store.path)], client, img, bbox, params, k=6) for img, bbox in specs]


@pytest.mark.slow
def test_batch_cli_on_its_own_local_cluster(rmac_cli, dev_store, dev, single_answers, tmp_path):
    f, specs = batch_file(tmp_path, dev_store, dev)
    out = tmp_path / "answers.jsonl"
    proc = rmac_cli("search", dev_store.path, "--queries", f, "--json", out, "--top-n", 24, "--show", 6,
                    "--workers", 2, scheduler_arg=False, timeout=600)
    check_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert "dask: 2 workers" in proc.stderr and f"answered 3 queries" in proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    answers = [json.loads(ln) for ln in lines]
    assert [a["line"] for a in answers] == [1, 2, 3]
    assert [a["query"]["image"] for a in answers] == [img for img, _ in specs]
    for a, ref in zip(answers, single_answers):
        assert set(a["timings"]) == {"extract_s", "filter_s", "rerank_s", "qe_s"}
        assert len(a["hits"]) == 6
        same_answer(a, ref)
    assert answers[2]["hits"][0]["id"] == "christ_2"  # a database photo finds itself first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_batch_in_small_chunks_equals_single_queries(client, dev_store, dev, single_answers, tmp_path):
    f, _ = batch_file(tmp_path, dev_store, dev)
    out = tmp_path / "answers.jsonl"
    n = search_many([str(dev_store.path)], client, str(f), str(out), SearchParams(top_n=24, qe=5), k=6, chunk=2)
    assert n == 3
    answers = [json.loads(ln) for ln in out.read_text().splitlines()]
    for a, ref in zip(answers, single_answers):
        same_answer(a, ref)
    # without re-ranking: the filter's order, no boxes
    n = search_many([str(dev_store.path)], client, str(f), str(out), SearchParams(top_n=24, rerank=False, qe=0),
                    k=6, chunk=2)
    plain = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert all(h["box"] is None and h["rank"] == h["initial_rank"] for a in plain for h in a["hits"])


@pytest.mark.slow
def test_batch_errors_name_the_line_and_write_nothing(rmac_cli, dev_store, dev, tmp_path):
    out = tmp_path / "answers.jsonl"
    f = write(tmp_path / "q.txt", f"{JPG / 'christ_1.jpg'}\n{JPG / 'eiffel_1.jpg'} 1 2 3\n")
    err = user_error(rmac_cli("search", dev_store.path, "--queries", f, "--json", out))
    assert f"{f}:2: expected" in err
    # a box outside its image is only known once the image is read, on a worker
    f = write(tmp_path / "q2.txt", f"{JPG / 'christ_1.jpg'}\n\n{JPG / 'eiffel_1.jpg'} 5000 5000 6000 6000\n")
    err = user_error(rmac_cli("search", dev_store.path, "--queries", f, "--json", out, "--top-n", 8))
    assert f"{f}:3: " in err and "outside" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    err = user_error(rmac_cli("search", dev_store.path, "--queries", f))
    assert "--queries needs --json OUT" in err
    err = user_error(rmac_cli("search", dev_store.path, JPG / "christ_1.jpg", "--queries", f, "--json", out))
    assert "either one QUERY image or --queries FILE" in err
