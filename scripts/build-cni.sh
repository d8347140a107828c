#!/usr/bin/env bash
# Builds the host-installable `flannel` CNI plugin: a standalone directory that carries its own Python, so a
# host without Python runs it (the image copies the directory; /opt/cni/bin/flannel is a symlink into it).
#
#   scripts/build-cni.sh                     -> build/cni/flannel.dist/
#   OUT=/some/dir PYTHON=/usr/bin/python3.11 scripts/build-cni.sh
#
# flannel.dist/
#   flannel                  the static C client of flanneld's CNI server (pyflannel/cni/launcher.c); with
#                            no agent to serve it, it execs python/python3.11 -I -S -B main.py with argv,
#                            env and stdin as it got them
#   main.py                  runs pyflannel.cni.plugin:main
#   app/pyflannel/...        the plugin's own modules (only those it imports)
#   python/python3.11        a copy of $PYTHON, RUNPATH $ORIGIN/lib
#   python/python3.11._pth   sys.path, exactly: the stdlib, lib-dynload and app below; it also makes python/
#                            sys.prefix without a search upwards from the executable for landmarks
#   python/lib/*.so*         the shared libraries it and its extension modules need, except glibc's
#   python/lib/python3.11/   the standard library modules the plugin can import, with lib-dynload/
#
# The module set is static (modulefinder over every import statement, lazy ones in functions included), so
# the rare paths (decimal, json, _goerr) work too; tests/test_cni_build.py runs the result. Bytecode is
# unchecked-hash .pyc: no source stat or recompile at run time, and the directory may be read-only.
# Needs gcc, libc6-dev (static libc for the launcher), patchelf and a Python 3.11 whose stdlib is installed
# (Debian's /usr/bin/python3.11 links libpython statically; libz, libexpat and the libraries of a few extension
# modules, e.g. _hashlib's libcrypto, get bundled). Takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-build/cni}
PYTHON=${PYTHON:-/usr/bin/python3.11}
CC=${CC:-gcc}
dist="$OUT/flannel.dist"
tmp="$OUT/.flannel.dist.tmp"

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "build-cni: $PYTHON is not Python 3.11" >&2; exit 1; }
command -v patchelf >/dev/null || { echo "build-cni: patchelf missing (apt-get install patchelf)" >&2; exit 1; }

rm -rf "$tmp"
mkdir -p "$tmp/app" "$tmp/python/lib"
# Static: the client needs no loader work and no particular glibc. Without -DSTANDALONE_SUFFIX its standalone
# plugin is the bundled interpreter (launcher.py builds it for a venv instead).
"$CC" -O2 -Wall -Wextra -Werror -static -o "$tmp/flannel" pyflannel/cni/launcher.c
strip "$tmp/flannel"

cat > "$tmp/main.py" <<'EOF'
# The flannel CNI plugin in its standalone directory (scripts/build-cni.sh); started by ./flannel.
import sys

from pyflannel.cni.plugin import main

sys.exit(main())
EOF
printf '%s\n' lib/python3.11 lib/python3.11/lib-dynload ../app > "$tmp/python/python3.11._pth"

"$PYTHON" -I - "$PWD" "$tmp" <<'EOF'
import os
import shutil
import subprocess
import sys
import sysconfig
from modulefinder import ModuleFinder

repo, dist = sys.argv[1], os.path.abspath(sys.argv[2])
stdlib = sysconfig.get_path("stdlib")
dynload = sysconfig.get_config_var("DESTSHARED")
libdir = os.path.join(dist, "python", "lib")
dest_stdlib = os.path.join(libdir, "python3.11")
dest_dynload = os.path.join(dest_stdlib, "lib-dynload")
os.makedirs(dest_dynload)

