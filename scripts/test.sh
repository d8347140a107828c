#!/usr/bin/env bash
# The whole test suite: lint, types, unit and integration tests (as root, in network namespaces only).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check pyflannel tests bench
ruff format --check pyflannel tests bench
mypy
exec pytest -p no:cacheprovider -q "$@"
