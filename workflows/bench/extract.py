"""`rmac bench extract`: the Dask extraction (store writes included) against a plain torch loop."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rmac.data import LANDMARKS_DEV
from rmac.workflows.bench.machine import machine
from rmac.storage.images import MIN_SIDE
from rmac.workflows.args import int_range, positive_int


def plain_loop(items: list[tuple[str, str]], backbone: str, max_size: int, random_weights: bool) -> float:
    """Seconds for a plain single-process torch loop: load, forward, MAC (torch's own threading)."""
    from rmac.ops.backbones import activations
    from rmac.ops.pooling import mac
    from rmac.storage.images import BadImage, load_image
    from rmac.storage.weights import load_backbone

    model, spec = load_backbone(backbone, random_weights=random_weights)
    activations(model, spec, load_image(items[0][1]), max_size=max_size)  # warm-up, like the workers'
    t = time.perf_counter()
    for _, path in items:
        try:
            mac(activations(model, spec, load_image(path), max_size=max_size))
        except BadImage:
            pass
    return time.perf_counter() - t


def bench_extract(n_images: int = 96, backbone: str = "efficientnet-lite0", max_size: int = 1024,
                  workers: int | None = None, random_weights: bool = False) -> dict:
    """Images/s of the Dask extraction (store writes included) against a plain torch loop."""
    from rmac.storage.images import list_images
    from rmac.workflows.cluster import get_client
    from rmac.workflows.extract import ModelChoice, extract, worker_model

    items = list_images(str(LANDMARKS_DEV / "jpg"))[:n_images]
    plain_s = plain_loop(items, backbone, max_size, random_weights)
    tmp = Path(tempfile.mkdtemp(prefix="rmac-bench-"))
    try:
        choice = ModelChoice(backbone, random_weights=random_weights)
        with get_client(n_workers=workers, quiet=True) as client:
            client.run(worker_model, choice)  # model load is start-up, not throughput: as in the loop
            t = time.perf_counter()
            summary = extract(items, str(tmp / "store"), client, choice, max_size, progress=False)
            dask_s = time.perf_counter() - t
            n_workers = len(client.scheduler_info()["workers"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(items)
    return {"machine": machine(), "backbone": backbone, "max_size": max_size, "images": n,
            "workers": n_workers, "plain_images_per_s": round(n / plain_s, 2),
            "dask_images_per_s": round(n / dask_s, 2), "ratio_dask_over_plain": round(plain_s / dask_s, 3),
            "map_bytes_per_image": summary["map_bytes_per_image"]}


# -- search --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=96)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--max-size", type=int_range(MIN_SIDE, 65536), default=1024)
    p.add_argument("--workers", type=positive_int)
    p.add_argument("--random-weights", action="store_true")


def run(args: argparse.Namespace) -> dict:
    return bench_extract(args.images, args.backbone, args.max_size, args.workers, args.random_weights)
