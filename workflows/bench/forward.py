"""`rmac bench forward`: the extractor's forward pass as rmac runs it (`for_inference`: batch norms folded,
centred SAME padding left to the convolution, activations in place) against the network's own package
modules, on the same query crops, in one process, alternating rounds.

Both models are in channels-last memory format (as `load_backbone` gives them), so the ratio is the
rewrite's alone. The query crops are the embedded dev queries cut as `rmac search` cuts them
(`crop_query`: the whole photo at the database scale, then the box). Also reported: the largest
difference between the two models' activations (float rounding only).
"""
from __future__ import annotations

import argparse
import statistics
import time

from rmac.data import LANDMARKS_DEV
from rmac.workflows.args import positive_int
from rmac.workflows.bench.machine import machine


def bench_forward(n_queries: int = 16, rounds: int = 4, threads: int | None = None,
                  backbone: str = "efficientnet-lite0", max_size: int = 1024) -> dict:
    """Seconds per round (every crop once) of each model, alternating; medians and their ratio."""
    import torch

    from rmac.ops.backbones import crop_query, preprocess
    from rmac.storage.datasets import load_dataset
    from rmac.storage.images import load_image
    from rmac.storage.weights import load_backbone

    if threads:
        torch.set_num_threads(threads)
    ours, spec = load_backbone(backbone)
    package, _ = load_backbone(backbone, fast=False)
    ds = load_dataset(str(LANDMARKS_DEV))
    crops = [crop_query(load_image(str(ds.image_paths[q.image])), q.bbox, max_size) for q in ds.queries[:n_queries]]
    inputs = [preprocess(c, spec, max_size).contiguous(memory_format=torch.channels_last) for c in crops]
    models = {"package": package, "for_inference": ours}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        diff = max(float((ours(x) - package(x)).abs().max()) for x in inputs)  # also the warm-up
        for _ in range(rounds):  # alternate, so that a change of load hits both alike
            for name, model in models.items():
                t = time.perf_counter()
                for x in inputs:
                    model(x)
                seconds[name].append(time.perf_counter() - t)
    med = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        "bench": "forward", "machine": machine(), "backbone": backbone, "max_size": max_size,
        "queries": len(inputs), "rounds": rounds, "threads": torch.get_num_threads(),
        "package_s": round(med["package"], 3), "for_inference_s": round(med["for_inference"], 3),
        "ratio_for_inference_over_package": round(med["for_inference"] / med["package"], 3),
        "max_abs_activation_difference": diff,
        "runs": {name: [round(v, 3) for v in s] for name, s in seconds.items()},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=positive_int, default=16, help="first N dev queries (default 16)")
    p.add_argument("--rounds", type=positive_int, default=4, help="alternating rounds of each model (default 4)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's own)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--max-size", type=positive_int, default=1024)


def run(args: argparse.Namespace) -> dict:
    return bench_forward(args.queries, args.rounds, args.threads, args.backbone, args.max_size)
