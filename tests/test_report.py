"""The report pictures, checked on real photos: PNG pixels, and the HTML as headless Chromium renders it."""
import base64
import copy
import html
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from browser import dump_dom, render
from rmac.data import LANDMARKS_DEV
from rmac.workflows.report import BLUE, GREEN, MAGENTA, RED, draw_hits_png, write_html_report

JPG = LANDMARKS_DEV / "jpg"
ODD_NAME = 'aero <1> & "co"</section><script>alert(1)</script>'


def size_hw(name):
    w, h = Image.open(JPG / name).size
    return [h, w]


def hit(name, score, box, positive, initial, rank, scale=1):
    h, w = size_hw(name)
    return {"id": name.removesuffix(".jpg"), "path": str(JPG / name), "score": score, "box": box,
            "image_hw": [h * scale, w * scale], "positive": positive, "initial_rank": initial, "rank": rank}


@pytest.fixture(scope="module")
def queries():
    return [
        {"name": "christ_1", "image": str(JPG / "christ_1.jpg"), "bbox": [300, 40, 560, 480],
         "image_hw": size_hw("christ_1.jpg"),
         "hits": [hit("christ_2.jpg", 0.81, [100, 20, 230, 180], True, 4, 0),
                  hit("aero_1.jpg", 0.52, [-40, -40, 700, 300], False, 0, 1),   # clipped to the image
                  hit("distractor_001.jpg", 0.40, None, None, None, 2)]},
        {"name": ODD_NAME, "image": str(JPG / "aero_1.jpg"), "bbox": [100, 120, 500, 400],
         "image_hw": size_hw("aero_1.jpg"),
         # boxes given on a 2x larger image than the file: they must be scaled by image_hw
         "hits": [hit("aero_2.jpg", 0.77, [200, 200, 1000, 800], True, 2, 0, scale=2),
                  hit("books_1.jpg", 0.31, [50, 60, 400, 300], False, 1, 1),
                  hit("box_1.jpg", 0.30, [20, 20, 200, 150], None, 7, 2)]},
    ]


TABLE = {"mac": {"map": 51.234, "mp@1": 80.0, "mp@5": 62.5},
         "rmac+aml": {"easy": {"map": 71.2, "mp@1": 90.0}, "medium": {"map": 55.5, "mp@1": 75.0}}}


class Elements(HTMLParser):
    """(tag, attrs, enclosing section id) of every start tag, and the text by section."""

    def __init__(self, text):
        super().__init__()
        self.items, self.section = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        self.items.append((tag, attrs, self.section))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def find(self, tag, cls=None, section=...):
        return [a for t, a, s in self.items if t == tag and (cls is None or cls in a.get("class", "").split())
                and (section is ... or s == section)]


def percent_box(style):
    v = dict(re.findall(r"(left|top|width|height):([\d.]+)%", style))
    return [float(v["left"]), float(v["top"]), float(v["left"]) + float(v["width"]),
            float(v["top"]) + float(v["height"])]


def expected_percent(box, image_hw):
    h, w = image_hw
    return list(np.clip([100 * box[0] / w, 100 * box[1] / h, 100 * box[2] / w, 100 * box[3] / h], 0, 100))


def test_html_is_self_contained_and_escaped(tmp_path, queries):
    path = write_html_report(tmp_path / "sub" / "r.html", "Title <&>", TABLE, queries, notes="notes <b>")
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text and "<link" not in text
    assert ODD_NAME not in text and html.escape(ODD_NAME) in text
    assert "notes &lt;b&gt;" in text and "<title>Title &lt;&amp;&gt;</title>" in text
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 2 + 6
    for src in srcs:
        assert src.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "JPEG" and max(im.size) == 256


def test_html_in_chromium(tmp_path, queries):
    path = write_html_report(tmp_path / "r.html", "rmac report", TABLE, queries)
    text = path.read_text(encoding="utf-8")
    # a test-only copy counts the images Chromium actually decoded; a second one has a broken image
    probe = ("<script>addEventListener('load', () => document.body.dataset.decoded = "
             "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length)</script></body>")
    good, bad = tmp_path / "probe.html", tmp_path / "broken.html"
    good.write_text(text.replace("</body>", probe), encoding="utf-8")
    bad.write_text(re.sub(r"base64,[^\"]+", "base64,AAAA", text.replace("</body>", probe), count=1),
                   encoding="utf-8")
    dom = Elements(dump_dom(good))
    assert dom.find("body")[0]["data-decoded"] == "8"
    assert Elements(dump_dom(bad)).find("body")[0]["data-decoded"] == "7"

    sections = dom.find("section", "query")
    assert [s["id"] for s in sections] == ["q-christ_1", "q-aero-1-co-section-script-alert-1-script"]
    assert not dom.find("script", section=sections[1]["id"])  # the odd name stayed text
    for q, s in zip(queries, sections):
        sid = s["id"]
        figures = dom.find("figure", "hit", sid)
        assert [f["class"] for f in figures] == [
            "hit " + {True: "positive", False: "negative", None: "unknown"}[h["positive"]] for h in q["hits"]]
        assert [f["data-id"] for f in figures] == [h["id"] for h in q["hits"]]
        assert len(dom.find("img", section=sid)) == 1 + len(q["hits"])
        boxes = [percent_box(b["style"]) for b in dom.find("div", "box", sid)]
        expected = [expected_percent(q["bbox"], q["image_hw"])] + [
            expected_percent(h["box"], h["image_hw"]) for h in q["hits"] if h["box"] is not None]
        np.testing.assert_allclose(boxes, expected, atol=1e-3)
    assert len(dom.find("span", "positive")) == 2 and len(dom.find("span", "negative")) == 2

    # the table: one header cell per protocol group, then metrics; one row per method
    heads = dom.find("th")
    assert {"colspan": "2", "scope": "colgroup"} in heads
    rows = re.findall(r"<tr><th scope=\"row\">([^<]+)</th>(.*?)</tr>", text)
    assert [r[0] for r in rows] == ["mac", "rmac+aml"]
    assert re.findall(r"<td>([^<]*)</td>", rows[0][1]) == ["51.23", "80.00", "62.50", "–", "–", "–", "–"]
    assert re.findall(r"<td>([^<]*)</td>", rows[1][1]) == ["–", "–", "–", "71.20", "90.00", "55.50", "75.00"]