# Reached only from `if __name__ == "__main__":` self-tests and debugger hooks of other modules (heapq ->
# doctest -> pdb -> pydoc, http, ssl, readline ...): never by the plugin, and half the stdlib.
dev_tools = ["doctest", "pdb", "pydoc", "pydoc_data", "unittest", "test", "lib2to3", "distutils", "tkinter",
             "idlelib", "ensurepip", "venv", "turtle", "bdb", "cmd", "code", "codeop", "readline", "tty",
             "webbrowser"]
mf = ModuleFinder(path=[stdlib, dynload, repo], excludes=dev_tools)
mf.run_script(os.path.join(dist, "main.py"))
# What the interpreter itself loads before main.py (most frozen in the binary, but their __file__ and
# tracebacks point at the sources), every codec (the runtime's locale picks one) and what prints an uncaught
# traceback.
roots = ["os", "io", "abc", "codecs", "stat", "posixpath", "genericpath", "_collections_abc", "zipimport",
         "importlib._bootstrap", "importlib._bootstrap_external", "linecache", "traceback", "encodings"]
roots += ["encodings." + f[:-3] for f in os.listdir(os.path.join(stdlib, "encodings"))
          if f.endswith(".py") and f != "__init__.py"]
for name in roots:
    mf.import_hook(name)

missing = {name: sorted(who) for name, who in mf.badmodules.items()
           if any(w == "__main__" or w.startswith("pyflannel") for w in who)}
if missing:
    sys.exit(f"build-cni: the plugin imports modules {dynload} and {stdlib} lack: {missing}")

elves = [os.path.join(dist, "python", "python3.11")]
shutil.copy2(os.path.realpath(sys.executable), elves[0])
for name, mod in sorted(mf.modules.items()):
    src = mod.__file__
    if not src or name == "__main__":
        continue  # built into the interpreter
    if src.startswith(dynload + "/"):
        dst = os.path.join(dest_dynload, os.path.basename(src))
        elves.append(dst)
    elif src.startswith(stdlib + "/"):
        dst = os.path.join(dest_stdlib, os.path.relpath(src, stdlib))
    elif src.startswith(os.path.join(repo, "pyflannel") + "/"):
        dst = os.path.join(dist, "app", os.path.relpath(src, repo))
    else:
        sys.exit(f"build-cni: {name} from unexpected {src}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)

# Shared libraries outside glibc travel along: a host without Python may lack them (or hold other versions).
GLIBC = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "libutil.so", "ld-linux")
bundled: dict[str, str] = {}
todo = list(elves)
while todo:
    elf = todo.pop()
    out = subprocess.run(["ldd", elf], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] != "=>" or parts[0].startswith(GLIBC) or parts[0] in bundled:
            continue
        bundled[parts[0]] = dst = os.path.join(libdir, parts[0])
        shutil.copy2(os.path.realpath(parts[2]), dst)
        todo.append(dst)
origin = {os.path.join(dist, "python"): "$ORIGIN/lib", dest_dynload: "$ORIGIN/../..", libdir: "$ORIGIN"}
for elf in elves + list(bundled.values()):
    os.chmod(elf, 0o755)
    subprocess.run(["patchelf", "--set-rpath", origin[os.path.dirname(elf)], elf], check=True)
print(f"build-cni: {len(mf.modules)} modules, libraries {sorted(bundled) or 'none'}", file=sys.stderr)
EOF

# Compiled by the same interpreter build that runs them; -j0 uses the build host's Python, not the copy.
"$PYTHON" -I -m compileall -q -j0 --invalidation-mode unchecked-hash "$tmp/python/lib/python3.11" "$tmp/app"

exe=$(realpath "$tmp/flannel")
# FLANNEL_CNI_SOCKET="": the bundled interpreter answers, not a flanneld that may run on the build host.
out=$(cd / && env -i CNI_COMMAND=VERSION FLANNEL_CNI_SOCKET= "$exe" </dev/null)
case "$out" in *supportedVersions*) ;; *) echo "build-cni: the built plugin fails: $out" >&2; exit 1 ;; esac

rm -rf "$dist"
mv "$tmp" "$dist"
echo "built $dist/flannel ($(du -sh "$dist" | cut -f1))"
