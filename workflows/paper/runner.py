"""What every experiment of `rmac paper` shares: the settings, the cached stores (one extraction per
backbone and input size) and the evaluations run through `rmac.workflows.evaluate.evaluate`, each run
once per process and labelled with the command line that reproduces it."""
from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmac.storage.datasets import Dataset, load_dataset
from rmac.workflows.evaluate import METHODS, Evaluation, evaluate, whitening_subset
from rmac.workflows.extract import ModelChoice
from rmac.workflows.index import DEFAULT_L

SECTIONS = ("table1_aml", "table1_rmac", "figure3", "figure4", "table2", "ablations", "localisation")


@dataclass(frozen=True)
class PaperSettings:
    """Every knob of `rmac paper` (written into the report's JSON)."""

    dataset: str
    out: str
    choice: ModelChoice = ModelChoice()
    max_size: int = 1024  # the main experiments (Table 2, Figure 4, ablations, localisation)
    sizes: tuple[int, ...] = (724, 1024)  # Table 1 (right)
    levels: tuple[int, ...] = (1, 2, 3, 4)  # R-MAC's L in Table 1 (right)
    L: int = DEFAULT_L
    top_ns: tuple[int, ...] = (0, 50, 100, 200, 500, 1000)  # Figure 4; the largest is Table 2's N
    qe: int = 5
    steps: tuple[int, ...] = (1, 2, 3, 4, 5)  # Table 1 (left)
    ratios: tuple[float, ...] = (1.1, 1.5, 2.0)
    fig3_images: int = 10
    fig3_boxes: int = 400  # sampled regions per image for the approximation error
    alphas: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)  # the float path loses precision beyond
    whiten_on: str | None = None
    distractors: tuple[str, ...] = ()
    cache: str | None = None  # default OUT/cache
    sections: tuple[str, ...] = SECTIONS
    seed: int = 0

    @property
    def top_n(self) -> int:
        return max(self.top_ns)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "cache"

    def command(self) -> str:
        """The `rmac paper` command line for these settings."""
        d = PaperSettings(self.dataset, self.out)
        args = ["rmac", "paper", self.dataset]
        if self.choice.backbone != d.choice.backbone:
            args += ["--backbone", self.choice.backbone]
        if self.choice.weights:
            args += ["--weights", self.choice.weights]
        for name, flag in (("max_size", "--max-size"), ("sizes", "--sizes"), ("levels", "--levels"),
                           ("top_ns", "--top-ns"), ("qe", "--qe"), ("fig3_images", "--fig3-images"),
                           ("whiten_on", "--whiten-on"), ("cache", "--cache")):
            v, dv = getattr(self, name), getattr(d, name)
            if v != dv:
                args += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
        for s in self.distractors:
            args += ["--distractors", s]
        if self.sections != SECTIONS:
            args += ["--sections", ",".join(self.sections)]
        args += ["--out", self.out]
        return shlex.join(args)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class Run:
    """One `rmac paper` run: settings, the Dask client, the dataset, and evaluations kept in memory."""

    settings: PaperSettings
    client: object
    progress: bool = True
    dataset: Dataset = field(init=False)
    evaluations: dict = field(default_factory=dict, init=False)
    timings: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.dataset = load_dataset(self.settings.dataset)

    # -- stores --------------------------------------------------------------------------------
    def store_path(self, max_size: int, name: str | None = None) -> Path:
        """The cached store of the dataset (or of the dataset called ``name``) at ``max_size``."""
        c = self.settings.choice
        return self.settings.cache_dir / f"{slug(name or self.dataset.name)}-{c.backbone}-{max_size}"

    def whiten_store(self, max_size: int) -> str | None:
        """``--whiten-on``: a store as given, or a dataset extracted into the cache at ``max_size``."""
        other = self.settings.whiten_on
        if other is None:
            return None
        if (Path(other) / "manifest.json").is_file():
            return other
        from rmac.workflows.extract import extract

        ds = load_dataset(other)
        path = self.store_path(max_size, ds.name)
        extract([(i, str(ds.image_paths[i])) for i in ds.images], str(path), self.client, self.settings.choice,
                max_size, progress=self.progress)
        return str(path)

    # -- evaluations ---------------------------------------------------------------------------
    def evaluate_command(self, max_size: int, L: int, methods: tuple[str, ...], top_n: int,
                         distractors: tuple[str, ...]) -> str:
        """The `rmac evaluate` command line equivalent to one evaluation (L other than the default is
        the `L` argument of `rmac.workflows.evaluate.evaluate`, which the command line does not expose)."""
        s = self.settings
        args = ["rmac", "evaluate", s.dataset, "--store", str(self.store_path(max_size)),
                "--backbone", s.choice.backbone, "--max-size", str(max_size), "--top-n", str(top_n),
                "--qe", str(s.qe), "--methods", ",".join(methods)]
        if s.choice.weights:
            args += ["--weights", s.choice.weights]
        if s.whiten_on:
            args += ["--whiten-on", s.whiten_on]
        for d in distractors:
            args += ["--distractors", d]
        cmd = shlex.join(args)
        return cmd if L == DEFAULT_L else f"{cmd}  # with evaluate(..., L={L})"

    def evaluation(self, max_size: int, L: int, methods: tuple[str, ...] = tuple(METHODS),
                   top_n: int | None = None, distractors: tuple[str, ...] = ()) -> tuple[Evaluation, str]:
        """``evaluate`` on the dataset (cached per settings in this process) and its command line."""
        top_n = self.settings.top_n if top_n is None else top_n
        key = (max_size, L, tuple(methods), top_n, tuple(distractors))
        if key not in self.evaluations:
            t = time.perf_counter()
            ev = evaluate(self.settings.dataset, self.client, self.settings.choice, max_size,
                          str(self.store_path(max_size)), tuple(distractors), self.whiten_store(max_size),
                          top_n, tuple(methods), L=L, qe=self.settings.qe, progress=self.progress)
            self.timings[f"evaluate {key}"] = round(time.perf_counter() - t, 2)
            self.evaluations[key] = (ev, self.evaluate_command(max_size, L, methods, top_n, distractors))
        return self.evaluations[key]

    def main(self, distractors: tuple[str, ...] = ()) -> tuple[Evaluation, str]:
        """The main evaluation: every method at the main size, L and the largest N."""
        return self.evaluation(self.settings.max_size, self.settings.L, tuple(METHODS), self.settings.top_n,
                               distractors)

    # -- helpers shared by the experiments -----------------------------------------------------
    def whitening_rows(self, ev: Evaluation) -> tuple[object, np.ndarray | None]:
        """(store, row mask) the main whitening was fitted on, as `evaluate` chose them."""
        from rmac.storage.store import Store

        other = self.whiten_store(self.settings.max_size)
        if other:
            st = Store(other)
            return st, None
        st = ev.db.stores[0]
        rows_of = {i: r for r, i in enumerate(st.ids)}
        return st, whitening_subset(ev.dataset, rows_of, st.n_images) & st.valid_rows()
