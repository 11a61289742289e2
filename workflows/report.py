"""Pictures for people: a query's top hits as a PNG (the paper's Figure 5) and a self-contained HTML report.

Both take query records of this form (boxes in pixels of an image of size ``image_hw``, i.e. the
upright image the features were extracted from; they are scaled to the thumbnails)::

    {"name": "christ_1",
     "image": "path/to/query.jpg",
     "bbox": [x1, y1, x2, y2],          # the query box, drawn in blue; None: the whole image
     "image_hw": [h, w],                # optional: default the file's upright size
     "hits": [{"id": "christ_2",        # shown in the caption
               "path": "path/to/hit.jpg",
               "score": 0.812,
               "box": [x1, y1, x2, y2],  # localised (AML) window, drawn in magenta; None: not localised
               "image_hw": [h, w],       # optional, as above
               "positive": True,         # True: green border, False: red border, None: unknown
               "initial_rank": 11,       # 0-based position after filtering (None: unknown)
               "rank": 0},               # 0-based position after re-ranking
              ...]}

Ranks are 0-based in the records and shown 1-based ("12 → 1"), as in the paper's figure.
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, ImageDraw, ImageFont

from rmac.storage.images import load_image
from rmac.workflows.text import printable

BLUE = (0, 0, 255)
MAGENTA = (255, 0, 255)
GREEN = (0, 176, 0)
RED = (224, 0, 0)
JPEG_QUALITY = 85


# ---------------------------------------------------------------------------- shared helpers

@lru_cache(maxsize=64)
def _thumbnail(path: str, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """The upright image fitted into ``size`` x ``size`` (aspect kept) and its full (h, w)."""
    im = load_image(path)
    w, h = im.size
    s = size / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS), (h, w)


def _box_fractions(box, image_hw, full_hw) -> tuple[float, float, float, float] | None:
    """A pixel box as fractions (left, top, right, bottom) of the image, clipped; None if empty."""
    if box is None:
        return None
    h, w = image_hw if image_hw else full_hw
    x1, y1, x2, y2 = (float(v) for v in box)
    f = (min(max(x1 / w, 0.0), 1.0), min(max(y1 / h, 0.0), 1.0),
         min(max(x2 / w, 0.0), 1.0), min(max(y2 / h, 0.0), 1.0))
    return f if f[2] > f[0] and f[3] > f[1] else None


def _rank_text(hit: dict, arrow: str = "→") -> str:
    final = f"{hit['rank'] + 1}" if hit.get("rank") is not None else "?"
    initial = hit.get("initial_rank")
    return f"{initial + 1} {arrow} {final}" if initial is not None else final


def _status(hit: dict) -> str:
    return {True: "positive", False: "negative"}.get(hit.get("positive"), "unknown")


def _out(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- PNG

def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_hits_png(query: dict, hits: list[dict], out_path: str | os.PathLike, thumb: int = 256,
                  columns: int | None = None) -> list[tuple[int, int, int, int]]:
    """Draw the query (box in blue) then ``hits`` (window in magenta, green/red border for
    positive/negative, caption with id, initial → final rank and score) into one PNG grid.

    columns: tiles per row (default: all in one row, at most 6).
    Returns where each picture was placed, query first: ``(x, y, width, height)`` in the PNG.
    """
    tiles = [(query["image"], query.get("image_hw"), query.get("bbox"), BLUE, None,
              [f"query: {printable(query.get('name', ''))}", ""])]
    for h in hits:
        mark = {True: "  pos", False: "  neg"}.get(h.get("positive"), "")
        tiles.append((h["path"], h.get("image_hw"), h.get("box"), MAGENTA, h.get("positive"),
                      [printable(h.get("id", "")), f"rank {_rank_text(h, '->')}   {float(h['score']):.3f}{mark}"]))
    columns = max(1, columns or min(len(tiles), 6))
    line_w = max(1, round(3 * thumb / 256))   # box lines
    border = max(2, round(6 * thumb / 256))   # positive / negative frame
    pad = border + max(4, thumb // 32)
    font = ImageFont.load_default(size=max(10, round(13 * thumb / 256)))  # few glyphs beyond ASCII: no arrow
    line_h = font.size + 4
    pictures = [_thumbnail(str(t[0]), thumb) for t in tiles]
    cell_w = thumb + 2 * pad
    rows = [pictures[r:r + columns] for r in range(0, len(tiles), columns)]
    row_h = [max(im.height for im, _ in row) + 2 * pad + 2 * line_h for row in rows]
    row_y = [sum(row_h[:r]) for r in range(len(rows))]
    canvas = Image.new("RGB", (columns * cell_w, sum(row_h)), "white")
    draw = ImageDraw.Draw(canvas)
    placed = []
    for i, ((_, image_hw, box, colour, positive, caption), (im, full_hw)) in enumerate(zip(tiles, pictures)):
        im = im.copy()
        tw, th = im.size
        f = _box_fractions(box, image_hw, full_hw)
        if f is not None:
            xy = [round(f[0] * tw), round(f[1] * th), round(f[2] * tw) - 1, round(f[3] * th) - 1]
            ImageDraw.Draw(im).rectangle(xy, outline=colour, width=line_w)
        x0, y0 = (i % columns) * cell_w + pad + (thumb - tw) // 2, row_y[i // columns] + pad
        canvas.paste(im, (x0, y0))
        if positive is not None:
            draw.rectangle([x0 - border, y0 - border, x0 + tw + border - 1, y0 + th + border - 1],
                           outline=GREEN if positive else RED, width=border)
        for j, text in enumerate(caption):
            draw.text((x0, y0 + th + border + 2 + j * line_h), _fit_text(draw, text, font, tw),
                      fill="black", font=font)
        placed.append((x0, y0, tw, th))
    canvas.save(_out(out_path), format="PNG")
    return placed


# ---------------------------------------------------------------------------- HTML

def _css(thumb: int) -> str:
    hexc = "#{:02x}{:02x}{:02x}".format
    return f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
.notes {{ white-space: pre-wrap; max-width: 80em; }}
table.results {{ border-collapse: collapse; margin: 12px 0 28px; }}
table.results th, table.results td {{ border: 1px solid #bbb; padding: 3px 10px; }}
table.results td {{ text-align: right; font-variant-numeric: tabular-nums; }}
table.results th[scope=row] {{ text-align: left; }}
section.query {{ margin: 0 0 32px; }}
.hits {{ display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }}
figure {{ margin: 0; width: {thumb + 10}px; }}
.thumb {{ position: relative; display: inline-block; line-height: 0; border: 5px solid transparent; }}
.thumb img {{ display: block; }}
.box {{ position: absolute; box-sizing: border-box; border: 3px solid {hexc(*MAGENTA)}; }}
figure.query-image .box {{ border-color: {hexc(*BLUE)}; }}
figure.positive .thumb {{ border-color: {hexc(*GREEN)}; }}
figure.negative .thumb {{ border-color: {hexc(*RED)}; }}
figcaption {{ font-size: 12px; line-height: 1.35; margin-top: 3px; overflow-wrap: anywhere; }}
.mark.positive {{ color: {hexc(*GREEN)}; font-weight: bold; }}
.mark.negative {{ color: {hexc(*RED)}; font-weight: bold; }}
"""


