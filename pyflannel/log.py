"""Logging in flannel's (klog's) format: `I1121 12:00:00.000000    1234 file.py:12] msg`."""

from __future__ import annotations

import logging
import os
import sys
import time

_LEVEL_CHAR = {
    logging.DEBUG: "I",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "F",
}


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        head = (
            f"{_LEVEL_CHAR.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} {os.getpid():7d} "
            f"{record.filename}:{record.lineno}] "
        )
        msg = record.getMessage()
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            msg += "\n" + self.formatException(record.exc_info)
        return head + msg


def setup_logging(verbosity: int = 0) -> None:
    """klog's -v: 0 logs info and up; any higher value adds debug detail."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # asyncio is chatty at debug level; its detail is rarely what a flannel user needs.
    for noisy in ("asyncio",):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity < 5 else logging.DEBUG)
