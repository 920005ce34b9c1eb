"""gRPC client: send real MNIST test images to Triton, keep 10 predictions, measure latency.

numpy, tritonclient and matplotlib only (no torch): the client image installs just these
and the package's data/storage/client modules. Images are normalised by data.normalize,
exactly as in training, so the accuracy measured here is the served model's accuracy.

Writes STORAGE/inference/<UTC timestamp>/:
  samples.json   10 predictions: test index, true label, predicted label, probabilities
  latency.json   latency percentiles, throughput, accuracy, what was served; status
  latency.png    latency histogram and CDF, with p50, p99 and throughput on the plot
  inference.log  this run's log
"""

from __future__ import annotations

import io
import logging
import math
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline import data, interrupts, settings
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.repository import open_repository, resolve_version
from mnist_pipeline.storage import (
    ModelRepository,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    inference_dir,
    log_error_to,
    repository_at,
)

log = logging.getLogger(__name__)

SAMPLES = 10


@dataclass(frozen=True)
class InferConfig(settings.Settings):
    """The client's settings (settings.py declares each)."""

    url: str = settings.URL.field()
    model_name: str = settings.MODEL_NAME.field()
    model_version: str = settings.MODEL_VERSION.field()  # "": the server's choice
    lb_policy: str = settings.LB_POLICY.field()
    requests: int = settings.REQUESTS.field()
    concurrency: int = settings.CONCURRENCY.field()
    images_per_request: int = settings.IMAGES_PER_REQUEST.field()
    warmup: int = settings.WARMUP.field()
    timeout: float = settings.TIMEOUT.field()  # for the server, or its return mid-run
    request_timeout: float = settings.REQUEST_TIMEOUT.field()
    max_seconds: float = settings.MAX_SECONDS.field()  # a slow server cannot hold the client
    output: Path | None = settings.OUTPUT.field()  # noqa: RUF009 (None: STORAGE/inference)
    min_accuracy: float = settings.MIN_ACCURACY.field()


DNS_MIN_RESOLUTION_INTERVAL_MS = 1000


def lb_policy(cfg: InferConfig) -> str:
    if cfg.lb_policy != "auto":
        return cfg.lb_policy
    return "round_robin" if cfg.url.startswith(settings.DNS_TARGET) else "pick_first"


def new_client(cfg: InferConfig) -> Any:
    """A gRPC client of cfg.url with cfg's load-balancing policy. tritonclient uses its
    channel_args instead of its own options, not on top of them: its message-size limits
    and keepalive settings (as tritonclient 2.73 sets them) are passed again."""
    grpc = grpc_module()
    keepalive = grpc.KeepAliveOptions()
    options = [
        ("grpc.max_send_message_length", grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", lb_policy(cfg)),
        # A dns: target is looked up again when a connection closes (Triton's maximum
        # connection age): at most every 30 s by gRPC's default, which would keep a
        # replica added since out of rotation that long after the age.
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
    ]
    return grpc.InferenceServerClient(cfg.url, channel_args=options)


def answers_http(url: str, timeout: float = 2.0) -> bool:
    """Whether HOST:PORT speaks plain HTTP/1 (Triton's HTTP port), which the gRPC client
    only reports as a closed socket."""
    parts = urllib.parse.urlsplit(f"//{url}")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nHost: triton\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str  # as asked; the version that answered is in each response
    input_name: str
    input_datatype: str
    input_dims: tuple[int, ...]
    output_name: str
    max_batch_size: int


def grpc_module() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as e:
        raise UsageError(
            "tritonclient is not installed: pip install 'mnist-pipeline[client]'"
        ) from e
    return grpcclient


def wait_until_ready(client: Any, cfg: InferConfig) -> None:
    """Poll server live, server ready, model ready with exponential backoff, within cfg.timeout.

    A missing model fails at once, naming what the server has: with model-control-mode
    none a ready server will not load it later.
    """
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + cfg.timeout
    delay, attempt, last = 0.1, 0, "no answer yet"
    while True:
        attempt += 1
        call_timeout = max(0.1, min(5.0, deadline - time.monotonic()))
        try:
            if not client.is_server_live(client_timeout=call_timeout):
                last = "server not live"
            elif not client.is_server_ready(client_timeout=call_timeout):
                last = "server live but not ready (loading models?)"
            elif client.is_model_ready(
                cfg.model_name, cfg.model_version, client_timeout=call_timeout
            ):
                log.info("server and model %s ready at %s", cfg.model_name, cfg.url)
                return
            else:
                raise PipelineFailure(_missing_model_message(client, cfg, call_timeout))
        except InferenceServerException as e:
            last = str(e).splitlines()[0]
            if attempt == 1 and answers_http(settings.grpc_endpoint(cfg.url)):
                raise UsageError(
                    f"{cfg.url} answers HTTP, not gRPC: that is Triton's HTTP port; give "
                    "its gRPC port (8001 by default)"
                ) from e
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PipelineFailure(
                f"Triton at {cfg.url} not ready after {cfg.timeout:.0f} s "
                f"({attempt} attempts); last: {last}"
            )
        log.debug("waiting for Triton at %s: %s; retry in %.1f s", cfg.url, last, delay)
        time.sleep(min(delay, remaining))
        delay = min(5.0, delay * 2)


def _missing_model_message(client: Any, cfg: InferConfig, call_timeout: float) -> str:
    from tritonclient.utils import InferenceServerException

    wanted = cfg.model_name + (f" version {cfg.model_version}" if cfg.model_version else "")
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=call_timeout)
    except InferenceServerException as e:
        # An exposed Triton restricts its repository API (the chart's restrictedApis).
        return f"model {wanted} is not ready on Triton at {cfg.url} (its models: {e})"
    available = [
        f"{m['name']}:{m.get('version', '?')} ({m.get('state', 'unknown')})"
        for m in index.get("models", [])
    ]
    return (
        f"model {wanted} is not ready on Triton at {cfg.url}; "
        f"available: {', '.join(available) or 'no models'}"
    )


