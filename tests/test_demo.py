"""The README's first command, `rmac demo`, run for real (embedded photos, offline weights, a local Dask
cluster), and its report checked in headless Chromium: it loads, shows every query and its images,
and the boxes are drawn. A second run reuses the store."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from browser import dump_dom, render
from rmac.storage.datasets import load_dataset
from rmac.data import LANDMARKS_DEV
from test_report import Elements, colour_count

pytestmark = pytest.mark.slow
RMAC = str(Path(sys.executable).with_name("rmac"))
MAGENTA = (255, 0, 255)


def run_demo(tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([RMAC, "demo", "--store", str(tmp / "store"), "--report", str(tmp / "demo.html")],
                          capture_output=True, text=True, timeout=900, cwd=tmp)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_demo(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_demo_prints_the_table_and_dashboard(demo):
    tmp, proc = demo
    for method in ("mac", "rmac", "mac+aml", "rmac+aml", "rmac+aml+qe"):
        assert re.search(rf"^\s+{re.escape(method)}\s+mAP\s+\d+\.\d\d", proc.stdout, re.M), proc.stdout
    assert f"report: {tmp / 'demo.html'}" in proc.stdout
    assert "dashboard http://" in proc.stderr
    maps = [float(m) for m in re.findall(r"mAP\s+(\d+\.\d\d)", proc.stdout)]
    assert all(0 <= m <= 100 for m in maps) and max(maps) > 80  # real weights: a working system


def test_report_in_chromium_shows_every_query_and_its_boxes(demo):
    tmp, _ = demo
    ds = load_dataset(str(LANDMARKS_DEV))
    html = (tmp / "demo.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    probe = tmp / "probe.html"
    probe.write_text(html.replace("</body>", "<script>addEventListener('load', () => document.body.dataset"
                                  ".decoded = [...document.images].filter(i => i.complete && i.naturalWidth > 0)"
                                  ".length)</script></body>"), encoding="utf-8")
    dom = Elements(dump_dom(probe))
    sections = dom.find("section", "query")
    assert len(sections) == len(ds.queries) == 29
    n_images = 0
    for q, s in zip(ds.queries, sections):
        hits = dom.find("figure", "hit", s["id"])
        assert 1 <= len(hits) <= 8
        assert len(dom.find("img", section=s["id"])) == 1 + len(hits)
        n_images += 1 + len(hits)
        ids = [h["data-id"] for h in hits]
        assert not set(ids) & set(q.junk)  # junk is not shown
        for h in hits:
            assert h["class"] == "hit " + ("positive" if h["data-id"] in q.ok else "negative")
        # one query box plus an AML box on every shown hit (all are in the re-ranked top N)
        assert len(dom.find("div", "box", s["id"])) == 1 + len(hits)
    assert dom.find("body")[0]["data-decoded"] == str(n_images), "every image decodes in the browser"
    # the easy case holds: the first hit of most queries is a positive
    first = [dom.find("figure", "hit", s["id"])[0]["class"] for s in sections]
    assert sum(c.endswith("positive") for c in first) >= 20

    shot = render(tmp / "demo.html", tmp / "demo.png", width=1400, height=2400)
    assert Image.open(shot).size == (1400, 2400)
    assert colour_count(shot, MAGENTA) > 2000, "the localised boxes are drawn in magenta"


def test_rerun_reuses_the_store(demo):
    tmp, first = demo
    parts = sorted((tmp / "store" / "parts").glob("p*.json"))
    before = {p: p.stat().st_mtime_ns for p in parts}
    proc = run_demo(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in parts} == before, "no image extracted twice"
    table = lambda out: re.findall(r"^\s+\S+\s+mAP.*$", out, re.M)
    assert table(proc.stdout) == table(first.stdout), "same results from the reused store"
