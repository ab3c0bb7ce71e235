"""Prometheus metrics of the daemon.

Every metric takes an injected ``CollectorRegistry`` (tests use a fresh one and
``registry.get_sample_value``). Names carry the ``ghostserve_`` prefix and base
units; counters end in ``_total``. The dashboard and alert rules in ``deploy/``
may use only the names listed in :data:`METRIC_NAMES` (a test holds them to it).

Updating a metric is thread-safe (prometheus_client locks internally).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The daemon's metrics, registered into ``registry``."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        g = ["group"]
        self.encoded_bytes = Counter(
            "ghostserve_encoded_bytes_total", "Data bytes encoded into parity", g, registry=registry)
        self.encode_seconds = Counter(
            "ghostserve_encode_seconds_total", "Seconds spent encoding parity", g, registry=registry)
        self.steps_encoded = Counter(
            "ghostserve_steps_encoded_total", "Engine steps whose KV writes are protected", g,
            registry=registry)
        self.encodes = Counter(
            "ghostserve_encodes_total", "Encodes run (consecutive steps encoded together count once)", g,
            registry=registry)
        self.commits = Counter(
            "ghostserve_commits_total", "Step commits received from workers", g, registry=registry)
        self.lag_steps = Gauge(
            "ghostserve_checkpoint_lag_steps",
            "Newest committed step minus newest protected step", g, registry=registry)
        self.lag_seconds = Gauge(
            "ghostserve_checkpoint_lag_seconds",
            "How long the oldest committed step not yet protected has waited (0: none waits)", g,
            registry=registry)
        self.protected_bytes = Gauge(
            "ghostserve_protected_bytes", "KV bytes (all ranks) covered by parity", g,
            registry=registry)
        self.parity_bytes = Gauge(
            "ghostserve_parity_bytes", "Parity bytes holding protection now", g, registry=registry)
        self.parity_arena_bytes = Gauge(
            "ghostserve_parity_arena_bytes", "Host memory reserved for parity", g, registry=registry)
        self.kv_bytes = Gauge(
            "ghostserve_kv_bytes", "Registered KV bytes (all ranks)", g, registry=registry)
        self.ranks = Gauge(
            "ghostserve_ranks", "Ranks by state (alive, lost, detached)", ["group", "state"],
            registry=registry)
        self.degraded = Gauge(
            "ghostserve_group_degraded", "1 while a group has a lost rank", g, registry=registry)
        self.ended = Gauge(
            "ghostserve_group_ended", "1 while a group's engine has ended (kept for a resume until dropped)", g,
            registry=registry)
        self.failures = Counter(
            "ghostserve_failures_total", "Rank failures detected, by kind", ["group", "kind"],
            registry=registry)
        self.restores = Counter(
            "ghostserve_restores_total", "Rank restores, by outcome", ["group", "outcome"],
            registry=registry)
        self.restore_seconds = Histogram(
            "ghostserve_restore_seconds", "Duration of a rank restore", g,
            buckets=_SECONDS_BUCKETS, registry=registry)
        self.restored_bytes = Counter(
            "ghostserve_restored_bytes_total", "KV bytes rebuilt onto replacement ranks", g,
            registry=registry)
        self.unrecoverable_bytes = Counter(
            "ghostserve_unrecoverable_bytes_total",
            "Protected KV bytes that could not be rebuilt (too many bad shards)", g,
            registry=registry)
        self.corruption = Counter(
            "ghostserve_corruption_detected_total",
            "Survivor chunks whose checksum did not match at restore or scrub", g,
            registry=registry)
        self.rejected = Counter(
            "ghostserve_rejected_requests_total", "Requests refused, by method and status code",
            ["method", "code"], registry=registry)
        self.encode_failures = Counter(
            "ghostserve_encode_failures_total",
            "Steps whose encoding failed inside the daemon (their writes are unprotected)", g,
            registry=registry)
        self.fetches = Counter(
            "ghostserve_fetches_total", "Fetches of an ended engine's blocks into a new engine, by outcome",
            ["group", "outcome"], registry=registry)
        self.fetch_seconds = Histogram(
            "ghostserve_fetch_seconds", "Duration of a fetch", g, buckets=_SECONDS_BUCKETS,
            registry=registry)
        self.fetched_bytes = Counter(
            "ghostserve_fetched_bytes_total", "KV bytes fetched from ended engines' groups", g,
            registry=registry)
        self.groups_dropped = Counter(
            "ghostserve_groups_dropped_total",
            "Groups dropped with their shared memory, by reason (clean, ttl, space, operator)",
            ["reason"], registry=registry)
        self.dropped_bytes = Counter(
            "ghostserve_dropped_bytes_total", "Shared-memory bytes given back by dropped groups", ["reason"],
            registry=registry)

        # the off-node mirror (--store)
        self.mirrored_bytes = Counter(
            "ghostserve_mirrored_bytes_total", "KV bytes (all ranks) copied into other nodes' store segments", g,
            registry=registry)
        self.mirror_lag_steps = Gauge(
            "ghostserve_mirror_lag_steps",
            "Newest protected step minus the newest step whose full blocks are all off-node", g, registry=registry)
        self.mirror_remote_bytes = Gauge(
            "ghostserve_mirror_remote_bytes", "Bytes of a group's KV held in other nodes' store segments", g,
            registry=registry)
        self.mirror_refused = Counter(
            "ghostserve_mirror_refused_total",
            "Blocks not mirrored, by reason (no_room, local: placed on this node, unsettled: changed or unprotected)",
            ["reason"], registry=registry)
        self.mirror_dropped_blocks = Counter(
            "ghostserve_mirror_dropped_blocks_total",
            "Blocks whose mirroring was given up (the backlog outgrew --mirror-backlog-blocks)", registry=registry)
        self.store_errors = Counter(
            "ghostserve_store_errors_total", "Store operations that failed, by operation", ["op"], registry=registry)
        self.store_up = Gauge(
            "ghostserve_store_up", "1 while the store answers (0: unreachable, or not joined yet)", registry=registry)
        self.store_fetches = Counter(
            "ghostserve_store_fetches_total", "Fetches served from the store, by outcome (ok, partial)", ["outcome"],
            registry=registry)
        self.store_fetched_bytes = Counter(
            "ghostserve_store_fetched_bytes_total", "KV bytes fetched from the store", registry=registry)

    def forget_group(self, group: str) -> None:
        """Remove every label set of ``group`` (a dropped group leaves no series behind)."""
        for collector in self._collectors():
            labelnames = getattr(collector, "_labelnames", ())
            if not labelnames or labelnames[0] != "group":
                continue
            for family in collector.collect():
                seen = {tuple(s.labels.get(n, "") for n in labelnames) for s in family.samples
                        if s.labels.get("group") == group}
                for values in seen:
                    try:
                        collector.remove(*values)
                    except KeyError:
                        pass

    def _collectors(self) -> list:
        return [v for v in vars(self).values() if hasattr(v, "describe")]


def metric_names() -> set[str]:
    """Every sample name a daemon exports (histogram and counter suffixes included)."""
    names: set[str] = set()
    for collector in Metrics(CollectorRegistry())._collectors():
        for family in collector.describe():
            names.add(family.name)
            if family.type == "counter":
                names.update(family.name + s for s in ("_total", "_created"))
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
    return names