def colour_count(png, colour, tol=40):
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(colour)).max(axis=2) <= tol).sum())


def test_boxes_and_borders_are_drawn_by_chromium(tmp_path, queries):
    """Screenshots of the report and of the same report without boxes or labels: the difference in
    magenta / blue / green / red pixels is the drawn boxes' and frames' area."""
    plain = copy.deepcopy(queries)
    for q in plain:
        q["bbox"] = None
        for h in q["hits"]:
            h["box"], h["positive"] = None, None
    shots = {}
    for name, qs in (("report", queries), ("plain", plain)):
        page = write_html_report(tmp_path / f"{name}.html", "rmac report", TABLE, qs)
        shots[name] = render(page, tmp_path / f"{name}.png", width=1600, height=1100)
    assert Image.open(shots["report"]).size == (1600, 1100)

    def ring(wh, f, line):  # pixels of a `line`-wide frame inside the box fraction f of a wh thumbnail
        w, h = (f[2] - f[0]) / 100 * wh[0], (f[3] - f[1]) / 100 * wh[1]
        return w * h - max(w - 2 * line, 0) * max(h - 2 * line, 0)

    def thumb_wh(image_hw):
        h, w = image_hw
        s = 256 / max(h, w)
        return round(w * s), round(h * s)

    expected = {"magenta": 0.0, "blue": 0.0, "green": 0.0, "red": 0.0}
    for q in queries:
        qwh = thumb_wh(size_hw(q["image"].split("/")[-1]))
        expected["blue"] += ring(qwh, expected_percent(q["bbox"], q["image_hw"]), 3)
        for h in q["hits"]:
            wh = thumb_wh(size_hw(h["path"].split("/")[-1]))
            if h["box"] is not None:
                expected["magenta"] += ring(wh, expected_percent(h["box"], h["image_hw"]), 3)
            if h["positive"] is not None:
                frame = (wh[0] + 10) * (wh[1] + 10) - wh[0] * wh[1]
                expected["green" if h["positive"] else "red"] += frame
    colours = {"magenta": MAGENTA, "blue": BLUE, "green": GREEN, "red": RED}
    for name, colour in colours.items():
        drawn = colour_count(shots["report"], colour)
        background = colour_count(shots["plain"], colour)
        assert background < 0.05 * expected[name], (name, background)
        # the red/green marks' text adds a few pixels of the border colour
        assert 0.85 * expected[name] < drawn - background < 1.15 * expected[name], (name, drawn, expected[name])


def test_png_pixels(tmp_path, queries):
    q = queries[1]
    for thumb, line, border in ((256, 3, 6), (128, 2, 3)):
        placed = draw_hits_png(q, q["hits"], tmp_path / f"hits{thumb}.png", thumb=thumb, columns=2)
        a = np.asarray(Image.open(tmp_path / f"hits{thumb}.png").convert("RGB"))
        assert len(placed) == 4 and all(max(w, h) == thumb for _, _, w, h in placed)
        records = [(q["bbox"], q["image_hw"], BLUE, None)] + [
            (h["box"], h["image_hw"], MAGENTA, h["positive"]) for h in q["hits"]]
        for (x, y, w, h), (box, image_hw, colour, positive) in zip(placed, records):
            b = np.array(expected_percent(box, image_hw)) / 100 * [w, h, w, h]
            x1, y1, x2, y2 = (int(round(v)) for v in b)
            x2, y2 = x2 - 1, y2 - 1
            mx, my = x + (x1 + x2) // 2, y + (y1 + y2) // 2
            for px, py in ((x + x1, my), (x + x2, my), (mx, y + y1), (mx, y + y2),          # outer edge
                           (x + x1 + line - 1, my), (mx, y + y2 - line + 1)):               # inner edge
                assert tuple(a[py, px]) == colour, (thumb, box, px, py)
            assert tuple(a[my, x + x1 + line]) != colour  # the line is `line` px wide
            frame = {True: GREEN, False: RED, None: (255, 255, 255)}[positive]
            assert tuple(a[y + h // 2, x - 1]) == frame and tuple(a[y + h // 2, x - border]) == frame
            assert tuple(a[y + h // 2, x + w + border - 1]) == frame
            assert tuple(a[y - border - 1, x + w // 2]) == (255, 255, 255)  # nothing beyond the frame


def test_missing_chromium_is_a_clear_error(monkeypatch, tmp_path):
    import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(browser.os, "access", lambda path, mode: False)
    (tmp_path / "a.html").write_text("<p>x</p>")
    with pytest.raises(browser.BrowserError, match="apt-get install -y chromium"):
        dump_dom(tmp_path / "a.html")
