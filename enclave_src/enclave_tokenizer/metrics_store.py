"""Where the gateway's traffic metrics are counted: one slot per gateway process in shared memory.

With ``workers`` > 1 the gateway is several processes on one port (gateway_workers) and a scrape reaches
any one of them: each process counts into its own slot of an anonymous shared mapping made before the
fork, and a scrape sums every slot, so the counters and histograms are the gateway's, exact at scrape
time, whichever process answers (prometheus_client's multiprocess mode does the same with one file per
process, but takes a lock per update, which showed in the request rate). Only its own process writes a
slot: no lock; a reader may miss the update in progress, never see a torn 8-byte value.

The series are those of fixed vocabularies (routes, operations, result codes: metrics.py), so every
series has its place from the start; a scrape shows the ones counted at least once. The worker 0 also
publishes the state it alone observes (the enclave's nitro-cli state, provisioning, the self-check's
attestation and canary) as a small JSON document, versioned like a seqlock, for the others' scrapes.
"""

from __future__ import annotations

import bisect
import json
import mmap
import struct
from collections.abc import Iterable
from typing import Any

# Gateway answers are sub-millisecond to seconds (a request held while the enclave relaunches).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WIDTH = len(LATENCY_BUCKETS) + 2  # count, the buckets, one above the largest bound (+Inf)
# Per-process gauges and counters outside the histograms.
SCALARS = ("tokenize_items", "detokenize_items", "tokenize_errors", "detokenize_errors", "in_flight",
           "attest_failures", "pool_size", "pool_connections")  # fmt: skip
_STATE_BYTES = 8 << 10
_STATE_HEADER = struct.Struct("<QI")  # version (odd while written), length


class Series:
    """Count, sum and bucket counts of one labelled series in one process's slot."""

    __slots__ = ("_at", "_ints", "_sum", "_sums")

    def __init__(self, ints: memoryview, sums: memoryview, at: int, sum_at: int) -> None:
        self._ints, self._sums, self._at, self._sum = ints, sums, at, sum_at

    def observe(self, seconds: float) -> None:
        ints, at = self._ints, self._at
        ints[at] += 1
        ints[at + 1 + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sums[self._sum] += seconds


class TrafficStore:
    """Slots for ``processes`` gateway processes; :meth:`use` picks this process's slot (after the fork)."""

    def __init__(self, series: Iterable[Any], processes: int = 1) -> None:
        self.keys = list(series)
        self.processes = processes
        self._ints_per_slot = len(self.keys) * _WIDTH + len(SCALARS)
        ints_bytes = 8 * self._ints_per_slot * processes
        sums_bytes = 8 * len(self.keys) * processes
        # Anonymous and shared (MAP_SHARED): the processes forked after this see the same pages.
        self._memory = mmap.mmap(-1, ints_bytes + sums_bytes + _STATE_BYTES)
        view = memoryview(self._memory)
        self._ints = view[:ints_bytes].cast("q")
        self._sums = view[ints_bytes : ints_bytes + sums_bytes].cast("d")
        self._state = view[ints_bytes + sums_bytes :]
        self.index = 0
        self.series: dict[Any, Series] = {}
        self.use(0)

    def use(self, index: int) -> None:
        """Count into slot ``index`` from now on (each gateway process its own)."""
        if not 0 <= index < self.processes:
            raise ValueError(f"slot {index} of {self.processes}")
        self.index = index
        base, sum_base = index * self._ints_per_slot, index * len(self.keys)
        self.series = {
            key: Series(self._ints, self._sums, base + i * _WIDTH, sum_base + i) for i, key in enumerate(self.keys)
        }

    def _scalar_at(self, index: int, name: str) -> int:
        return index * self._ints_per_slot + len(self.keys) * _WIDTH + SCALARS.index(name)

    def add(self, name: str, amount: int) -> None:
        self._ints[self._scalar_at(self.index, name)] += amount

    def set(self, name: str, value: int) -> None:
        self._ints[self._scalar_at(self.index, name)] = value

    def total(self, name: str) -> int:
        return sum(self._ints[self._scalar_at(i, name)] for i in range(self.processes))

    def totals(self) -> dict[Any, tuple[int, list[int], float]]:
        """(count, bucket counts (the last above every bound), sum) of each series counted, all slots summed."""
        out = {}
        ints, sums = self._ints, self._sums
        for i, key in enumerate(self.keys):
            rows = [index * self._ints_per_slot + i * _WIDTH for index in range(self.processes)]
            count = sum(ints[at] for at in rows)
            if count:
                buckets = [sum(ints[at + 1 + b] for at in rows) for b in range(_WIDTH - 1)]
                total = sum(sums[index * len(self.keys) + i] for index in range(self.processes))
                out[key] = (count, buckets, total)
        return out

    # -- the state worker 0 observes
    def publish_state(self, state: dict[str, Any]) -> None:
        payload = json.dumps(state, separators=(",", ":")).encode()
        if len(payload) > _STATE_BYTES - _STATE_HEADER.size:
            return  # cannot happen with the fields published (a few hundred bytes); never fail a scrape
        version = _STATE_HEADER.unpack_from(self._state)[0]
        _STATE_HEADER.pack_into(self._state, 0, version + 1, 0)
        self._state[_STATE_HEADER.size : _STATE_HEADER.size + len(payload)] = payload
        _STATE_HEADER.pack_into(self._state, 0, version + 2, len(payload))

    def read_state(self) -> dict[str, Any] | None:
        for _ in range(100):
            version, length = _STATE_HEADER.unpack_from(self._state)
            if version & 1:
                continue
            payload = bytes(self._state[_STATE_HEADER.size : _STATE_HEADER.size + length])
            if _STATE_HEADER.unpack_from(self._state)[0] == version:
                return json.loads(payload) if version else None
        return None
