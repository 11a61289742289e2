#!/usr/bin/env bash
# Nightly: add the photos that arrived in a folder to a store, then index the new partitions only.
#   deploy/cron/nightly.sh PHOTOS STORE [--scheduler tcp://HOST:8786 | --workers N]
# Timestamped lines go to stdout/stderr (crontab.example appends them to a log file). Exit status: 0 when
# both steps succeeded, otherwise the failing step's (rmac: 2 bad input, 1 nothing extracted).
# `--wait`: a run still holding the store's lock (a long night, or someone's manual run) is waited for,
# never overlapped. Resumable: a killed night is completed by the next one.
set -uo pipefail
photos=${1:?usage: nightly.sh PHOTOS STORE [cluster options]}; store=${2:?usage: nightly.sh PHOTOS STORE [cluster options]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
rmac=${RMAC:-$here/../../.venv/bin/rmac}
log() { printf '%s rmac-nightly: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

log "extract $photos -> $store"
"$rmac" extract "$photos" --store "$store" --wait ${RMAC_EXTRACT_ARGS:-} "$@"
rc=$?
if [ $rc -ne 0 ]; then log "extract failed (exit $rc); the index is left as it was"; exit $rc; fi
log "index $store"
"$rmac" index "$store" --wait "$@"
rc=$?
if [ $rc -ne 0 ]; then log "index failed (exit $rc)"; exit $rc; fi
log "done"
