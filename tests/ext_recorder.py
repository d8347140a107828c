"""The extension cluster test's command: records what it was given, then acts like a host-gw plugin.

usage: ext_recorder.py pre|post|add|remove [--hang]. Records go to $EXT_RECORD_DIR (one JSON file per run).
`pre` prints hostile text (its output becomes the lease's BackendData); `add` routes $SUBNET via $PUBLIC_IP
with `ip route` (argument list, no shell); `remove --hang` never ends on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HOSTILE = "q'u\"o $(touch {m}/dollar) `touch {m}/tick`; touch {m}/semi && touch {m}/and | touch {m}/pipe"


def main() -> None:
    kind = sys.argv[1]
    out = os.environ["EXT_RECORD_DIR"]
    env = {k: os.environ.get(k, "") for k in ("SUBNET", "PUBLIC_IP", "NETWORK")}
    rec = {"kind": kind, "argv": sys.argv[1:], "stdin": sys.stdin.read(), "env": env, "pid": os.getpid()}
    path = os.path.join(out, f"{kind}-{time.monotonic_ns()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.rename(path + ".tmp", path)
    if kind == "pre":
        print(HOSTILE.format(m=os.path.join(out, "markers")))
    elif kind == "add":
        subprocess.run(["ip", "route", "replace", env["SUBNET"], "via", env["PUBLIC_IP"], "dev", "eth0"],
                       check=True)  # fmt: skip
    elif kind == "remove" and "--hang" in sys.argv:
        time.sleep(1000)


if __name__ == "__main__":
    main()
