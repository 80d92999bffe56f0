"""Reading a worker's (or supervisor's) --metrics endpoint in tests."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from support import wait_for


def metrics_url(w: Any, timeout: float = 30) -> str:
    """The URL the worker (or supervisor) logged in its `metrics_listening` record (it listens on port 0)."""
    rec = wait_for(lambda: w.events("metrics_listening"), timeout, what="the metrics_listening record")
    return rec[0]["url"]


class Scrape:
    """One scrape: samples by name and labels."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as resp:
            self.text = resp.read().decode()
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for fam in text_string_to_metric_families(self.text):
            for s in fam.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def get(self, name: str, **labels: str) -> float:
        """The value of the one sample `name` whose labels include `labels`; 0 if there is none."""
        found = [v for n, lb, v in self.samples if n == name and all(lb.get(k) == x for k, x in labels.items())
                 and (("process" in labels) or "process" not in lb or lb.get("process") == "all")]
        assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
        return found[0] if found else 0.0

    def all(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(lb, v) for n, lb, v in self.samples if n == name]

    def label_values(self, label: str) -> set[str]:
        return {lb[label] for _, lb, _ in self.samples if label in lb}
