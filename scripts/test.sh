#!/usr/bin/env bash
# The whole test suite: lint, types, unit and integration tests (as root, in network namespaces only), then the
# kernel_vm tests again inside a VM booting Debian's stock kernel (python -m pyflannel.lab.vm). Arguments go to
# both pytest runs. PYFLANNEL_VM=0 skips the VM pass (refused under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check pyflannel tests bench
ruff format --check pyflannel tests bench
mypy

host_rc=0
pytest -p no:cacheprovider -q "$@" || host_rc=$?

echo
echo "==== VM pass: pytest -m kernel_vm inside a VM on the stock kernel ($(date -u +%H:%M:%S) UTC) ===="
vm_rc=0
start=$SECONDS
if [ "${PYFLANNEL_VM:-1}" = 0 ]; then
  if [ -n "${CI:-}" ]; then
    echo "test.sh: PYFLANNEL_VM=0 is not allowed under CI: the VM pass is part of the suite" >&2
    vm_rc=1
  else
    echo "skipped (PYFLANNEL_VM=0)"
  fi
else
  # The VM pass took ~16 min under TCG with 78 tests; ipsec's clusters and labs add about 20 more. The bound
  # leaves room for a loaded machine and keeps the whole run inside CI's 90 minutes.
  python -m pyflannel.lab.vm --timeout 3900 -- "$@" || vm_rc=$?
  if [ "$vm_rc" = 5 ] && [ $# -gt 0 ]; then
    echo "VM pass: no kernel_vm test in this selection"
    vm_rc=0
  fi
fi
echo "==== host pass: exit $host_rc; VM pass: exit $vm_rc ($((SECONDS - start)) s) ===="
[ "$host_rc" = 0 ] && [ "$vm_rc" = 0 ]
