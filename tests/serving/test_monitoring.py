"""Metrics that drive scaling and alerts: the chart's adapter rule, alert rules
and dashboard, checked by promtool and evaluated by a real Prometheus scraping a real
Triton the way the chart's ServiceMonitor says, at idle, with failing requests and under
perf_analyzer overload.

One Triton and one Prometheus serve the whole module: each costs seconds to start on 2
cores. The rules are rendered with 10 s windows and a 1 s scrape, so each phase lasts
seconds; the thresholds compare idle (no request: exactly 0) with overload (requests
queue behind busy instances: milliseconds), far apart on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import numpy as np
import pytest
import yaml
from tritonclient.utils import InferenceServerException

from harness.chart import REPO, find, install_manifest, render
from harness.pipeline import MODEL
from harness.ports import free_ports
from harness.prometheus import (
    DASHBOARD,
    LocalPrometheus,
    dashboard_panels,
    expand,
    locate,
    values,
)
from harness.serving import local_triton, pin_test_repository
from mnist_pipeline import client
from mnist_pipeline.serve import LocalTriton

CRDS = {"apiVersions": ["monitoring.coreos.com/v1"]}
RWX = {"persistence": {"accessModes": ["ReadWriteMany"]}}
NAMESPACE = "ml"
POD = "demo-mnist-pipeline-triton-0"
WINDOW = "10s"
# Far below any overload's wait, far above an idle server's 0.
QUEUE_THRESHOLD_US = 1000


def monitoring_values(**triton: Any) -> dict[str, Any]:
    return {
        **CRDS,
        **RWX,
        "triton": {
            "serviceMonitor": {"enabled": True, "interval": "1s"},
            "queueTimeMetric": {"window": WINDOW, "adapterRule": {"enabled": True}},
            "prometheusRule": {
                "enabled": True,
                "window": WINDOW,
                "queueTimeMicroseconds": QUEUE_THRESHOLD_US,
            },
            "dashboard": {"enabled": True},
            "autoscaling": {"enabled": True, "queueTime": {"enabled": True}},
            **triton,
        },
    }


def refused(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as e:
        install_manifest(values)
    return str(e.value)


def adapter_rule(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [o for o in objects if o["metadata"]["name"].endswith("-adapter-rules")]
    (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    return dict(rule)


def alerts(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (group,) = find(objects, "PrometheusRule")["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


# The chart --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["serviceMonitor", "prometheusRule"])
def test_operator_objects_are_refused_without_the_crd(kind: str) -> None:
    message = refused({"triton": {kind: {"enabled": True}}})
    assert f"triton.{kind}.enabled" in message
    assert "monitoring.coreos.com/v1" in message
    assert "--api-versions" in message
    install_manifest({**CRDS, "triton": {kind: {"enabled": True}}})


def test_hpa_scales_on_queue_time_with_cpu_still_available() -> None:
    objects, _ = render(monitoring_values())
    hpa = find(objects, "HorizontalPodAutoscaler")
    cpu, queue = hpa["spec"]["metrics"]
    assert queue == {
        "type": "Pods",
        "pods": {
            "metric": {"name": adapter_rule(objects)["name"]["as"]},
            "target": {"type": "AverageValue", "averageValue": "20000"},
        },
    }
    # A busy replica uses up to its CPU limit; the target must be reachable below it.
    assert cpu["resource"]["target"]["type"] == "AverageValue"
    target = cpu["resource"]["target"]["averageValue"]
    limit = find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["cpu"]
    assert float(target.removesuffix("m")) / 1000 < float(limit)
    assert "without a metric" in refused(
        {
            **RWX,
            "triton": {
                "autoscaling": {"enabled": True, "cpu": {"enabled": False}},
            },
        }
    )


def test_adapter_rule_sums_both_counters_before_dividing() -> None:
    rule = adapter_rule(render(monitoring_values())[0])
    query = rule["metricsQuery"]
    # server#8979: neither a mean of per-model ratios nor a division by 1 + n.
    assert query.startswith("sum by (<<.GroupBy>>) (increase(nv_inference_queue_duration_us{")
    assert "/ clamp_min(sum by (<<.GroupBy>>) (increase(nv_inference_request_success{" in query
    assert "avg" not in query and "1+" not in query.replace(" ", "")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def test_dashboard_configmap_carries_the_sidecar_label_and_the_json() -> None:
    objects, _ = render(monitoring_values())
    (cm,) = [o for o in objects if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())
    titles = " ".join(p.title for p in dashboard_panels()).lower()
    for topic in ("throughput", "failed", "p50", "p99", "queue", "compute", "batch", "pending"):
        assert topic in titles
    assert "cpu" in titles


def rule_file(path: Path, objects: list[dict[str, Any]], annotations: bool = True) -> Path:
    spec = find(objects, "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            if not annotations:
                rule.pop("annotations")
    path.write_text(yaml.safe_dump(spec))
    return path


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    objects, _ = render(monitoring_values(prometheusRule={"enabled": True}))
    promtool = str(locate("promtool"))
    full = rule_file(tmp_path / "full.yaml", objects)
    check = subprocess.run([promtool, "check", "rules", str(full)], capture_output=True, text=True)
    # Unit tests compare annotations too: prose with $value; the expressions are under test.
    rules = rule_file(tmp_path / "rules.yaml", objects, annotations=False)
    assert check.returncode == 0, check.stdout + check.stderr
    job = f'job="demo-mnist-pipeline-triton", namespace="{NAMESPACE}"'
    pod = f'{job}, pod="{POD}"'
    model = f'{pod}, model="{MODEL}", version="1"'
    up = {"namespace": NAMESPACE, "pod": POD}
    # Default thresholds: 5 % failures, 100 ms queue per request, 500 ms p99; 5 m windows,
    # alerts after 5 m (down: 2 m). Healthy until 10 m, then 10 requests/s succeed and 5 fail,
    # each waits 200 ms instead of 10 ms, p99 is 900 ms.
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"up{{{pod}}}", "values": "1x30"},
                    {"series": f"nv_inference_request_success{{{model}}}", "values": "0+600x30"},
                    {
                        "series": f'nv_inference_request_failure{{{model}, reason="BACKEND"}}',
                        "values": "0x9 0+300x20",
                    },
                    {
                        "series": f"nv_inference_queue_duration_us{{{model}}}",
                        "values": "0+6000000x9 60000000+120000000x20",
                    },
                    {
                        "series": f'nv_inference_request_summary_us{{{model}, quantile="0.99"}}',
                        "values": "20000x9 900000x20",
                    },
                ],
                "alert_rule_test": [
                    *(
                        {"eval_time": "9m", "alertname": name, "exp_alerts": []}
                        for name in (
                            "TritonDown",
                            "TritonModelNotReady",
                            "TritonInferenceFailures",
                            "TritonQueueTimeHigh",
                            "TritonLatencyHigh",
                        )
                    ),
                    *(
                        {
                            "eval_time": "22m",
                            "alertname": name,
                            "exp_alerts": [{"exp_labels": {**labels, "severity": "warning"}}],
                        }
                        for name, labels in (
                            ("TritonInferenceFailures", {**up, "model": MODEL}),
                            ("TritonQueueTimeHigh", up),
                            ("TritonLatencyHigh", {**up, "model": MODEL}),
                        )
                    ),
                    {"eval_time": "22m", "alertname": "TritonDown", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": [{"series": f"up{{{pod}}}", "values": "1x4 0x10"}],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "TritonDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **up,
                                    "job": "demo-mnist-pipeline-triton",
                                    "severity": "critical",
                                }
                            }
                        ],
                    }
                ],
            },
            {
                "interval": "1m",
                # Triton answers, but without the model's series: the model did not load.
                "input_series": [{"series": f"up{{{pod}}}", "values": "1x5"}],
                "alert_rule_test": [
                    {
                        "eval_time": "4m",
                        "alertname": "TritonModelNotReady",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **up,
                                    "job": "demo-mnist-pipeline-triton",
                                    "severity": "critical",
                                }
                            }
                        ],
                    }
                ],
            },
            {
                "interval": "1m",
                # No Triton target at all.
                "input_series": [{"series": 'up{job="other", namespace="ml"}', "values": "1x5"}],
                "alert_rule_test": [
                    {
                        "eval_time": "4m",
                        "alertname": "TritonDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "job": "demo-mnist-pipeline-triton",
                                    "namespace": NAMESPACE,
                                    "severity": "critical",
                                }
                            }
                        ],
                    }
                ],
            },
        ],
    }
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Live: Triton scraped by Prometheus --------------------------------------------------------


@dataclass
class Monitored:
    triton: LocalTriton
    prometheus: LocalPrometheus
    objects: list[dict[str, Any]]
    interval_s: float


def scrape_config(objects: list[dict[str, Any]], metrics_port: int) -> dict[str, Any]:
    """The scrape the Prometheus Operator derives from the chart's ServiceMonitor: the
    Service's port of that name, its path and interval; job = the Service's name, and the
    namespace and pod of the target as labels."""
    monitor = find(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    service = find(objects, "Service", "triton")
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    container = find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    (container_port,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert f"--metrics-port={container_port['containerPort']}" in container["args"]
    return {
        "job_name": service["metadata"]["name"],
        "scrape_interval": endpoint["interval"],
        "metrics_path": endpoint["path"],
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{metrics_port}"],
                "labels": {
                    "namespace": service["metadata"]["namespace"],
                    "service": service["metadata"]["name"],
                    "endpoint": endpoint["port"],
                    "pod": POD,
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory, test_repository: Path
) -> Iterator[Monitored]:
    objects, _ = render(monitoring_values())
    container = find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    chart_metrics_args = [a for a in container["args"] if a.startswith("--metrics-config=")]
    assert chart_metrics_args, "the chart's Triton exposes no latency summaries"
    (prom_port,) = free_ports(1)
    triton = local_triton(
        pin_test_repository(test_repository, tmp_path_factory.mktemp("monitored-served")),
        tmp_path_factory.mktemp("monitored-triton"),
        # Triton refreshes its metrics once a second by default (--metrics-interval-ms).
        extra_args=chart_metrics_args,
    )
    with triton:
        config = scrape_config(objects, triton.metrics_port)
        with LocalPrometheus(
            tmp_path_factory.mktemp("prometheus"), prom_port, [config]
        ) as prometheus:
            monitored = Monitored(triton, prometheus, objects, 1.0)
            wait_until(monitored, f"count_over_time(up[{WINDOW}]) >= 3")
            yield monitored


def wait_until(m: Monitored, expr: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not values(m.prometheus.query(expr)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr} stayed empty for {timeout}s")
        time.sleep(m.interval_s)


def adapter_query(m: Monitored) -> str:
    """The adapter rule's query as prometheus-adapter sends it for our pod."""
    query = str(adapter_rule(m.objects)["metricsQuery"])
    return query.replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}", pod="{POD}"').replace(
        "<<.GroupBy>>", "pod"
    )


