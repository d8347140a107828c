"""flanneld's entry point: parse the flags, then run the agent (see pyflannel.flags and pyflannel.daemon)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import VERSION
from .flags import DEFAULT_ETCD_ENDPOINTS, FLAGS, Options, UsageError, parse_args, usage


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as e:
        if str(e):
            print(f"flanneld: {e}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2 if str(e) else 0
    if opts["version"]:
        print(VERSION, file=sys.stderr)  # where upstream's main.go prints it
        return 0
    # Imported late so that --help and --version stay fast and never fail on a missing dependency.
    from .daemon import run_daemon
    from .log import setup_logging

    setup_logging(opts["v"])
    return run_daemon(opts)


__all__ = ["DEFAULT_ETCD_ENDPOINTS", "FLAGS", "Options", "UsageError", "main", "parse_args", "usage"]

if __name__ == "__main__":
    sys.exit(main())
