"""Start a Dask cluster on SLURM with dask-jobqueue (`pip install dask-jobqueue`) and print its address
for `rmac ... --scheduler ADDRESS`. Keep this process alive while jobs run (e.g. inside `tmux`); the
scheduler runs in it, the workers in SLURM jobs of 4 one-thread worker processes each.

    python deploy/slurm/cluster.py --jobs 32 --queue normal
    python deploy/slurm/cluster.py --dry-run            # print the job script each worker job runs, submit nothing
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the rmac checkout whose .venv the workers run


def cluster_options(queue: str | None, walltime: str, account: str | None = None) -> dict:
    """SLURMCluster keyword arguments: 4 worker processes of one thread per job, the same virtualenv and
    environment as a local rmac worker (thread caps; a fixed mmap threshold, see workflows/cluster.py)."""
    return dict(
        queue=queue, account=account, cores=4, processes=4, memory="24GB", walltime=walltime,
        local_directory="$TMPDIR",  # node-local spill space, not the shared filesystem
        job_script_prologue=[
            f"source {ROOT / '.venv' / 'bin' / 'activate'}",
            "export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432",
        ],
        # the scheduler must be reachable from the compute nodes, not only from this login node
        scheduler_options={"dashboard_address": ":8787"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16, help="SLURM jobs (4 workers each)")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="12:00:00")
    parser.add_argument("--dry-run", action="store_true", help="print the worker job script and exit")
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster

    with SLURMCluster(**cluster_options(args.queue, args.walltime, args.account)) as cluster:
        if args.dry_run:
            print(cluster.job_script())
            return
        cluster.scale(jobs=args.jobs)
        print(f"scheduler: {cluster.scheduler_address}  dashboard: {cluster.dashboard_link}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
