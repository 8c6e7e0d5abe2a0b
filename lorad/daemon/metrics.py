"""This node's Prometheus endpoint (`metrics_listen: host:port`), served by prometheus_client's own
HTTP server on a daemon thread, with a registry of its own (never the process-global one).

Most figures are read from the daemon's state when a scrape comes (a custom collector: three SQL
aggregate queries, those `lorad status` makes plus a GROUP BY of the refusals; no LoRA file is read),
so they cannot drift from what `lorad status` says; only what happens (a job finishing) is counted as it happens, by the worker's hook.

In a fleet the queue, the library and the refusals are the fleet's (one database), the job counters
and the duration histogram this node's own, and `lorad_folder_leader` says which folders this node
watches now.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorad import __version__
from lorad.daemon.config import listen_text
from lorad.daemon.queue import STATES as QUEUE_STATES
from lorad.errors import LoradError
from lorad.library.refusals import CAUSES as REFUSAL_CAUSES
from lorad.log import get_logger

if TYPE_CHECKING:
    from lorad.daemon.config import Config
    from lorad.daemon.queue import Queue
    from lorad.library.library import Library

log = get_logger("lorad.daemon.metrics")

METRICS_EXTRA = "pip install 'lorad[metrics]'"
# Seconds: a tiny LoRA on a warm reduction process takes a tenth of a second; a large one on a busy
# CPU, or with a quality check, many minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)


class MetricsParts(Protocol):
    """What the collector reads of the running daemon (lorad.daemon.daemon.Daemon has it)."""

    config: Config
    library: Library
    queue: Queue
    device: str

    def leading(self) -> Mapping[Path, bool]: ...


class MetricsError(LoradError):
    """The endpoint cannot be served as configured."""


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsError(f"metrics_listen is set but prometheus_client is not installed: {METRICS_EXTRA} "
                           "(or remove metrics_listen)") from None  # fmt: skip
    return prometheus_client


class Metrics:
    """The registry, the event counters the worker feeds, and the HTTP server."""

    def __init__(self, daemon: MetricsParts, listen: tuple[str, int]) -> None:
        client = _client()  # refuse before anything starts when the extra is missing
        self.listen = listen
        self.registry = client.CollectorRegistry(auto_describe=False)
        self.jobs_done = client.Counter(
            "lorad_jobs_done", "Jobs this node completed (a variant recorded) since it started.",
            registry=self.registry)  # fmt: skip
        self.jobs_failed = client.Counter(
            "lorad_jobs_failed", "Job attempts on this node that failed since it started; "
            "retried=true: the job went back to pending, false: it failed for good.",
            ["retried"], registry=self.registry)  # fmt: skip
        self.job_duration = client.Histogram(
            "lorad_job_duration_seconds", "Wall time of the jobs this node finished, by outcome (done or failed).",
            ["outcome"], buckets=DURATION_BUCKETS, registry=self.registry)  # fmt: skip
        for retried in ("true", "false"):
            self.jobs_failed.labels(retried=retried)
        for outcome in ("done", "failed"):
            self.job_duration.labels(outcome=outcome)
        self.registry.register(StateCollector(daemon))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def job_finished(self, state: str, seconds: float) -> None:
        """The worker's hook, once the job's outcome is recorded: `state` is the job's state after it
        (done; pending: failed, to be retried; failed: failed for good)."""
        if state == "done":
            self.jobs_done.inc()
            self.job_duration.labels(outcome="done").observe(seconds)
        else:
            self.jobs_failed.labels(retried="true" if state == "pending" else "false").inc()
            self.job_duration.labels(outcome="failed").observe(seconds)

    @property
    def address(self) -> str:
        return listen_text(self.listen)

    def start(self) -> None:
        host, port = self.listen
        try:
            self._server, self._thread = _client().start_http_server(port, host, registry=self.registry)
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise MetricsError(f"metrics_listen {self.address}: cannot serve the metrics there: {why}") from None
        log.info("serving metrics", address=f"http://{self.address}/metrics")

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None


class StateCollector:
    """The figures read from the daemon's state at each scrape."""

    def __init__(self, daemon: MetricsParts) -> None:
        self.d = daemon
        self._failing = False

    def describe(self) -> Sequence[Any]:
        return ()  # nothing checked at registration: collect() needs a started daemon

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        d = self.d
        node = getattr(d.config, "node", None) or socket.gethostname()
        yield InfoMetricFamily("lorad", "This lorad daemon.", value={"version": __version__, "node": node,
                                                                     "device": d.device})  # fmt: skip
        leader = GaugeMetricFamily("lorad_folder_leader", "1 while this node watches the folder, else 0.",
                                   labels=["folder"])  # fmt: skip
        for folder, held in sorted(d.leading().items()):
            leader.add_metric([str(folder)], 1.0 if held else 0.0)
        yield leader
        up = "1 when this scrape's database queries answered, else 0 (and the figures below are left out)."
        try:
            counts = d.queue.counts()
            totals = d.library.totals()
            refused = d.library.refusal_counts()
        except Exception as e:  # noqa: BLE001 - a scrape must answer while the database is away
            if not self._failing:
                log.warning("metrics: the database did not answer", error=str(e))
            self._failing = True
            yield GaugeMetricFamily("lorad_database_up", up, value=0.0)
            return
        self._failing = False
        yield GaugeMetricFamily("lorad_database_up", up, value=1.0)
        jobs = GaugeMetricFamily("lorad_queue_jobs", "Jobs in the queue, by state.", labels=["state"])
        for state in dict.fromkeys((*QUEUE_STATES, *counts)):
            jobs.add_metric([state], float(counts.get(state, 0)))
        yield jobs
        figures = {
            "lorad_queue_depth": ("Jobs pending or running (lorad status' queue_depth).",
                                  counts.get("pending", 0) + counts.get("running", 0)),
            "lorad_loras": ("LoRAs in the library.", totals.loras),
            "lorad_original_bytes": ("Bytes of the LoRAs' originals.", totals.original_bytes),
            "lorad_active_bytes": ("Bytes the LoRAs' paths hold now (their active variants).", totals.active_bytes),
            "lorad_saved_bytes": ("Bytes saved: originals minus active variants (lorad status' saved_bytes).",
                                  totals.saved_bytes),
        }  # fmt: skip
        for name, (text, figure) in figures.items():
            yield GaugeMetricFamily(name, text, value=float(figure))
        causes = GaugeMetricFamily("lorad_refused_files", "Watched paths lorad refuses to take, by cause.",
                                   labels=["cause"])  # fmt: skip
        for cause in dict.fromkeys((*REFUSAL_CAUSES, *refused)):
            causes.add_metric([cause], float(refused.get(cause, 0)))
        yield causes
