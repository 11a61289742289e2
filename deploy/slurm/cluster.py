"""Start a Dask cluster on SLURM with dask-jobqueue (`pip install dask-jobqueue`) and print its address
for `rmac ... --scheduler ADDRESS`. Keep this process alive while jobs run (e.g. inside `tmux`).

    python deploy/slurm/cluster.py --jobs 32 --queue normal
"""
import argparse
import time

from dask_jobqueue import SLURMCluster

parser = argparse.ArgumentParser()
parser.add_argument("--jobs", type=int, default=16)
parser.add_argument("--queue", default=None)
parser.add_argument("--walltime", default="12:00:00")
args = parser.parse_args()

cluster = SLURMCluster(queue=args.queue, cores=4, processes=4, memory="24GB", walltime=args.walltime,
                       job_script_prologue=["source .venv/bin/activate",
                                            "export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1"])
cluster.scale(jobs=args.jobs)
print(f"scheduler: {cluster.scheduler_address}  dashboard: {cluster.dashboard_link}", flush=True)
while True:
    time.sleep(3600)
