"""Per-LUN command latency: a fixed-bucket histogram the ring thread fills as it completes.

The latency is lvmirrord's service time: from the moment the ring thread fetched a command from
the TCMU ring to the moment it put the status back (``LunServer._finish``), for every command,
whether the ring thread ran it or a worker did. What the initiator sees adds the kernel's and
the transport's share. A completion held for a consistency group's split is counted when its
status is decided, before the hold (``split-group`` reports the hold itself).

Buckets are Prometheus's ``le`` bounds in seconds, cumulative when read (``snapshot``), as the
Prometheus text format wants them; observing costs one ``bisect`` and two additions on the ring
thread (the only writer), so readers (status) take a snapshot without a lock.
"""

from __future__ import annotations

from bisect import bisect_left

from lvmirror.scsi.lu import READ_OPCODES, WRITE_OPCODES

__all__ = ["LatencyHistogram", "BUCKETS", "OPS"]

# seconds: 100 us .. 10 s, the span from a page-cache read to the kernel's command timeout
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)
OPS = ("read", "write", "other")


class LatencyHistogram:
    """Command latencies of one LUN by kind (``OPS``: READ 6/10/12/16, WRITE 6/10/12/16, as
    ``scsi.lu`` classes them, and everything else). Seconds throughout."""

    __slots__ = ("_ops", "_by_opcode", "_other")

    def __init__(self):
        # per kind: a count per BUCKETS bound, one for above the last, then the sum of seconds
        self._ops = {op: [0] * (len(BUCKETS) + 1) + [0.0] for op in OPS}
        self._by_opcode = {**{code: self._ops["read"] for code in READ_OPCODES},
                           **{code: self._ops["write"] for code in WRITE_OPCODES}}
        self._other = self._ops["other"]

    def observe(self, cdb, seconds: float) -> None:
        """Count one command (its CDB, bytes) that took ``seconds``; the ring thread's cost is
        a dict lookup, a bisect and two additions."""
        h = self._by_opcode.get(cdb[0] if cdb else None, self._other)
        h[bisect_left(BUCKETS, seconds)] += 1
        h[-1] += seconds

    def observe_many(self, op: str, seconds: float, n: int) -> None:
        """Count ``n`` commands of kind ``op`` (``OPS``) that took ``seconds`` each (the ring
        thread's compiled READ path counts a batch so)."""
        h = self._ops[op]
        h[bisect_left(BUCKETS, seconds)] += n
        h[-1] += seconds * n

    def counts(self, op: str) -> list:
        """The live list of kind ``op`` (``OPS``): a count per BUCKETS bound, one for above the
        last, then the sum of seconds. The ring thread's compiled loop
        (``tcmu._fastread.lease_serve``) adds to it in place, as ``observe_many`` would; no
        one else writes it."""
        return self._ops[op]

    def snapshot(self) -> dict:
        """``{op: {"le": [cumulative count per BUCKETS bound], "count": n, "sum": seconds}}``
        (the +Inf bucket is ``count``); JSON-able."""
        out = {}
        for op in OPS:
            h = list(self._ops[op])
            cum, acc = [], 0
            for c in h[:len(BUCKETS)]:
                acc += c
                cum.append(acc)
            out[op] = {"le": cum, "count": acc + h[len(BUCKETS)], "sum": h[-1]}
        return out
