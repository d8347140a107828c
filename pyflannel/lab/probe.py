"""A steady UDP probe stream between two pods, to measure how long pod traffic stops (an agent restart).

The sender (in the source pod) sends a numbered datagram every INTERVAL seconds; the receiver (in the
destination pod) records when each arrives. Both are short Python processes of this interpreter, started in
the pods' namespaces through the RunScope (so they are stopped with it) and bounded in time.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .netns import NetnsError, RunScope, ns_exec, wait_for
from .testbed import Node, Pod, Testbed

INTERVAL = 0.002
PORT = 9977
MAX_SECONDS = 120  # the processes end by themselves after this, whatever happens to us

_RECEIVER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
out, end, got = sys.argv[3], time.monotonic() + float(sys.argv[4]), []
while time.monotonic() < end:
    try:
        data = s.recv(64)
    except socket.timeout:
        continue
    if data == b"end":
        break
    got.append((int(data), time.monotonic()))
json.dump(got, open(out, "w"))
"""

_SENDER = """
import signal, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst, interval, end = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3]), time.monotonic() + float(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
seq = 0
while not stop and time.monotonic() < end:
    try:
        s.sendto(str(seq).encode(), dst)
    except OSError:
        pass
    seq += 1
    time.sleep(interval)
print(seq, flush=True)
"""


@dataclass(frozen=True)
class ProbeResult:
    sent: int
    arrivals: list[tuple[int, float]]  # (sequence number, monotonic time of arrival)

    @property
    def lost(self) -> int:
        return self.sent - len({seq for seq, _ in self.arrivals})

    def longest_gap(self) -> float:
        times = sorted(t for _, t in self.arrivals)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Probe:
    def __init__(self, scope: RunScope, src: Pod, dst: Pod) -> None:
        self.scope, self.src, self.dst = scope, src, dst
        self._out = scope.tmpdir / f"probe-{src.name}-{dst.name}.json"
        self._sent_log = scope.tmpdir / f"probe-{src.name}-{dst.name}.sent"
        self._rx: subprocess.Popen[bytes] | None = None
        self._tx: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        py = sys.executable
        self._out.unlink(missing_ok=True)
        self._rx = self.scope.spawn(
            self.dst.ns, [py, "-c", _RECEIVER, self.dst.ip, str(PORT), str(self._out), str(MAX_SECONDS)]
        )
        time.sleep(0.3)
        self._tx = self.scope.spawn(
            self.src.ns,
            [py, "-c", _SENDER, self.dst.ip, str(PORT), str(INTERVAL), str(MAX_SECONDS)],
            log=self._sent_log,
        )

    def stop(self) -> ProbeResult:
        assert self._rx is not None and self._tx is not None
        self._tx.send_signal(signal.SIGTERM)
        self._tx.wait(timeout=10)
        time.sleep(0.3)  # the last probes in flight
        ns_exec(self.src.ns, [sys.executable, "-c", _END, self.dst.ip, str(PORT)])
        try:
            self._rx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._rx.kill()
            raise NetnsError("the probe receiver did not finish") from None
        sent = int(self._sent_log.read_text().split()[-1])
        arrivals = [(int(s), float(t)) for s, t in json.loads(self._out.read_text())]
        return ProbeResult(sent=sent, arrivals=arrivals)


_END = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"end", (sys.argv[1], int(sys.argv[2])))
"""


def restart_gap(tb: Testbed, node: Node, src: Pod, dst: Pod, settle: float = 1.0) -> tuple[float, int]:
    """Restart `node`'s agent (SIGTERM, start again) while `src` probes `dst`; the longest time without an
    arriving probe, and how many probes were lost."""
    probe = Probe(tb.scope, src, dst)
    probe.start()
    try:
        time.sleep(settle)
        tb.stop_agent(node)
        since = time.time()
        tb.start_agent(node)
        tb.wait_ready(node, since=since)
        # Traffic is back when a fresh probe gets through; bounded like every wait here.
        wait_for(lambda: tb.ping(src.ns, dst.ip, wait=0.5), timeout=30)
        time.sleep(settle)
    finally:
        result = probe.stop()
    return result.longest_gap(), result.lost
