"""The report of `rmac paper`: `DIR/report.md` (a results section: tables with captions, figures with
labelled axes, one sentence per result against the paper), `DIR/paper/*.png` and `DIR/results.json`
(every number of the report). Only the paper's own figures (`reference.py`) are typed by hand, and
they are labelled as the paper's; every other number is read from the results."""
from __future__ import annotations

import json
from pathlib import Path

from rmac.workflows.paper import reference as ref
from rmac.workflows.paper.table1_rmac import metric

FIG_DIR = "paper"  # figures go to DIR/paper/, linked relatively from DIR/report.md

METHOD_NAMES = {"mac": "MAC", "rmac": "R-MAC", "mac+aml": "MAC+AML", "rmac+aml": "R-MAC+AML",
                "rmac+aml+qe": "R-MAC+AML+QE", "crossmatch": "cross-matching", "crossmatch+aml": "cross-matching+AML"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cmp(ours: float, paper: float) -> str:
    d = ours - paper
    return "the same as" if abs(d) < 0.05 else (f"{abs(d):.1f} above" if d > 0 else f"{abs(d):.1f} below")


def _prov(sec: dict) -> str:
    p = sec.get("provenance", {})
    settings = ", ".join(f"{k}={v}" for k, v in p.get("settings", {}).items())
    return (f"*Produced by* `{p.get('command', '')}` → {p.get('function', '')}"
            + (f"; settings: {settings}." if settings else "."))


# ------------------------------------------------------------------------------------------ figures
def plot_figure3(f3: dict, out_dir: Path) -> list[str]:
    plt = _plt()
    names = []
    err = f3["error"]
    fig, ax = plt.subplots(figsize=(6, 4))
    cells = [b["cells_mean"] for b in err["bins"]]
    for a in err["alphas"]:
        ax.plot(cells, [b["rel_error"][str(a)] for b in err["bins"]], marker="o", label=f"α = {a:g}")
        ax.plot(cells, [n ** (1 / a) - 1 for n in cells], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size of the response set (cells in the region)")
    ax.set_ylabel("mean relative error (f̃ − f) / f")
    ax.set_title("Generalised mean vs maximum (dashed: bound n^(1/α) − 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "figure3-error.png", dpi=120)
    plt.close(fig)
    names.append("figure3-error.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for path, label in (("float", "float path, α = 10"), ("lut", "LUT path (31 levels), α = 10")):
        c = f3["cosine"][path]
        edges = c["hist_edges"]
        total = sum(c["hist_counts"])
        ax.stairs([v / total for v in c["hist_counts"]], edges, label=f"{label} (median {c['median']:.4f})")
    ax.set_xlabel("cosine(exact f_R, approximate f̃_R)")
    ax.set_ylabel("fraction of regions")
    ax.set_yscale("log")
    ax.set_title(f"All regions of {len(f3['images'])} images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "figure3-cosine.png", dpi=120)
    plt.close(fig)
    names.append("figure3-cosine.png")
    return names


def plot_figure4(f4: dict, out_dir: Path) -> str:
    plt = _plt()
    panels = list(f4["curves"].items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, c) in zip(axes[0], panels):
        for m, pts in c["methods"].items():
            ax.plot([p["N"] for p in pts], [p["map"] for p in pts], marker="o", label=METHOD_NAMES[m])
        ax.set_xlabel("number of re-ranked images N")
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"{label} ({c['n_images']} images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "figure4.png", dpi=120)
    plt.close(fig)
    return "figure4.png"


# ------------------------------------------------------------------------------------------ sections
def _table1_aml(t1: dict) -> list[str]:
    ratios = sorted({r["s"] for r in t1["rows"]})
    steps = sorted({r["t"] for r in t1["rows"]})
    head = "| t | " + " | ".join(f"s={s:g} IoU | %W | paper IoU | paper %W" for s in ratios) + " |"
    lines = ["## Table 1 (left): AML against exhaustive search", "",
             f"*Table 1 (left).* Mean IoU (%) of AML's window with the exhaustive optimum and % of windows "
             f"scored (%W), over {t1['pairs']} (query, positive) pairs of {t1['queries']} queries; "
             f"maps of {t1['channels']} channels, {t1['map_cells_mean']:.0f} cells on average. "
             f"\"paper\" columns: the paper's Table 1 (Oxford5k, AlexNet).", "", head,
             "|" + "---|" * (1 + 4 * len(ratios))]
    for t in steps:
        cells = []
        for s in ratios:
            r = next(x for x in t1["rows"] if x["t"] == t and x["s"] == s)
            p = ref.TABLE1_AML.get((t, s), (None, None))
            cells += [_f(r["iou"]), _f(r["pct_windows"], 2), _f(p[0]), _f(p[1])]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    r = next((x for x in t1["rows"] if x["t"] == 3 and x["s"] == 1.1), None)
    if r:
        p = ref.TABLE1_AML[(3, 1.1)]
        lines += ["", f"At the re-ranking setting t = 3, s = 1.1, AML's window overlaps the optimum by IoU "
                      f"{r['iou']:.1f} ({_cmp(r['iou'], p[0])} the paper's {p[0]}) while scoring {r['pct_windows']:.2f} % "
                      f"of the windows (paper: {p[1]} %), in {r['time_ratio']:.3f}× the exhaustive search's time "
                      f"(paper: about 1/{ref.AML_SPEEDUP})."]
    return lines + ["", _prov(t1), ""]


def _table1_rmac(t: dict) -> list[str]:
    levels = sorted({int(L) for row in t["rows"] for L in row["rmac"]})
    Lm = t["L_for_mac"]
    lines = ["## Table 1 (right): MAC and R-MAC against input size and L", "",
             f"*Table 1 (right).* mAP (%) of whitened MAC (with the whitening fitted for L = {Lm}) and of R-MAC "
             f"with L = {', '.join(map(str, levels))}, filtering only, per input size (longer side, px). "
             "Rows marked \"paper\": the paper's Table 1 (Oxford5k).", "",
             "| network | size | MAC | " + " | ".join(f"R-MAC L={L}" for L in levels) + " |",
             "|---|---|---|" + "---|" * len(levels)]
    for row in t["rows"]:
        lines.append(f"| ours | {row['max_size']} | {_f(row['mac'][Lm])} | "
                     + " | ".join(_f(row["rmac"][L]) for L in levels) + " |")
    for (net, size), p in ref.TABLE1_RMAC.items():
        lines.append(f"| paper, {net} | {size} | {p['mac']} | " + " | ".join(_f(p["rmac"].get(L)) for L in levels) + " |")
    pv = ref.TABLE1_RMAC[("vgg16", 1024)]
    best = max(t["rows"], key=lambda r: max(r["rmac"].values()))
    bestL = max(best["rmac"], key=best["rmac"].get)
    gain = best["rmac"][bestL] - best["mac"][Lm]
    sizes = sorted(t["rows"], key=lambda r: r["max_size"])
    lines += ["", f"The best R-MAC is L = {bestL} at {best['max_size']} px ({best['rmac'][bestL]:.1f}), "
                  f"{abs(gain):.1f} points {'above' if gain >= 0 else 'below'} MAC at that size (paper, VGG16 at 1024 px: "
                  f"L = 3 is {pv['rmac'][3] - pv['mac']:.1f} points above MAC)."]
    if len(sizes) > 1 and Lm in sizes[0]["rmac"] and Lm in sizes[-1]["rmac"]:
        d = sizes[-1]["rmac"][Lm] - sizes[0]["rmac"][Lm]
        lines.append(f"Going from {sizes[0]['max_size']} to {sizes[-1]['max_size']} px changes R-MAC (L = {Lm}) by "
                     f"{d:+.1f} points (paper, VGG16, L = 3: {pv['rmac'][3] - ref.TABLE1_RMAC[('vgg16', 724)]['rmac'][3]:+.1f} "
                     "from 724 to 1024 px).")
    lines += ["", "Commands, one per cell: " + "; ".join(
        f"{row['max_size']} px, L = {L}: `{c}`" for row in t["rows"] for L, c in row["commands"].items()), ""]
    return lines + [_prov(t), ""]


def _figure3(f3: dict, figs: list[str]) -> list[str]:
    err, cos = f3["error"], f3["cosine"]
    a10 = next((a for a in err["alphas"] if a == 10), err["alphas"][0])
    small = next((b for b in err["bins"] if b["cells_lo"] >= 2), err["bins"][0])  # 1 cell: f~ = f exactly
    large = err["bins"][-1]
    lines = ["## Figure 3: the generalised mean as an approximation of the maximum", "",
             f"![Figure 3 (middle)]({FIG_DIR}/{figs[0]})", "",
             f"*Figure 3 (middle).* Mean relative error of f̃ = (Σ x^α)^(1/α) against the maximum, per α, "
             f"against the number of cells in the region ({err['regions']} sampled regions of "
             f"{len(f3['images'])} database images). The paper plots the absolute error on AlexNet responses "
             "in [0, 151]; the error here is relative, so that it does not depend on the backbone's range.", "",
             f"![Figure 3 (right)]({FIG_DIR}/{figs[1]})", "",
             f"*Figure 3 (right).* Distribution of cos(f_R, f̃_R) over all {cos['float']['regions']} regions "
             "of the same images, α = 10: float path, and the LUT path that re-ranking uses.", "",
             "| path | regions | mean | median | 5th percentile | min |", "|---|---|---|---|---|---|"]
    for path in ("float", "lut"):
        c = cos[path]
        lines.append(f"| {path} | {c['regions']} | {c['mean']:.5f} | {c['median']:.5f} | {c['p5']:.5f} | {c['min']:.5f} |")
    lines += ["", f"As in the paper, a larger α approximates better and larger response sets worse: at α = {a10:g} "
                  f"the relative error grows from {small['rel_error'][str(a10)]:.3f} ({small['cells_lo']}–"
                  f"{small['cells_hi'] - 1} cells) to {large['rel_error'][str(a10)]:.3f} "
                  f"({large['cells_lo']}–{large['cells_hi'] - 1} cells).",
              f"The approximate region vectors are nearly parallel to the exact ones (median cosine "
              f"{cos['float']['median']:.4f} on the float path, {cos['lut']['median']:.4f} on the LUT path), "
              f"the paper's finding that α = {ref.FIGURE3_ALPHA} is \"very precise\".", "", _prov(f3), ""]
    return lines


def _figure4(f4: dict, fig: str) -> list[str]:
    lines = ["## Figure 4: mAP against the number of re-ranked images", "",
             f"![Figure 4]({FIG_DIR}/{fig})", "",
             "*Figure 4.* mAP (%) when AML re-ranks the top N images of MAC or R-MAC filtering (N = 0: "
             "filtering alone), without and with query expansion; N is capped at the database size "
             "(effective N in the table). The paper shows these curves on Oxford105k and Oxford5k + 1M "
             "distractors, without printed numbers.", ""]
    for label, c in f4["curves"].items():
        ns = [p["N"] for p in next(iter(c["methods"].values()))]
        lines += [f"**{label}** ({c['n_images']} images; `{c['command']}`)", "",
                  "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for m, pts in c["methods"].items():
            lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(
                _f(p["map"]) + ("" if p["N_effective"] == p["N"] else f" (N={p['N_effective']})") for p in pts) + " |")
        lines.append("")
        for m in ("mac+aml", "rmac+aml"):
            pts = c["methods"][m]
            lines.append(f"{label}: re-ranking the top {pts[-1]['N_effective']} with AML moves {METHOD_NAMES[m]} from "
                         f"{pts[0]['map']:.1f} to {pts[-1]['map']:.1f} mAP ({pts[-1]['map'] - pts[0]['map']:+.1f}; "
                         "the paper: a consistent gain, larger with R-MAC; +18 % with 1M distractors).")
        lines.append("")
    return lines + [_prov(f4), ""]


def _table2(t2: dict) -> list[str]:
    cols = list(t2["columns"].items())
    paper = t2.get("paper") or {}
    head = "| method | " + " | ".join(f"ours: {label} ({c['n_images']} images)" for label, c in cols)
    sep = "|---|" + "---|" * len(cols)
    if paper:
        head += " | " + " | ".join(f"paper ({paper['network']}): {n}" for n in paper["names"])
        sep += "---|---|"
    lines = ["## Table 2: the five methods", "",
             "*Table 2.* mAP (%) of each method (mP@1/5/10 and the revisited protocols in results.json). "
             + (f"The paper's {paper['network']} figures are given beside ours; \"–\": not reported by the paper."
                if paper else "The paper's figures are for Oxford5k/Paris6k with VGG16/AlexNet; "
                              "this dataset or backbone is not one of them, so none are shown beside ours."),
             "", head + " |", sep]
    for m in t2["methods"]:
        row = f"| {METHOD_NAMES[m]} | " + " | ".join(_f(metric(c["methods"][m])) for _, c in cols)
        if paper:
            row += " | " + " | ".join(_f(paper[k].get(m)) for k in ("dataset", "with distractors"))
        lines.append(row + " |")
    ours = cols[0][1]["methods"]
    p5 = ref.TABLE2["vgg16"]["oxford5k"]
    r, a, q, mc = (metric(ours[k]) for k in ("rmac", "rmac+aml", "rmac+aml+qe", "mac"))
    lines += ["", f"R-MAC is {r - mc:+.1f} points against MAC, AML re-ranking adds {a - r:+.1f} and QE {q - a:+.1f} "
                  f"(the paper's order, VGG16 on Oxford5k: MAC {p5['mac']} < R-MAC {p5['rmac']} < R-MAC+AML+QE {p5['rmac+aml+qe']})."]
    if paper and "rmac+aml+qe" in paper["dataset"]:
        lines.append(f"Against the paper's {paper['network']} R-MAC+AML+QE on {paper['names'][0]}, ours is "
                     f"{_cmp(q, paper['dataset']['rmac+aml+qe'])} it.")
    lines += ["", "Commands: " + "; ".join(f"{label}: `{c['command']}`" for label, c in cols), ""]
    return lines + [_prov(t2), ""]


def _ablations(ab: dict) -> list[str]:
    s, mem = ab["summary"], ab["memory"]
    lines = ["## Section 8: sum-pooling and regional cross-matching", "",
             "*Table 3.* mAP (%) with sum-pooling (α = 1) instead of max-pooling for R-MAC and AML (whitening "
             "re-fitted on the summed regional vectors, same images and dimension), and of regional "
             "cross-matching instead of R-MAC, as filtering and with AML re-ranking. "
             "Paper columns: its Section 8 (VGG16).", "",
             "| method | max-pooling (ours) | sum-pooling (ours) | paper max: Oxf105k / Par106k | paper sum: Oxf105k / Par106k |",
             "|---|---|---|---|---|"]
    for m in ("rmac", "rmac+aml", "rmac+aml+qe"):
        pm = [ref.TABLE2["vgg16"][d].get(m) for d in ("oxford105k", "paris106k")]
        ps = [ref.SUM_POOLING[d].get(m) for d in ("oxford105k", "paris106k")]
        lines.append(f"| {METHOD_NAMES[m]} | {_f(s['max'][m])} | {_f(s['sum'][m])} | "
                     f"{' / '.join(_f(v) for v in pm)} | {' / '.join(_f(v) for v in ps)} |")
    pc = ref.CROSSMATCH["oxford5k"]
    lines += ["", "| method | mAP (ours) | paper, Oxford5k | bytes per image (ours) |", "|---|---|---|---|",
              f"| R-MAC | {_f(s['max']['rmac'])} | {ref.TABLE2['vgg16']['oxford5k']['rmac']} | {mem['bytes_per_image_rmac']:,} |",
              f"| cross-matching | {_f(s['crossmatch'])} | {pc['crossmatch']} | {mem['bytes_per_image_crossmatch']:,.0f} |",
              f"| R-MAC+AML | {_f(s['max']['rmac+aml'])} | – | – |",
              f"| cross-matching+AML | {_f(s['crossmatch+aml'])} | {pc['crossmatch+aml']} | – |", ""]
    d = s["max"]["rmac+aml+qe"] - s["sum"]["rmac+aml+qe"]
    p105 = ref.TABLE2["vgg16"]["oxford105k"]
    lines += [f"Max-pooling is {abs(d):.1f} points {'above' if d >= 0 else 'below'} sum-pooling for R-MAC+AML+QE "
              f"and {s['max']['rmac'] - s['sum']['rmac']:+.1f} for R-MAC (the paper: max-pooling better in all cases, "
              f"e.g. {p105['rmac+aml+qe']} vs {ref.SUM_POOLING['oxford105k']['rmac+aml+qe']} for R-MAC+AML+QE on Oxford105k).",
              f"Cross-matching scores {s['crossmatch']:.1f} as filtering ({s['crossmatch'] - s['max']['rmac']:+.1f} against "
              f"R-MAC; the paper: {pc['crossmatch']} vs {ref.TABLE2['vgg16']['oxford5k']['rmac']}) at {mem['factor']:.1f}× R-MAC's memory ({mem['regions_per_image_mean']:.1f} "
              f"regions of {mem['dim']} floats per image) and {mem['inner_products_per_image']:.0f} inner products per "
              f"image instead of one; AML on top gives {s['crossmatch+aml']:.1f} (the paper: {pc['crossmatch+aml']}).", "",
              _prov(ab), ""]
    return lines


def _localisation(loc: dict) -> list[str]:
    lines = ["## Localisation against the true boxes", ""]
    r = loc.get("result")
    if not r:
        why = ("the ground truth has no boxes for the positives" if not loc.get("has_boxes")
               else "the evaluation returned no localisation")
        return lines + [f"Not measured: {why}. `rmac make-views` writes datasets whose positives carry their "
                        "pasted boxes.", "", _prov(loc), ""]
    po, pp = ref.LOCALISATION["oxford5k"], ref.LOCALISATION["paris6k"]
    groups = [("all positives with a box", r)] + [(name, r[k]) for k, name in
                                                 (("self", "self-pastes (the query photo itself)"),
                                                  ("other", "other photos of the object")) if r.get(k)]
    lines += ["*Table 4.* Mean IoU (%) with the true object boxes over (query, positive) pairs with a known box: "
              "AML's box from R-MAC re-ranking and the exhaustive optimum of the same objective, from "
              "`rmac evaluate`'s localisation output; self-pastes (`rmac make-views --self-pastes`) apart from "
              "pastes of the object's other photos, and for self-pastes the share of pairs at IoU >= 50 % (the "
              "usual detection criterion). Paper: Oxford5k / Paris6k (cross-matching the 5 query images of each "
              "building).", "",
              "| positives | pairs | IoU AML | IoU exhaustive | IoU >= 50 %: AML / exhaustive |", "|---|---|---|---|---|"]
    for name, g in groups:
        share = (f"{_f(g['iou50_aml'])} / {_f(g['iou50_exhaustive'])}" if g.get("iou50_aml") is not None
                 else "–")
        lines.append(f"| {name} | {g.get('pairs', '–')} | {_f(g.get('iou_aml'), 2)} | "
                     f"{_f(g.get('iou_exhaustive'), 2)} | {share} |")
    lines.append(f"| paper, Oxford5k / Paris6k | – | {po['iou_aml']} / {pp['iou_aml']} | "
                 f"{po['iou_exhaustive']} / {pp['iou_exhaustive']} | – |")
    if r.get("iou_aml") is not None and r.get("iou_exhaustive") is not None:
        d = r["iou_exhaustive"] - r["iou_aml"]
        lines += ["", f"AML's box loses {d:.1f} IoU points to the exhaustive optimum ({r['iou_aml']:.1f} vs "
                      f"{r['iou_exhaustive']:.1f}), against the paper's {po['iou_exhaustive'] - po['iou_aml']:.1f} on "
                      f"Oxford5k ({po['iou_aml']} vs {po['iou_exhaustive']}): the search finds what the objective "
                      "prefers."]
    sp = r.get("self")
    if sp and sp.get("iou_aml") is not None:
        lines += [f"On self-pastes, where the true box is exact and the object is the query's own photo, AML's box "
                  f"reaches IoU {sp['iou_aml']:.1f} ({_f(sp.get('iou50_aml'))} % of the pairs at IoU >= 50 %), "
                  f"below the paper's {po['iou_aml']} on real Oxford pairs: the objects here are pasted at 5-40 % of "
                  "the scene, and the best window of the max-pooling objective is larger than the object (see "
                  "docs/benchmarks.md, issue 8)."]
    return lines + ["", _prov(loc), ""]


SECTION_WRITERS = {"table1_aml": _table1_aml, "table1_rmac": _table1_rmac, "table2": _table2,
                   "ablations": _ablations, "localisation": _localisation}


def load_results(path: str | Path) -> dict:
    """A `results.json` back in the form `write_report` takes (JSON turned the R-MAC levels into strings):
    a report can be written again, e.g. after a change of its wording, without re-running anything."""
    results = json.loads(Path(path).read_text())
    for row in results["sections"].get("table1_rmac", {}).get("rows", []):
        for k in ("mac", "rmac"):
            row[k] = {int(L): v for L, v in row[k].items()}
    return results


def write_report(results: dict, out: str | Path) -> Path:
    """Write DIR/report.md, DIR/paper/*.png and DIR/results.json from ``results``; returns the report."""
    out = Path(out)
    (out / FIG_DIR).mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    meta, secs = results["meta"], results["sections"]
    lines = [f"# Results: {meta['dataset_name']}", "",
             f"Every number below was produced by `{meta['command']}` ({meta['backbone']}, "
             f"{meta['n_images']} database images, {meta['n_queries']} queries; whitening: {meta['whitening']}) "
             f"on {meta['machine']}, started {meta['started']}, {meta['seconds']:.0f} s in all. "
             "Each table names the command and settings behind it; all numbers are also in "
             "[results.json](results.json). Numbers labelled \"paper\" are the paper's own "
             f"({ref.CITATION}), the only ones typed by hand.", ""]
    order = ("table1_aml", "table1_rmac", "figure3", "figure4", "table2", "ablations", "localisation")
    for name in order:
        if name not in secs:
            continue
        sec = secs[name]
        if "skipped" in sec:
            lines += [f"## {name}", "", f"Not run: {sec['skipped']}.", ""]
        elif name == "figure3":
            lines += _figure3(sec, plot_figure3(sec, out / FIG_DIR))
        elif name == "figure4":
            lines += _figure4(sec, plot_figure4(sec, out / FIG_DIR))
        else:
            lines += SECTION_WRITERS[name](sec)
    missing = meta.get("missing", [])
    if missing:
        lines += ["## Not in this report", ""] + [f"- {m}" for m in missing] + [""]
    lines += ["## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in meta["timings"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
