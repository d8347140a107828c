#!/usr/bin/env bash
# The lab in one command: installs what it needs (scripts/setup.sh), then runs flannel-lab from .venv.
#   ./scripts/lab.sh up        # 3 nodes, vxlan, 2 pods each
#   ./scripts/lab.sh --help
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then
  echo "lab.sh: needs root (network namespaces); try: sudo $0 $*" >&2
  exit 1
fi
"$root/scripts/setup.sh"
# setup.sh reinstalls the package when pyproject.toml changes; an older venv may still lack the script.
[ -x "$root/.venv/bin/flannel-lab" ] || "$root/.venv/bin/pip" install -q --disable-pip-version-check -e "$root[dev]"
exec "$root/.venv/bin/flannel-lab" "$@"
