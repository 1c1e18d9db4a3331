"""The Helm chart's autoscaling against a real tritonserver's /metrics: every Triton metric that the
prometheus-adapter rule (deploy/helm/lookalike/examples/prometheus-adapter-values.yaml) names, which the
chart's HorizontalPodAutoscaler scales on, is exported, per model, with the labels the rule's division
matches on; and the rule's arithmetic over two scrapes gives a queue time per request."""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

import pytest
import yaml

from lookalike_client import LookalikeClient
from lookalike_client import contract as c
from tests.conftest import ROOT, encode

pytestmark = pytest.mark.integration

ADAPTER_VALUES = ROOT / "deploy" / "helm" / "lookalike" / "examples" / "prometheus-adapter-values.yaml"
CHART_VALUES = ROOT / "deploy" / "helm" / "lookalike" / "values.yaml"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def triton_metrics_named() -> set[str]:
    """The Triton metric names in the adapter rules' queries (what the HPA's metric is computed from)."""
    names = set()
    for rule in adapter_rules():
        for query in (rule["seriesQuery"], rule["metricsQuery"]):
            names |= set(re.findall(r"\bnv_[a-z0-9_]+\b", query))
    return names


def scrape(port: int) -> dict[str, dict[frozenset, float]]:
    """Prometheus text format: metric name -> {frozenset of (label, value): sample value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[frozenset, float]] = defaultdict(dict)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[name][frozenset(LABEL.findall(labels or ""))] = float(value)
    return samples


def test_the_metrics_the_autoscaler_is_built_on_are_exported(server, photo):
    names = triton_metrics_named()
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= names, names
    # The HPA's metric is the adapter rule's output, not a Triton metric: it is named by the rule.
    hpa_metric = yaml.safe_load(CHART_VALUES.read_text())["autoscaling"]["metric"]["name"]
    assert [rule["name"]["as"] for rule in adapter_rules()] == [hpa_metric]

    port = server.options.metrics_port
    before = scrape(port)
    with LookalikeClient(server.options.grpc_url, timeout_s=60) as client:  # per-model counters exist after one
        for _ in range(3):
            assert client.search(encode(photo), top_k=3)
    after = scrape(port)

    missing = sorted(names - set(after))
    assert not missing, f"not in tritonserver's /metrics: {missing}"
    for name in names:
        models = {dict(labels).get("model") for labels in after[name]}
        assert {c.VISUAL_SEARCH_MODEL, c.EMBEDDER_MODEL, c.SEARCH_MODEL} <= models, (name, models)
    # The rule divides queue time by request count series by series: their label sets must pair up.
    queue, success = after["nv_inference_queue_duration_us"], after["nv_inference_request_success"]
    assert set(queue) == set(success)

    # The rule's arithmetic on the two scrapes: per model, queue time gained / requests gained (at least 1),
    # summed over the models: a queue time per request of the pipeline, in microseconds.
    def gained(name: str, labels: frozenset) -> float:
        return after[name][labels] - before.get(name, {}).get(labels, 0.0)

    per_model: dict[str, float] = defaultdict(float)
    for labels in queue:
        per_model[dict(labels)["model"]] += (gained("nv_inference_queue_duration_us", labels)
                                             / max(gained("nv_inference_request_success", labels), 1.0))
    print("queue us per request, by model:", per_model)
    searches = sum(gained("nv_inference_request_success", labels) for labels in success
                   if dict(labels)["model"] == c.VISUAL_SEARCH_MODEL)
    assert searches == 3
    # Each step queued the requests (if only for microseconds): the metric moves with traffic.
    for model in (c.PREPROCESS_QUERY_MODEL, c.EMBEDDER_MODEL, c.SEARCH_MODEL):
        assert per_model[model] > 0, per_model
    # Three requests one after another on an idle server: far below the chart's scale-out target.
    target = float(yaml.safe_load(CHART_VALUES.read_text())["autoscaling"]["metric"]["targetAverageValue"])
    assert sum(per_model.values()) < target, per_model