def read_model_info(client: Any, cfg: InferConfig) -> ModelInfo:
    from tritonclient.utils import InferenceServerException

    try:
        config = client.get_model_config(
            cfg.model_name, cfg.model_version, as_json=True, client_timeout=cfg.request_timeout
        )["config"]
    except InferenceServerException as e:
        raise PipelineFailure(f"cannot read the config of model {cfg.model_name}: {e}") from e
    if len(config.get("input", [])) != 1 or not config.get("output"):
        raise PipelineFailure(
            f"model {cfg.model_name}: expected one input and an output, config has "
            f"{[t['name'] for t in config.get('input', [])]} → "
            f"{[t['name'] for t in config.get('output', [])]}"
        )
    tensor = config["input"][0]
    dims = tuple(int(d) for d in tensor["dims"])
    # -1 (variable) dims take MNIST's own size in that position.
    mnist_shape = (1, data.ROWS, data.COLS)[-len(dims) :] if len(dims) <= 3 else ()
    dims = tuple(m if d == -1 else d for d, m in zip(dims, mnist_shape, strict=False))
    if math.prod(dims) != data.ROWS * data.COLS or any(d < 1 for d in dims):
        raise PipelineFailure(
            f"model {cfg.model_name}: input {tensor['name']} has dims {list(dims)}, "
            f"which do not hold a {data.ROWS}x{data.COLS} image"
        )
    return ModelInfo(
        name=config["name"],
        version=cfg.model_version,
        input_name=tensor["name"],
        input_datatype=tensor["data_type"].removeprefix("TYPE_"),
        input_dims=dims,
        output_name=config["output"][0]["name"],
        max_batch_size=int(config.get("max_batch_size", 0)),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def percentile_summary(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    a = np.asarray(latencies_ms)
    return {
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


class Driver:
    """Sends requests from `concurrency` threads, each with its own gRPC connection."""

    def __init__(
        self, cfg: InferConfig, info: ModelInfo, x: np.ndarray, labels: np.ndarray
    ) -> None:
        self.cfg, self.info, self.x, self.labels = cfg, info, x, labels
        self.grpc = grpc_module()
        from tritonclient.utils import triton_to_np_dtype

        self.dtype = triton_to_np_dtype(info.input_datatype)
        self.clients = [new_client(cfg) for _ in range(cfg.concurrency)]
        self.lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self.correct = self.images = 0
        self.errors: list[str] = []
        self.served_versions: set[str] = set()
        self.tally: dict[str, list[int]] = {}  # version -> [correct, images]: canaries
        self.outputs: dict[int, np.ndarray] = {}  # test index → logits, for the samples
        self.next_request = 0
        self.stop = threading.Event()
        self.started = time.perf_counter()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def indices(self, request: int) -> np.ndarray:
        """Request k carries the test images k*b … k*b+b-1, wrapping around the test set."""
        b = self.cfg.images_per_request
        return np.arange(request * b, request * b + b) % len(self.x)

    def _send(self, client: Any, idx: np.ndarray) -> tuple[float, np.ndarray, str]:
        shape = ((len(idx),) if self.info.max_batch_size > 0 else ()) + self.info.input_dims
        batch = self.x[idx].reshape(shape).astype(self.dtype, copy=False)
        tensor = self.grpc.InferInput(
            self.info.input_name, list(batch.shape), self.info.input_datatype
        )
        tensor.set_data_from_numpy(batch)
        output = self.grpc.InferRequestedOutput(self.info.output_name)
        t0 = time.perf_counter()
        result = client.infer(
            self.info.name,
            [tensor],
            model_version=self.cfg.model_version,
            outputs=[output],
            client_timeout=self.cfg.request_timeout,
        )
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        logits = result.as_numpy(self.info.output_name).reshape(len(idx), -1)
        return elapsed_ms, logits, result.get_response().model_version

    def _send_retrying(
        self, client: Any, request: int, idx: np.ndarray
    ) -> tuple[float, np.ndarray, str]:
        """Send one request; while the server is unreachable (a Triton pod restarting, a
        dropped connection) retry it with backoff for up to cfg.timeout seconds. Only the
        attempt that is answered is timed; any other error fails at once."""
        deadline, delay = None, 0.1
        while True:
            try:
                return self._send(client, idx)
            except Exception as e:
                if not is_unavailable(e) or self.stop.is_set():
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.cfg.timeout
                    log.warning(
                        "request %d: server unavailable (%s); retrying for up to %.0f s",
                        request,
                        str(e).splitlines()[0],
                        self.cfg.timeout,
                    )
                if now >= deadline:
                    raise PipelineFailure(
                        f"server unavailable for {self.cfg.timeout:.0f} s "
                        f"(last: {str(e).splitlines()[0]})"
                    ) from e
                time.sleep(min(delay, deadline - now))
                delay = min(2.0, delay * 2)

    def drive(self, count: int, record: bool) -> float:
        """Send requests 0 … count-1; return the wall time. Stops at the first error."""
        stop = self.stop = threading.Event()
        deadline = time.monotonic() + self.cfg.max_seconds
        self.next_request, end = 0, count

        def worker(client: Any) -> None:
            while not stop.is_set():
                with self.lock:
                    request = self.next_request
                    if request >= end:
                        return
                    self.next_request += 1
                if time.monotonic() > deadline:
                    self._fail(f"time limit of {self.cfg.max_seconds:.0f} s reached", stop)
                    return
                idx = self.indices(request)
                try:
                    elapsed_ms, logits, version = self._send_retrying(client, request, idx)
                except Exception as e:
                    self._fail(f"request {request}: {str(e).splitlines()[0]}", stop)
                    return
                if record:
                    self._record(idx, elapsed_ms, logits, version)

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in self.clients]
        self.started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - self.started

    def _fail(self, reason: str, stop: threading.Event) -> None:
        with self.lock:
            self.errors.append(reason)
        stop.set()
        log.error("%s", reason)

    def _record(self, idx: np.ndarray, elapsed_ms: float, logits: np.ndarray, version: str) -> None:
        predicted = logits.argmax(axis=1)
        with self.lock:
            self.latencies_ms.append(elapsed_ms)
            self.images += len(idx)
            correct = int((predicted == self.labels[idx]).sum())
            self.correct += correct
            self.served_versions.add(version)
            tally = self.tally.setdefault(version, [0, 0])
            tally[0], tally[1] = tally[0] + correct, tally[1] + len(idx)
            for i, row in zip(idx.tolist(), logits, strict=True):
                if i < SAMPLES:  # requests start at test image 0: the same samples every run
                    self.outputs[i] = row


def is_unavailable(e: Exception) -> bool:
    """gRPC UNAVAILABLE: nothing answered (refused, reset, no route), so the request can be
    sent again; errors the server returned are final."""
    status = getattr(e, "status", None)
    return callable(status) and status() == "StatusCode.UNAVAILABLE"


def new_output_dir(root: Path) -> Path:
    """A new folder named by the UTC time under `root` (STORAGE/inference or --output)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        out = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise PipelineFailure(f"could not create a new folder under {root}")


def latency_figure(latencies_ms: list[float], title: str, images_per_s: float) -> Any:
    """Histogram and CDF of the latencies, with p50, p99 and the throughput on the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.sort(np.asarray(latencies_ms))
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 4))
    hist.hist(a, bins=min(50, max(10, len(a) // 10)), color="tab:blue")
    hist.set_xlabel("latency (ms)")
    hist.set_ylabel("requests")
    cdf.plot(a, np.arange(1, len(a) + 1) / len(a), color="tab:blue")
    for q, style in ((50, "--"), (99, ":")):
        value = float(np.percentile(a, q))
        cdf.axvline(value, color="tab:red", linestyle=style, label=f"p{q} {value:.2f} ms")
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.legend(title=f"{images_per_s:.0f} images/s", loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_latency(latencies_ms: list[float], title: str, images_per_s: float, path: Path) -> None:
    fig = latency_figure(latencies_ms, title, images_per_s)
    import matplotlib.pyplot as plt  # after latency_figure chose the Agg backend

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def infer(
    storage: Path,
    cfg: InferConfig,
    run_id: str | None = None,
    location: ModelRepository | None = None,
) -> dict[str, Any]:
    """Run the client; return latency.json's content. Raises PipelineFailure when it failed,
    after writing what was measured so far. --model-version run (challenger) asks for the
    version `run_id`'s export chose (the challenger), as the repository (`location`)
    records it."""
    if cfg.model_version in ("run", "challenger"):
        repo = open_repository(repository_at(location, storage), cfg.model_name)
        cfg = replace(cfg, model_version=resolve_version(repo, cfg.model_version, run_id))
    images, labels = data.load(storage, "test")
    x = data.normalize(images)
    out = new_output_dir(cfg.output or inference_dir(storage))
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mnist_pipeline").addHandler(handler)
    try:
        log.info("inference run %s against %s: %s", out.name, cfg.url, asdict(cfg))
        return _infer(cfg, x, labels, out)
    except BaseException as e:
        why = stopped_by(e) or str(e)
        log_error_to(handler, log, "inference failed: %s", why)
        raise
    finally:
        logging.getLogger("mnist_pipeline").removeHandler(handler)
        atomic_write_text(out / "inference.log", buffer.getvalue())


def stopped_by(error: BaseException) -> str | None:
    """ "interrupted (Ctrl-C)" or "interrupted (SIGTERM)" when `error` is an interrupt's."""
    interrupt = None if isinstance(error, SystemExit) else interrupts.as_interrupt(error)
    return f"interrupted ({interrupt.name})" if interrupt else None


class Results:
    """latency.json in the making: written once, with whatever was measured, however it ends."""

    def __init__(self, cfg: InferConfig, labels: np.ndarray, out: Path) -> None:
        self.labels, self.out = labels, out
        self.report: dict[str, Any] = {
            "status": "failed",
            "url": cfg.url,
            "model_name": cfg.model_name,
            "model_version_requested": cfg.model_version,
            "concurrency": cfg.concurrency,
            "images_per_request": cfg.images_per_request,
            "requests_planned": cfg.requests,
            "output_dir": str(out),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # Written at once: a client killed outright (SIGKILL, OOM) leaves a folder that says
        # it never finished, not an empty one.
        atomic_write_json(out / "latency.json", {**self.report, "status": "running"})

    def measured(self, driver: Driver, wall_s: float) -> None:
        report = self.report
        report.update(_measurements(driver, wall_s, self.labels))
        if driver.outputs:
            atomic_write_json(self.out / "samples.json", _samples(driver.outputs, self.labels))
        if driver.latencies_ms:
            images_per_s = report["throughput_images_per_s"]
            plot_latency(
                driver.latencies_ms, _title(report), images_per_s, self.out / "latency.png"
            )

    def finish(self, reason: str | None = None) -> dict[str, Any]:
        if reason:
            self.report["reason"] = reason
        else:
            self.report["status"] = "complete"
        self.report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_json(self.out / "latency.json", self.report)
        return self.report


def _infer(cfg: InferConfig, x: np.ndarray, labels: np.ndarray, out: Path) -> dict[str, Any]:
    results = Results(cfg, labels, out)
    client = new_client(cfg)
    try:
        wait_until_ready(client, cfg)
        info = read_model_info(client, cfg)
    except (PipelineFailure, UsageError) as e:
        results.finish(str(e))
        raise
    finally:
        client.close()
    if problem := batch_size_problem(info, cfg.images_per_request):
        results.finish(problem)
        raise UsageError(problem)

    driver = Driver(cfg, info, x, labels)
    try:
        wall_s = measure(driver, cfg)
    except BaseException as e:  # Ctrl-C or SIGTERM: keep what was measured
        driver.stop.set()
        results.measured(driver, time.perf_counter() - driver.started)
        results.finish(stopped_by(e) or f"{type(e).__name__}: {e}")
        raise
    finally:
        driver.close()
    results.measured(driver, wall_s)
    if problem := outcome_problem(cfg, driver, results.report):
        results.finish(problem)
        raise PipelineFailure(f"inference failed: {problem} (results in {out})")
    report = results.finish()
    log.info(
        "%d requests x %d image(s) at concurrency %d: p50 %.2f ms, p99 %.2f ms, "
        "%.0f images/s, accuracy %.4f; results in %s",
        report["count"],
        cfg.images_per_request,
        cfg.concurrency,
        report["p50_ms"],
        report["p99_ms"],
        report["throughput_images_per_s"],
        report["accuracy"],
        out,
    )
    return report


def measure(driver: Driver, cfg: InferConfig) -> float:
    """Warm every connection up unmeasured, then send the measured requests: their wall time."""
    warmup = cfg.warmup and max(cfg.warmup, cfg.concurrency)
    if warmup:
        driver.drive(warmup, record=False)
    return 0.0 if driver.errors else driver.drive(cfg.requests, record=True)


def outcome_problem(cfg: InferConfig, driver: Driver, report: dict[str, Any]) -> str | None:
    """Why a measurement that ran must still fail: requests failed, another version
    answered, or the served model is less accurate than --min-accuracy."""
    if driver.errors:
        return f"{len(driver.errors)} request(s) failed: {driver.errors[0]}"
    served = report["model_version_served"]
    if cfg.model_version and served != cfg.model_version:
        return f"Triton served version {served}, not the version {cfg.model_version} asked for"
    if report["accuracy"] < cfg.min_accuracy:
        return f"accuracy {report['accuracy']:.4f} is below --min-accuracy {cfg.min_accuracy}"
    return None


def batch_size_problem(info: ModelInfo, images_per_request: int) -> str | None:
    if info.max_batch_size == 0 and images_per_request != 1:
        return f"model {info.name} does not batch: images per request must be 1"
    if info.max_batch_size and images_per_request > info.max_batch_size:
        return (
            f"{images_per_request} images per request exceed the max_batch_size "
            f"{info.max_batch_size} of model {info.name}"
        )
    return None


def _measurements(driver: Driver, wall_s: float, labels: np.ndarray) -> dict[str, Any]:
    count = len(driver.latencies_ms)
    return {
        "model_version_served": ",".join(sorted(driver.served_versions)),
        "count": count,
        "errors": len(driver.errors),
        **percentile_summary(driver.latencies_ms),
        "wall_seconds": wall_s,
        "throughput_images_per_s": driver.images / wall_s if wall_s else 0.0,
        "throughput_requests_per_s": count / wall_s if wall_s else 0.0,
        "images": driver.images,
        "accuracy": driver.correct / driver.images if driver.images else None,
        # Replicas serving different versions (a canary release) behind one name:
        "by_version": {
            v: {"images": n, "accuracy": c / n} for v, (c, n) in sorted(driver.tally.items())
        },
    }


def _samples(outputs: dict[int, np.ndarray], labels: np.ndarray) -> list[dict[str, Any]]:
    samples = []
    for index in sorted(outputs):
        probabilities = softmax(outputs[index].astype(np.float64))
        samples.append(
            {
                "test_index": index,
                "true_label": int(labels[index]),
                "predicted_label": int(probabilities.argmax()),
                "probabilities": [round(float(p), 6) for p in probabilities],
            }
        )
    return samples


def _title(report: dict[str, Any]) -> str:
    return (
        f"{report['model_name']} v{report.get('model_version_served') or '?'}: "
        f"{report.get('count', 0)} requests, concurrency {report['concurrency']}, "
        f"{report['images_per_request']} image(s)/request"
    )
