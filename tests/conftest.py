"""Shared fixtures of the cluster tests (test_search.py, test_cli.py).

* ``scheduler``: a real Dask cluster started by ``deploy/local-cluster.sh`` — a ``dask scheduler`` and two
  ``dask worker`` OS processes, one thread each — for the whole session; stopped at the end.
* ``client``: a ``distributed.Client`` of that scheduler, in the test process.
* ``dev_store``: a subset of the embedded dev set (every image of a few landmark groups plus distractors)
  extracted on that cluster and indexed once: whitening fitted on the distractor rows only, several
  store partitions and several FAISS shards.
* ``rmac_cli``: runs the ``rmac`` command line of the virtualenv in a subprocess against ``scheduler``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: python, dask, rmac
CLUSTER_SCRIPT = ROOT / "deploy" / "local-cluster.sh"

MAX_SIZE = 384
GROUPS = ("christ", "eiffel", "liberty", "notredame", "rushmore", "tajmahal")  # 14 landmark photos
N_DISTRACTORS = 30
PARTITION = 8  # 44 images -> 6 partitions
SHARD_ROWS = 16  # -> 2 partitions per FAISS shard, 3 shards

# The scheduler and workers log to files; keep distributed's INFO chatter of the client out of the output.
for _name in ("distributed", "bokeh", "tornado"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def cli_env() -> dict[str, str]:
    """The environment for subprocesses: the virtualenv first on PATH, one BLAS thread."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_cluster(state: Path, timeout: float = 60.0) -> None:
    """``local-cluster.sh stop`` (SIGTERM to the processes it started), then wait for them to exit;
    whatever of those same processes is still there after ``timeout`` gets SIGKILL."""
    pids = [int(p) for p in (state / "pids").read_text().split()] if (state / "pids").exists() else []
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], env=cli_env(), timeout=60,
                   capture_output=True)
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="session")
def scheduler(tmp_path_factory) -> str:
    """The address of a scheduler with two worker processes, all started by deploy/local-cluster.sh."""
    from distributed import Client

    state = tmp_path_factory.mktemp("cluster")
    try:
        out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state), "2"], env=cli_env(),
                             capture_output=True, text=True, timeout=120, check=True)
        address = out.stdout.strip().splitlines()[-1]
        assert address.startswith("tcp://127.0.0.1:"), out.stdout
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=240)
            assert len(c.scheduler_info()["workers"]) == 2
    except BaseException:
        _stop_cluster(state)
        raise
    yield address
    _stop_cluster(state)


@pytest.fixture(scope="session")
def client(scheduler):
    from distributed import Client

    c = Client(scheduler, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="session")
def dev():
    from rmac.data import LANDMARKS_DEV
    from rmac.storage.datasets import load_oxford

    return load_oxford(LANDMARKS_DEV)


def group(image_id: str) -> str:
    """``christ_1`` -> ``christ``."""
    return image_id.rsplit("_", 1)[0]


@pytest.fixture(scope="session")
def dev_store(client, dev, tmp_path_factory):
    """The dev subset extracted on the cluster and indexed (whitening on its distractors only)."""
    from rmac.storage.store import Store
    from rmac.workflows.evaluate import whitening_subset
    from rmac.workflows.extract import ModelChoice, extract
    from rmac.workflows.index import build_index

    ids = sorted([i for i in dev.images if group(i) in GROUPS]
                 + [i for i in dev.images if i.startswith("distractor_")][:N_DISTRACTORS])
    path = tmp_path_factory.mktemp("dev") / "dev-subset-store"
    summary = extract([(i, str(dev.image_paths[i])) for i in ids], str(path), client, ModelChoice(), MAX_SIZE,
                      partition_size=PARTITION, progress=False)
    assert summary["done"] == len(ids) and summary["failed"] == 0
    store = Store(path)
    rows_of = {i: r for r, i in enumerate(store.ids)}
    subset = whitening_subset(dev, rows_of, store.n_images) & store.valid_rows()
    info = build_index(store, client, whiten_subset=subset, whiten_label="dev distractors",
                       shard_rows=SHARD_ROWS, progress=False)
    queries = [q for q in dev.queries if q.image in rows_of]
    return SimpleNamespace(path=path, store=Store(path), ids=ids, rows_of=rows_of, subset=subset, info=info,
                           queries=queries)


@pytest.fixture(scope="session")
def rmac_cli(scheduler, tmp_path_factory):
    """``rmac_cli(*args, timeout=...)``: run ``rmac ARGS --scheduler ADDR`` (the venv's console script)."""
    cwd = tmp_path_factory.mktemp("cli-cwd")

    def run(*args, timeout: float = 300, scheduler_arg: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "rmac"), *map(str, args)] + (["--scheduler", scheduler] if scheduler_arg else [])
        return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)

    return run
