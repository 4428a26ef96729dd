"""A broker's Prometheus metrics, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import BrokerCluster

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at url, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: object) -> float | None:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def native_fsyncs(cluster: BrokerCluster, node: int) -> int:
    """How many fsyncs broker `node`'s native fsync threads have run, as the broker counts them."""
    ran = value(scrape(cluster.brokers[node].metrics_url), "logbroker_native_fsyncs_total", result="ok")
    assert ran is not None, f"broker {node} serves no logbroker_native_fsyncs_total"
    return int(ran)
