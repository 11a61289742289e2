#!/usr/bin/env bash
# A real Dask cluster on this machine: one scheduler and N worker processes (one thread each), as
# separate OS processes, the way a cluster runs them. Used by the integration tests.
#   deploy/local-cluster.sh start DIR [N_WORKERS]   -> prints tcp://127.0.0.1:PORT; state kept in DIR
#   deploy/local-cluster.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?state folder}; n=${3:-2}
bin=$(dirname "$(command -v python)")
case "$cmd" in
start)
    mkdir -p "$dir"
    "$bin/dask" scheduler --host 127.0.0.1 --port 0 --dashboard-address 127.0.0.1:0 \
        --scheduler-file "$dir/scheduler.json" >"$dir/scheduler.log" 2>&1 &
    echo $! >"$dir/pids"
    # up to 2 minutes: a loaded machine can take that long to import distributed
    for _ in $(seq 600); do [ -s "$dir/scheduler.json" ] && break; sleep 0.2; done
    [ -s "$dir/scheduler.json" ] || { echo "local-cluster.sh: the scheduler did not start (see $dir/scheduler.log)" >&2; exit 1; }
    for i in $(seq "$n"); do
        # the nanny sets MALLOC_TRIM_THRESHOLD_, which freezes glibc's mmap threshold at 128 kB and makes
        # torch 3x slower; a fixed large mmap threshold undoes that (see workflows/cluster.py)
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 "$bin/dask" worker \
            --scheduler-file "$dir/scheduler.json" --nthreads 1 --nworkers 1 --name "w$i" \
            --local-directory "$dir/w$i" >"$dir/worker$i.log" 2>&1 &
        echo $! >>"$dir/pids"
    done
    python -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$dir/scheduler.json"
    ;;
stop)
    [ -f "$dir/pids" ] && xargs -r kill <"$dir/pids" 2>/dev/null || true
    rm -f "$dir/pids"
    ;;
esac
