"""Steady load on a gateway while something breaks: how many requests were sent, how many failed, and
the longest gap between two successful answers. Used by the chaos script and the rollback test; the
figures are printed, never compared with a time."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

PAN = "4111111111111111"  # a card-network test number


@dataclass
class Load:
    """``clients`` threads POSTing /v1/tokenize to ``url`` back to back (each waits for its answer)."""

    url: str
    clients: int = 4
    timeout: float = 60.0
    sent: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    _last_ok: float = 0.0
    longest_gap: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._last_ok = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._gap(time.monotonic())

    def _gap(self, now: float) -> None:
        self.longest_gap = max(self.longest_gap, now - self._last_ok)

    def _client(self) -> None:
        body = json.dumps({"pan": PAN}).encode()
        while not self._stop.is_set():
            request = urllib.request.Request(f"{self.url}/v1/tokenize", data=body, method="POST")
            error = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read()
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except OSError as exc:
                error = type(exc).__name__
            now = time.monotonic()
            with self._lock:
                self.sent += 1
                if error is None:
                    self._gap(now)
                    self._last_ok = now
                else:
                    self.failed += 1
                    self.errors[error] = self.errors.get(error, 0) + 1
            if error is not None:
                time.sleep(0.05)  # a refused connection answers at once: do not spin

    def figures(self) -> str:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(self.errors.items()))
        return (
            f"requests sent {self.sent}, failed {self.failed}{f' ({errors})' if errors else ''}, "
            f"longest gap {self.longest_gap:.2f} s"
        )