@lru_cache(maxsize=512)
def _jpeg_data_uri(path: str, size: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
    im, full_hw = _thumbnail(path, size)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.size, full_hw


def _picture(path, image_hw, box, alt: str, thumb: int) -> str:
    """The thumbnail with its box as a div positioned in percent, so it scales with the image."""
    uri, (tw, th), full_hw = _jpeg_data_uri(str(path), thumb)
    parts = [f'<div class="thumb"><img src="{uri}" width="{tw}" height="{th}" alt="{html.escape(alt)}">']
    f = _box_fractions(box, image_hw, full_hw)
    if f is not None:
        parts.append(f'<div class="box" style="left:{100 * f[0]:.3f}%;top:{100 * f[1]:.3f}%;'
                     f'width:{100 * (f[2] - f[0]):.3f}%;height:{100 * (f[3] - f[1]):.3f}%"></div>')
    parts.append("</div>")
    return "".join(parts)


def _flatten(d: dict, prefix: tuple = ()) -> Iterable[tuple[tuple, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return html.escape(str(v))


def _table_html(table: dict[str, dict]) -> str:
    """Rows = methods; columns = the union of their (possibly nested) metric keys, grouped in
    header rows by prefix (e.g. protocol, then metric)."""
    rows = {str(m): dict(_flatten(v)) if isinstance(v, dict) else {("value",): v} for m, v in table.items()}
    cols: list[tuple] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    depth = max((len(c) for c in cols), default=1)
    head = []
    for level in range(depth):
        cells = ['<th scope="col" rowspan="%d">method</th>' % depth] if level == 0 else []
        i = 0
        while i < len(cols):
            c = cols[i]
            if len(c) <= level:
                i += 1
                continue
            if len(c) == level + 1:  # a leaf: spans the header rows below it
                cells.append(f'<th scope="col" rowspan="{depth - level}">{html.escape(c[level])}</th>')
                i += 1
                continue
            j = i
            while j < len(cols) and len(cols[j]) > level + 1 and cols[j][:level + 1] == c[:level + 1]:
                j += 1
            cells.append(f'<th scope="colgroup" colspan="{j - i}">{html.escape(c[level])}</th>')
            i = j
        head.append("<tr>" + "".join(cells) + "</tr>")
    body = ["<tr>" + f'<th scope="row">{html.escape(m)}</th>' + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols)
            + "</tr>" for m, r in rows.items()]
    return ('<table class="results"><thead>' + "".join(head) + "</thead><tbody>" + "".join(body)
            + "</tbody></table>")


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "query"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    taken.add(slug)
    return slug


def _hit_html(h: dict, thumb: int) -> str:
    status = _status(h)
    mark = {"positive": "✓ positive", "negative": "✗ negative"}.get(status)
    ident = printable(h.get("id", ""))
    attrs = (f'data-id="{html.escape(ident)}" data-rank="{h.get("rank")}" '
             f'data-initial-rank="{h.get("initial_rank")}" data-score="{float(h["score"]):.6f}"')
    caption = [f'<span class="mark {status}">{mark}</span><br>' if mark else "",
               f'<span class="id">{html.escape(ident)}</span><br>',
               f'score {float(h["score"]):.3f} · rank {html.escape(_rank_text(h))}']
    return (f'<figure class="hit {status}" {attrs}>'
            + _picture(h["path"], h.get("image_hw"), h.get("box"), ident, thumb)
            + "<figcaption>" + "".join(caption) + "</figcaption></figure>")


def _query_html(q: dict, slug: str, thumb: int) -> str:
    name = printable(q.get("name", ""))
    parts = [f'<section class="query" id="q-{slug}">', f"<h2>{html.escape(name)}</h2>", '<div class="hits">',
             '<figure class="query-image">', _picture(q["image"], q.get("image_hw"), q.get("bbox"), name, thumb),
             f"<figcaption>query: {html.escape(name)}</figcaption></figure>"]
    parts += [_hit_html(h, thumb) for h in q.get("hits", [])]
    parts.append("</div>")
    if not q.get("hits"):
        parts.append('<p class="empty">no hits</p>')
    parts.append("</section>")
    return "\n".join(parts)


def write_html_report(out_path: str | os.PathLike, title: str, table: dict, queries: list[dict],
                      notes: str = "", thumb: int = 256) -> Path:
    """Write one self-contained HTML file (no script, no external resource): the metrics ``table``
    (``{method: {metric: value}}`` or ``{method: {protocol: {metric: value}}}``), ``notes``, then a
    ``<section class="query" id="q-NAME">`` per query record (schema in the module docstring)
    with the query and its hits as ``<figure class="hit positive|negative|unknown">``, each
    thumbnail (base64 JPEG, ``thumb`` px on its longer side) carrying its box as ``<div class="box">``.
    """
    taken: set[str] = set()
    doc = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(printable(title))}</title>", f"<style>{_css(thumb)}</style></head><body>",
           f"<h1>{html.escape(printable(title))}</h1>"]
    if notes:
        doc.append(f'<p class="notes">{html.escape(notes)}</p>')
    if table:
        doc.append(_table_html(table))
    doc += [_query_html(q, _slug(str(q.get("name", "")), taken), thumb) for q in queries]
    doc.append("</body></html>")
    path = _out(out_path)
    path.write_text("\n".join(doc), encoding="utf-8")
    return path
