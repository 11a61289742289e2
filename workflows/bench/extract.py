"""`rmac bench extract`: extraction against a plain single-process torch loop over the same photos, in one run.

Two comparisons, side by side:
* **whole command**: `rmac extract LIST --store TMP --workers N` run as a user runs it (a new process:
  imports, LocalCluster start, model loads, extraction, store writes, cluster shutdown), wall clock, against
  the plain loop's own seconds (the loop only, as the issue's goal states it: torch's defaults and the network
  as its package defines it), against the plain script as a whole (its imports and model load included), and
  against the plain loop given the command's model (channels-last memory format, batch norms folded:
  `rmac.ops.backbones.for_inference`), which leaves the command's own overhead alone;
* **steady** (``--steady``): the Dask extraction on an already started cluster with warm models, against the
  plain loop: throughput without start-up.
The plain loop runs in its own process (`python -m rmac.workflows.bench.extract --plain ...`), so that it
pays its own imports, as the command does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rmac.data import LANDMARKS_DEV
from rmac.workflows.bench.machine import machine
from rmac.storage.images import MIN_SIDE
from rmac.workflows.args import int_range, positive_int


def plain_loop(items: list[tuple[str, str]], backbone: str, max_size: int, random_weights: bool) -> float:
    """Seconds for a plain single-process torch loop: load, forward, MAC (torch's own threading)."""
    return plain_script(items, backbone, max_size, random_weights)["loop_s"]


def plain_script(items: list[tuple[str, str]], backbone: str, max_size: int, random_weights: bool,
                 channels_last: bool = False) -> dict:
    """The plain loop with its start-up: seconds to import torch and the backbone code, to load the model
    (one warm-up image included, like a worker's first image), and for the loop over ``items``.

    Plain means torch's defaults: the network as its package defines it (batch norms, padding copies), in
    torch's default (contiguous) memory format, as a user's own loop would have it; ``channels_last`` gives
    it the model `rmac extract` uses (channels-last, `for_inference`), so that the comparison isolates
    the command's own overhead."""
    t = time.perf_counter()
    from rmac.ops.backbones import activations
    from rmac.ops.pooling import mac
    from rmac.storage.images import BadImage, load_image
    from rmac.storage.weights import load_backbone

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    import torch

    model, spec = load_backbone(backbone, random_weights=random_weights, fast=channels_last)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    activations(model, spec, load_image(items[0][1]), max_size=max_size)  # warm-up, like the workers'
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    for _, path in items:
        try:
            mac(activations(model, spec, load_image(path), max_size=max_size))
        except BadImage:
            pass
    return {"import_s": import_s, "model_s": model_s, "loop_s": time.perf_counter() - t}


def _images(n_images: int | None) -> list[tuple[str, str]]:
    from rmac.storage.images import list_images

    items = list_images(str(LANDMARKS_DEV / "jpg"))
    return items[:n_images] if n_images else items


def _run_plain(list_file: Path, backbone: str, max_size: int, random_weights: bool,
               channels_last: bool = False) -> dict:
    """The plain script in a fresh process; its phases, and its wall clock from process start."""
    cmd = [sys.executable, "-m", "rmac.workflows.bench.extract", "--plain", str(list_file), "--backbone", backbone,
           "--max-size", str(max_size)] + (["--random-weights"] if random_weights else []) \
        + (["--channels-last"] if channels_last else [])
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t
    return res


def _run_command(list_file: Path, store: Path, backbone: str, max_size: int, workers: int | None,
                 random_weights: bool) -> float:
    """Wall seconds of `rmac extract` as a whole (a new process, its own LocalCluster)."""
    rmac = Path(sys.executable).parent / "rmac"
    cmd = [str(rmac), "extract", str(list_file), "--store", str(store), "--backbone", backbone,
           "--max-size", str(max_size)] + (["--workers", str(workers)] if workers else []) \
        + (["--random-weights"] if random_weights else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"rmac extract failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def bench_extract(n_images: int | None = None, backbone: str = "efficientnet-lite0", max_size: int = 1024,
                  workers: int | None = None, random_weights: bool = False, repeat: int = 1,
                  steady: bool = False, channels_last: bool = True) -> dict:
    """The whole `rmac extract` command (and, with ``steady``, the warm Dask extraction) against the
    plain torch loop over the same photos, and (``channels_last``) against the plain loop given the
    command's model (channels-last, batch norms folded); medians over ``repeat`` alternating runs."""
    items = _images(n_images)
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-"))
    try:
        list_file = tmp / "images.txt"
        list_file.write_text("".join(f"{p}\n" for _, p in items))
        plain, command, plain_cl = [], [], []
        for r in range(repeat):  # alternate, so that a change of load hits both alike
            plain.append(_run_plain(list_file, backbone, max_size, random_weights))
            if channels_last:
                plain_cl.append(_run_plain(list_file, backbone, max_size, random_weights, channels_last=True))
            command.append(_run_command(list_file, tmp / f"store-{r}", backbone, max_size, workers, random_weights))
            shutil.rmtree(tmp / f"store-{r}", ignore_errors=True)
        n = len(items)
        loop_s = statistics.median(p["loop_s"] for p in plain)
        plain_whole_s = statistics.median(p["process_s"] for p in plain)
        command_s = statistics.median(command)
        out = {"machine": machine(), "backbone": backbone, "max_size": max_size, "images": n,
               "workers": workers or len(os.sched_getaffinity(0)), "repeat": repeat,
               "plain_import_s": round(statistics.median(p["import_s"] for p in plain), 2),
               "plain_model_s": round(statistics.median(p["model_s"] for p in plain), 2),
               "plain_loop_s": round(loop_s, 2), "plain_process_s": round(plain_whole_s, 2),
               "plain_images_per_s": round(n / loop_s, 2),
               "command_s": round(command_s, 2), "command_images_per_s": round(n / command_s, 2),
               "ratio_command_over_plain_loop": round(loop_s / command_s, 3),
               "ratio_command_over_plain_process": round(plain_whole_s / command_s, 3),
               "runs": {"plain_loop_s": [round(p["loop_s"], 2) for p in plain],
                        "command_s": [round(c, 2) for c in command]}}
        if plain_cl:
            cl_s = statistics.median(p["loop_s"] for p in plain_cl)
            out.update({"plain_channels_last_loop_s": round(cl_s, 2),
                        "ratio_command_over_plain_channels_last_loop": round(cl_s / command_s, 3)})
            out["runs"]["plain_channels_last_loop_s"] = [round(p["loop_s"], 2) for p in plain_cl]
        if steady:
            out.update(_steady(items, tmp, backbone, max_size, workers, random_weights, loop_s))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _steady(items, tmp: Path, backbone: str, max_size: int, workers: int | None, random_weights: bool,
            loop_s: float) -> dict:
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract, worker_model

    choice = ModelChoice(backbone, random_weights=random_weights)
    with get_client(n_workers=workers, quiet=True) as client:
        client.run(worker_model, choice)  # model load is start-up, not throughput: as in the loop
        t = time.perf_counter()
        summary = extract(items, str(tmp / "steady-store"), client, choice, max_size, progress=False)
        dask_s = time.perf_counter() - t
    return {"steady_dask_images_per_s": round(len(items) / dask_s, 2),
            "ratio_steady_dask_over_plain_loop": round(loop_s / dask_s, 3),
            "map_bytes_per_image": summary["map_bytes_per_image"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=None, help="the first N embedded photos (default: all)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--max-size", type=int_range(MIN_SIDE, 65536), default=1024)
    p.add_argument("--workers", type=positive_int)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--repeat", type=positive_int, default=1, help="alternating runs of each; medians (default 1)")
    p.add_argument("--steady", action="store_true", help="also the warm Dask extraction on a started cluster")
    p.add_argument("--no-channels-last-loop", dest="channels_last", action="store_false",
                   help="skip the plain loop given the command's model (channels-last, batch norms folded: the overhead-only ratio)")


def run(args: argparse.Namespace) -> dict:
    return bench_extract(args.images, args.backbone, args.max_size, args.workers, args.random_weights,
                         args.repeat, args.steady, args.channels_last)


if __name__ == "__main__":  # the plain script, run in its own process by `_run_plain`
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", required=True)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--max-size", type=int, default=1024)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    paths = [ln for ln in Path(a.plain).read_text().splitlines() if ln]
    print(json.dumps(plain_script([(p, p) for p in paths], a.backbone, a.max_size, a.random_weights,
                                  a.channels_last)))
