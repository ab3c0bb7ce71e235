"""Prometheus metrics of ``ghostserve front`` and ``ghostserve vllm``, on an
injected ``CollectorRegistry``. Names carry the ``ghostserve_front_`` prefix and
base units; counters end in ``_total``. Updating a metric is thread-safe."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# a resume's client-visible gap: a move to a live replica (under a second to a few),
# or an engine restart (seconds to minutes)
_GAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)

#: how a resumed request went on (the ``how`` label of resume_seconds)
RESUME_HOW = ("moved", "restarted")

#: reasons a request fails (the ``reason`` label of requests_failed_total)
FAIL_REASONS = ("upstream_down", "unresumable", "resume_timeout", "resume_limit", "upstream_error",
                "client_disconnect", "shutdown", "bad_request")


class FrontMetrics:
    """The front's metrics (and the supervisor's, for ``ghostserve vllm``)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "ghostserve_front_requests_total", "Generation requests received", ["endpoint", "stream"],
            registry=registry)
        self.resumed = Counter(
            "ghostserve_front_requests_resumed_total", "Requests continued on a new engine after a failure",
            ["endpoint"], registry=registry)
        self.resume_seconds = Histogram(
            "ghostserve_front_resume_seconds",
            "Client-visible gap of a resume: last output before the failure to the first after it; "
            "how: moved (to another upstream) or restarted (the same upstream, a new engine)",
            ["how"], buckets=_GAP_BUCKETS, registry=registry)
        self.failed = Counter(
            "ghostserve_front_requests_failed_total", "Requests that ended with an error, by reason",
            ["reason"], registry=registry)
        self.resume_prompt_tokens = Counter(
            "ghostserve_front_resume_prompt_tokens_total",
            "Prompt tokens of resubmissions (original prompt + tokens generated before the failure)",
            registry=registry)
        self.resume_cached_tokens = Counter(
            "ghostserve_front_resume_cached_tokens_total",
            "Of those, tokens the new engine reported as cached (loaded, not prefilled)", registry=registry)
        self.in_flight = Gauge(
            "ghostserve_front_requests_in_flight", "Generation requests being served", registry=registry)
        self.upstream_streams = Gauge(
            "ghostserve_front_upstream_streams",
            "Requests the upstream has accepted (answered 200) and is still streaming", ["upstream"],
            registry=registry)
        self.upstream_up = Gauge(
            "ghostserve_front_upstream_up", "1 while the upstream takes requests", ["upstream"], registry=registry)
        self.upstream_in_flight = Gauge(
            "ghostserve_front_upstream_requests_in_flight", "Requests sent to the upstream and not ended there",
            ["upstream"], registry=registry)
        self.moves_out = Counter(
            "ghostserve_front_moves_out_total", "Requests that left the upstream because it failed under them",
            ["upstream"], registry=registry)
        self.moves_in = Counter(
            "ghostserve_front_moves_in_total", "Requests resumed on the upstream after another failed under them",
            ["upstream"], registry=registry)
        # ghostserve vllm
        self.engine_starts = Counter(
            "ghostserve_front_engine_starts_total", "vLLM server starts (the first and every restart)",
            registry=registry)
        self.engine_deaths = Counter(
            "ghostserve_front_engine_deaths_total", "vLLM engines that died or were stopped, by cause",
            ["cause"], registry=registry)
        self.engine_start_seconds = Histogram(
            "ghostserve_front_engine_start_seconds", "vLLM server start to a healthy /health",
            buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900), registry=registry)
        self.daemon_restarts = Counter(
            "ghostserve_front_daemon_restarts_total",
            "Restarts of the ghostserve daemon this command started, after it exited unasked", registry=registry)
        self.groups_dropped = Counter(
            "ghostserve_front_groups_dropped_total",
            "Ended engines' ghostserve groups dropped after their requests resumed", registry=registry)
        for reason in FAIL_REASONS:  # every series exists from the start (rate() needs it)
            self.failed.labels(reason)
        for how in RESUME_HOW:
            self.resume_seconds.labels(how)

    def add_upstream(self, name: str) -> None:
        """Every per-upstream series exists from the start."""
        for m in (self.upstream_streams, self.upstream_up, self.upstream_in_flight, self.moves_out, self.moves_in):
            m.labels(name)