def queue_time_us(m: Monitored) -> float:
    (value,) = values(m.prometheus.query(adapter_query(m)))
    return value


def firing(m: Monitored, alert: str) -> list[dict[str, Any]]:
    return m.prometheus.query(alerts(m.objects)[alert]["expr"])


def send_failing_requests(triton: LocalTriton, n: int) -> int:
    grpc = client.grpc_module()
    connection = grpc.InferenceServerClient(triton.grpc_url)
    failed = 0
    try:
        for _ in range(n):
            request = grpc.InferInput("input", [1, 784], "FP32")
            request.set_data_from_numpy(np.zeros((1, 784), np.float32))
            try:
                connection.infer("failing", [request])
            except InferenceServerException:
                failed += 1
    finally:
        connection.close()
    return failed


def perf_analyzer(url: str, concurrency: int) -> subprocess.Popen[str]:
    """perf_analyzer flooding MODEL over gRPC until stopped (a long measurement window)."""
    binary = Path(os.environ.get("PERF_ANALYZER") or REPO / ".venv-perf/bin/perf_analyzer")
    if not binary.is_file():
        pytest.fail(f"no perf_analyzer at {binary}: run `make test` (it installs .venv-perf)")
    libs = sorted(binary.parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(
            [*map(str, libs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
        ),
    }
    return subprocess.Popen(
        [
            str(binary),
            *("-m", MODEL, "-u", url, "-i", "grpc", "-b", "1"),
            *("--concurrency-range", f"{concurrency}:{concurrency}"),
            *("--measurement-interval", "600000"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def test_prometheus_scrapes_triton_as_the_service_monitor_says(monitored: Monitored) -> None:
    (target,) = monitored.prometheus.targets_up()
    assert target["labels"]["job"] == "demo-mnist-pipeline-triton"
    assert target["scrapeUrl"] == monitored.triton.metrics_url
    assert target["scrapeInterval"] == "1s"
    assert values(monitored.prometheus.query(f'nv_inference_request_success{{model="{MODEL}"}}'))


def test_metrics_idle_then_failing_then_overloaded(monitored: Monitored) -> None:
    """One story, in order, because the phases share the server and the windows."""
    m = monitored
    # Idle: no request at all. clamp_min makes the wait 0, not "no data" (NaN).
    idle = queue_time_us(m)
    assert idle < QUEUE_THRESHOLD_US / 10
    for alert in ("TritonInferenceFailures", "TritonQueueTimeHigh", "TritonDown"):
        assert firing(m, alert) == [], alert
    assert firing(m, "TritonModelNotReady") == []

    assert send_failing_requests(m.triton, 20) == 20
    time.sleep(3 * m.interval_s)
    failing = firing(m, "TritonInferenceFailures")
    assert [r["metric"]["model"] for r in failing] == ["failing"]
    assert float(failing[0]["value"][1]) > 0.5

    load = perf_analyzer(m.triton.grpc_url, concurrency=64)
    try:
        # A few scrapes into the load, so that every rate has two samples of it.
        wait_until(m, f'increase(nv_inference_request_success{{model="{MODEL}"}}[{WINDOW}]) > 0')
        time.sleep(5 * m.interval_s)
        overload = queue_time_us(m)
        queue_alert = firing(m, "TritonQueueTimeHigh")
        panels = {
            (p.title, legend): m.prometheus.query(
                expand(expr, {"namespace": NAMESPACE, "pod": ".*", "__rate_interval": WINDOW})
            )
            for p in dashboard_panels()
            for legend, expr in p.targets
        }
    finally:
        load.terminate()
        output, _ = load.communicate(timeout=60)
    print(
        f"\nqueue time per request (adapter rule): idle {idle:.0f} µs, overload {overload:.0f} µs"
    )
    assert overload > QUEUE_THRESHOLD_US, output[-2000:]
    assert [r["metric"]["pod"] for r in queue_alert] == [POD]
    empty = [key for key, result in panels.items() if not values(result)]
    assert empty == [], f"panels without data under load: {empty}"
