"""vLLM KV connector: vLLM's paged KV checkpointed by the ghostserve daemon.

Enable it like any out-of-tree connector::

    --kv-transfer-config '{"kv_connector": "GhostServeConnector",
      "kv_connector_module_path": "ghostserve.integrations.vllm", "kv_role": "kv_both",
      "kv_connector_extra_config": {"socket": "/run/ghostserve/gs.sock", "parity": 1}}'

What it does (docs/vllm.md has the operator's view):

vLLM builds one connector per role, and so does this one: the connector holds a
:class:`SchedulerSide` in the engine core or a :class:`WorkerSide` in each TP
worker, and passes each hook to it; :class:`Setup` is what both derive alike.

* **Worker side** (one instance per TP rank, in vLLM's worker process). At
  ``register_kv_caches`` it moves the rank's KV storage into a named POSIX
  shared-memory segment (``Tensor.set_``: vLLM keeps its tensors, their bytes now
  live where the daemon can map them) and registers it. The byte layout of a
  block is learnt, not assumed: it writes one token at a time through the
  attention backend's own ``do_kv_cache_update`` into a scratch block and records
  which bytes each slot owns (``KVLayout.slot_map``). Each step it reads the
  written slots from ``slot_mapping`` (first layer; every layer writes the same
  slots) and, in ``wait_for_save``, queues one commit (microseconds; the daemon
  encodes off the forward path). On a resumed request, ``start_load_kv`` asks the
  daemon to ``Fetch`` the request's blocks from the ended engine's group into
  this rank's new blocks, before the forward pass that needs them.
* **Scheduler side** (in the engine core). It tracks each request's tokens and
  block table, ships them to the workers in the step's metadata (rank 0 forwards
  them to the daemon's index), frees parity when a request finishes or is
  preempted (reference-counted: prefix-cached blocks may be shared), and answers
  ``get_num_new_matched_tokens`` from the daemon's ``Lookup``: a resubmitted
  request (prompt plus tokens generated so far) whose KV an ended engine left
  protected is loaded, not recomputed.

Threads: vLLM calls every hook on its own engine or worker thread; the worker
client's background thread owns the gRPC stream. Nothing here is called
concurrently by vLLM, so there are no locks.

Replicated KV heads (num_kv_heads < TP: vLLM gives each head to TP/num_kv_heads
consecutive ranks, which hold identical KV): only the first rank of each replica
set registers, so the daemon's group has num_kv_heads data shards and parity
covers distinct bytes only. The other ranks need no parity and send nothing; on
resume they copy their primary's freshly fetched blocks (after a TP barrier).

Limits: CPU KV only (the daemon has a CUDA data path, but this connector does
not yet export GPU KV over CUDA IPC); pipeline parallelism is refused; sampling
must be deterministic (greedy, or seeded) for a resumed request to continue as
it would have.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from ghostserve import shm, wire
from ghostserve.client import CONNECT_WAIT, WorkerClient, channel
from ghostserve.errors import ConfigError, GhostServeError, Unsupported
from ghostserve.integrations import common, gpukv, kvsegment
from ghostserve.integrations.common import ShardMap, fills_of, namespace_of
from ghostserve.v1 import ghostserve_pb2 as pb

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("ghostserve.vllm")
# GPU KV: steps whose interprocess events are kept for a daemon that has not
# encoded them yet (gpukv.StepEvents: older ones go once the GPU has passed them)
EVENTS_KEPT = 1024


@dataclasses.dataclass(frozen=True)
class ConnectorOptions:
    """``kv_connector_extra_config``, validated. Raises :class:`ConfigError`."""

    socket: str                      # the daemon's unix socket (or host:port)
    parity: int = 1                  # m: parity shards per stripe
    group: str = ""                  # daemon group name; default vllm-<engine_id>
    shm_prefix: str = "gs-vllm-"     # names of the ranks' KV segments
    resume: bool = True              # look requests up in ended engines' KV
    # seconds a rank's registration waits for a daemon that does not answer (one
    # restarting); then the engine runs unprotected, and says so in its log
    daemon_wait: float = CONNECT_WAIT

    def __post_init__(self) -> None:
        if not isinstance(self.socket, str) or not self.socket:
            raise ConfigError("socket", "give the ghostserve daemon's socket path")
        # the upper bound depends on the TP size: checked by the connector (shards + parity <= 255)
        if not isinstance(self.parity, int) or isinstance(self.parity, bool) or not 1 <= self.parity <= 254:
            raise ConfigError("parity", f"{self.parity!r}: an integer from 1 to 254")
        if self.group and not isinstance(self.group, str):
            raise ConfigError("group", f"{self.group!r}: a string")
        if not isinstance(self.resume, bool):
            raise ConfigError("resume", f"{self.resume!r}: true or false")
        if (not isinstance(self.daemon_wait, int | float) or isinstance(self.daemon_wait, bool)
                or not 0 <= self.daemon_wait <= 3600):
            raise ConfigError("daemon_wait", f"{self.daemon_wait!r}: seconds, from 0 to 3600")
        try:
            shm.check_name(self.shm_prefix + "x")
        except ValueError:
            raise ConfigError("shm_prefix", f"{self.shm_prefix!r}: use letters, digits and ._-") from None

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorOptions:
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown option; known: {', '.join(sorted(known))}")
        if "socket" not in extra:  # the sidecar's own variable, as in deploy/kubernetes
            if not os.environ.get("GHOSTSERVE_SOCKET"):
                raise ConfigError("socket", "missing: give the ghostserve daemon's socket path "
                                  "(kv_connector_extra_config or GHOSTSERVE_SOCKET)")
            extra["socket"] = os.environ["GHOSTSERVE_SOCKET"]
        return cls(**extra)


@dataclasses.dataclass
class Load:
    """One request's blocks to fetch from an ended engine's group."""

    request_id: str
    source_group: str
    source_blocks: list[int]
    blocks: list[int]            # this engine's blocks, same order
    tokens: int                  # slots to deliver, counted from the first block


@dataclasses.dataclass
class GhostServeMetadata(KVConnectorMetadata):
    """What the scheduler side tells every worker for one step (pickled by vLLM)."""

    requests: dict[str, int] = dataclasses.field(default_factory=dict)   # tokens written after the step
    records: list[tuple[str, list[int], list[int], bool]] = dataclasses.field(default_factory=list)
    finished: list[str] = dataclasses.field(default_factory=list)
    released: list[int] = dataclasses.field(default_factory=list)
    reprotect: dict[int, int] = dataclasses.field(default_factory=dict)  # cached blocks to encode again
    loads: list[Load] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GhostServeStats(KVConnectorStats):
    """Worker-side counters vLLM gathers from every rank and logs each interval
    (``data``: commits, fetched_bytes, fetch_seconds, fetches, load_errors)."""

    KEYS = ("commits", "fetched_bytes", "fetch_seconds", "fetches", "load_errors")

    def __post_init__(self) -> None:
        for k in self.KEYS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(self.KEYS, 0)

    def aggregate(self, other: KVConnectorStats) -> GhostServeStats:
        for k in self.KEYS:
            self.data[k] += other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: self.data[k] for k in self.KEYS}

    def is_empty(self) -> bool:
        return not any(self.data[k] for k in self.KEYS)


def probe_slot_map(layer: Any, kv: torch.Tensor, block_size: int) -> np.ndarray:
    """Which slot each byte of one block of ``kv`` belongs to, learnt by writing
    one token at a time through the layer's own attention backend into a scratch
    cache. Raises :class:`Unsupported` when the backend cannot be probed or its
    layout is not a partition of the block into slots."""
    impl = getattr(layer, "impl", None)
    if impl is None or not hasattr(impl, "do_kv_cache_update"):
        raise Unsupported(f"attention backend {type(impl).__name__} has no do_kv_cache_update to probe")
    scratch = torch.zeros((2, *kv.shape[1:]), dtype=kv.dtype)
    heads, size = layer.num_kv_heads, layer.head_size
    es = kv.element_size()
    pattern = bytes([0x81] + [0x01] * (es - 2) + [0x3F]) if es >= 2 else b"\x3f"
    value = torch.frombuffer(bytearray(pattern * heads * size), dtype=kv.dtype).view(1, heads, size)
    raw = scratch.view(torch.uint8).view(2, -1)
    slot_of = np.full(raw.shape[1], -1, dtype=np.int32)
    before = raw[1].numpy().copy()
    for s in range(block_size):
        impl.do_kv_cache_update(layer, value.clone(), value.clone(), scratch,
                                torch.tensor([block_size + s], dtype=torch.int64))
        after = raw[1].numpy()
        changed = after != before
        if (slot_of[changed] != -1).any():
            raise Unsupported("KV layout: one byte is written by two slots")
        slot_of[changed] = s
        before = after.copy()
    if (slot_of < 0).any() or raw[0].any():
        raise Unsupported("KV layout: the probe did not map every byte of a block to one slot")
    return slot_of.astype("<u2")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What both sides of the connector derive alike from vLLM's configuration.
    Raises :class:`Unsupported` or :class:`ConfigError` for what ghostserve
    cannot protect."""

    options: ConnectorOptions
    group: str                   # daemon group: vllm-<engine_id> unless named
    engine_tag: str              # in the ranks' segment names
    namespace: str               # Lookup scope (model_namespace)
    block_size: int
    shard_map: ShardMap

    @classmethod
    def of(cls, vllm_config: Any, transfer: Any, kv_cache_config: Any) -> Setup:
        options = ConnectorOptions.from_extra(transfer.kv_connector_extra_config)
        engine_id = transfer.engine_id or "default"
        if kv_cache_config is not None:
            specs = [type(g.kv_cache_spec).__name__ for g in kv_cache_config.kv_cache_groups]
            if specs != ["FullAttentionSpec"]:
                raise Unsupported(f"KV cache groups {specs}: ghostserve handles one full-attention group "
                                  "(no sliding window, hybrid or Mamba layers)")
        par = vllm_config.parallel_config
        if getattr(par, "pipeline_parallel_size", 1) > 1:
            raise Unsupported("ghostserve protects tensor-parallel groups; pipeline parallelism is not supported")
        shard_map = ShardMap.of(par.tensor_parallel_size, vllm_config.model_config.get_total_num_kv_heads())
        shard_map.check_parity(options.parity, "parity")
        return cls(options, options.group or f"vllm-{engine_id}"[:64],
                   "".join(c for c in engine_id if c.isalnum())[:12] or "engine", model_namespace(vllm_config),
                   vllm_config.cache_config.block_size, shard_map)

    def region(self, rank: int) -> str:
        """The shared-memory name of TP rank ``rank``'s KV segment."""
        return f"{self.options.shm_prefix}{self.group}-{self.engine_tag}-r{rank}"


class WorkerSide:
    """The connector in one TP worker process (vLLM's worker main thread calls
    every method): at ``register_kv_caches`` the rank's KV moves into a named
    POSIX shared-memory segment and is registered; each step queues one commit
    (``wait_for_save``); a resumed request's blocks are fetched from the ended
    engine's group before the forward that needs them (``start_load_kv``).
    A replica rank (replicated KV heads) registers nothing and copies its
    primary's fetched blocks. The ``WorkerClient``'s thread owns the gRPC stream."""

    def __init__(self, setup: Setup, vllm_config: Any):
        self.setup, self.options = setup, setup.options
        self.block_size, self.replicas = setup.block_size, setup.shard_map.replicas
        self._vllm_config = vllm_config
        self._client: WorkerClient | None = None   # None: a replica rank, or unprotected
        self._replica = False                        # holds a copy of its primary's KV heads
        self._segment: shm.Segment | None = None
        self._primary: shm.Segment | None = None     # a replica's view of its primary's KV
        self._layout: dict[str, Any] = {}
        self._rank = 0
        self._first_layer = ""
        self._block_bytes = 0
        self._step = 0
        self._slots: list[np.ndarray] = []
        self._loaded: dict[int, int] = {}
        self._load_errors: set[int] = set()
        self._events: gpukv.StepEvents | None = None  # GPU KV: one interprocess event per step
        self.stats = GhostServeStats()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Move this rank's KV into shared memory and register it. Runs once, on
        the worker's main thread, before any request."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # noqa: PLC0415

        names, tensors = list(kv_caches), list(kv_caches.values())
        first = tensors[0]
        if first.device.type == "cuda":
            self._register_gpu(names, tensors)
            return
        if first.device.type != "cpu":
            raise Unsupported(f"KV on {first.device.type}: ghostserve protects CPU and CUDA KV")
        storage = first.untyped_storage()
        es = first.element_size()
        for t in tensors:
            if t.untyped_storage().data_ptr() != storage.data_ptr():
                raise Unsupported("KV layers in separate allocations; ghostserve needs one KV buffer per rank")
            if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
                raise Unsupported("KV layers differ in shape, stride or dtype")
        if not first[0].is_contiguous():
            raise Unsupported("a KV block is not contiguous in memory")
        offsets = [t.storage_offset() * es for t in tensors]
        block_stride = first.stride(0) * es
        layer_stride = offsets[1] - offsets[0] if len(offsets) > 1 else first.shape[0] * block_stride
        if any(b - a != layer_stride for a, b in zip(offsets, offsets[1:], strict=False)) or layer_stride <= 0:
            raise Unsupported("KV layers are not evenly spaced in their buffer")
        self._block_bytes = first[0].numel() * es
        layer = self._vllm_config.compilation_config.static_forward_context[names[0]]
        slot_map = probe_slot_map(layer, first, self.block_size)
        rank = get_tensor_model_parallel_rank()
        self._rank = rank
        region = self.setup.region(rank)
        size = storage.nbytes()
        try:
            self._segment = kvsegment.allocate(self.options.socket, region, size)
        except FileExistsError:
            raise Unsupported(f"shared memory {region!r} exists: an engine with the same engine_id left it "
                              "(ghostserve drop its group with --unlink-regions, or use a new engine_id)") from None
        moved = torch.frombuffer(self._segment.buf, dtype=torch.uint8).untyped_storage()
        moved.copy_(storage)
        # Re-point every tensor over the old storage we can reach: the dict's, and the
        # views the attention layers were bound to (vLLM may reshape per kernel block
        # size). Then check that each layer really writes into the segment.
        ctx = self._vllm_config.compilation_config.static_forward_context
        bound = []
        for name in names:
            kv = getattr(ctx.get(name), "kv_cache", None)
            bound += [kv] if isinstance(kv, torch.Tensor) else [x for x in kv or [] if isinstance(x, torch.Tensor)]
        old = storage.data_ptr()
        for t in {id(x): x for x in (*tensors, *bound)}.values():
            if t.untyped_storage().data_ptr() == old:
                t.set_(moved, t.storage_offset(), t.shape, t.stride())
        base = moved.data_ptr()
        for t in (*tensors, *bound):
            if not base <= t.data_ptr() < base + size:
                raise Unsupported("a KV view vLLM uses could not be moved into shared memory")
            if t.shape != first.shape:  # the slot map was probed in the manager's block shape
                raise Unsupported(f"attention kernels use KV blocks of shape {tuple(t.shape)}, not "
                                  f"{tuple(first.shape)}; set the block size to the kernel's")
        self._first_layer = names[0]
        self._layout = layout = dict(num_layers=len(tensors), num_blocks=first.shape[0], block_bytes=self._block_bytes,
                      chunk_bytes=self._block_bytes, layer_stride=layer_stride, block_stride=block_stride,
                      offset=offsets[0], block_slots=self.block_size, slot_map=slot_map.tobytes())
        smap = self.setup.shard_map
        if smap.is_replica(rank):
            self._replica = True
            shm.unlink(region)  # nobody maps a replica's KV by name: let it go with the process
            log.info("ghostserve: rank %d replicates rank %d's KV heads: no parity needed", rank,
                     smap.primary(rank))
            return
        client = WorkerClient(self.options.socket, self.setup.group, smap.shard(rank), smap.shards,
                              self.options.parity, layout, region, size, keep_survivors=True,
                              namespace=self.setup.namespace)
        if not common.register(client, self.options.daemon_wait, rank, region):
            return  # an engine must not die because its sidecar did: it runs unprotected, and said so
        self._client = client
        log.info("ghostserve: rank %d registered %d MiB of KV as group %s (%s)", rank, size >> 20,
                 self.setup.group, region)

    def _register_gpu(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        """GPU KV stays where vLLM put it: each layer's allocation is exported over
        CUDA IPC (ghostserve.integrations.gpukv) and registered as this rank's regions."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # noqa: PLC0415

        rank = self._rank = get_tensor_model_parallel_rank()
        smap = self.setup.shard_map
        if smap.is_replica(rank):
            raise Unsupported("GPU KV with replicated KV heads (TP size above the KV heads): not supported yet")
        num_blocks = self._vllm_config.cache_config.num_gpu_blocks
        exp = gpukv.export(tensors, num_blocks, self.block_size, gpukv.BindingsCuda())
        self._first_layer, self._layout = names[0], exp.layout
        self._block_bytes = exp.layout["block_bytes"]
        regions = [pb.Region(cuda_ipc_handle=a.handle, size=a.size, device_uuid=a.device_uuid)
                   for a in exp.allocations]
        client = WorkerClient(self.options.socket, self.setup.group, smap.shard(rank), smap.shards,
                              self.options.parity, exp.layout, "", 0, regions=regions, keep_survivors=True,
                              namespace=self.setup.namespace)
        label = f"{len(regions)} CUDA allocation(s) on device {exp.device}"
        if not common.register(client, self.options.daemon_wait, rank, ""):
            return
        self._client = client
        self._events = gpukv.StepEvents(lambda: torch.cuda.Event(interprocess=True), keep=EVENTS_KEPT)
        log.info("ghostserve: rank %d registered %d layers of GPU KV as group %s (%s)", rank, len(tensors),
                 self.setup.group, label)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward (vLLM calls this every step): requests that
        finished or were preempted, and blocks this step may hand to others, are
        released in the daemon now, so no crash can leave its index pointing at
        blocks that already hold another request's KV. One round trip, only in
        steps that free something."""
        meta = kv_connector_metadata
        if self._client is None or not isinstance(meta, GhostServeMetadata) or not (meta.finished or meta.released):
            return
        try:
            self._client.release(self._step, meta.finished, meta.released)
        except GhostServeError as exc:  # the commit carries them too; only the early drop is lost
            log.warning("ghostserve: release failed (%s: %s)", exc.code, exc)

    def start_load_kv(self, meta: GhostServeMetadata | None) -> None:
        """Fetch resumed requests' blocks into this rank's memory; blocks until
        written (these loads are synchronous: the same step's forward reads them)."""
        if meta is None or not meta.loads:
            return
        if self._replica:
            self._copy_from_primary(meta.loads)
            return
        if self._client is None:  # unprotected (no daemon): vLLM recomputes what was to be loaded
            for load in meta.loads:
                self._load_errors.update(load.blocks)
            if self.replicas > 1:
                self._loads_done()  # the replicas wait here (vLLM gathers every rank's load errors)
            return
        for load in meta.loads:
            try:
                resp = self._client.fetch(load.source_group, self._client.rank, load.source_blocks,
                                          load.tokens, load.blocks)
            except GhostServeError as exc:  # vLLM recomputes these blocks
                log.warning("ghostserve: fetch for %s failed (%s: %s)", load.request_id, exc.code, exc)
                resp = pb.FetchResponse(unrecoverable_blocks=load.source_blocks)
            bad = set(resp.unrecoverable_blocks)
            self.stats.data["fetched_bytes"] += resp.fetched_bytes
            self.stats.data["fetch_seconds"] += resp.seconds
            self.stats.data["fetches"] += 1
            self.stats.data["load_errors"] += len(bad)
            for i, (src, dst) in enumerate(zip(load.source_blocks, load.blocks, strict=True)):
                if src in bad:
                    self._load_errors.add(dst)
                else:
                    self._loaded[dst] = max(self._loaded.get(dst, 0),
                                            min(self.block_size, load.tokens - i * self.block_size))
            log.info("ghostserve: fetched %s: %d bytes in %.3f s%s%s", load.request_id, resp.fetched_bytes,
                     resp.seconds, " (rebuilt from parity)" if resp.rebuilt else "",
                     f", {len(bad)} blocks unrecoverable" if bad else "")
        if self.replicas > 1:
            self._loads_done()

    def _loads_done(self) -> None:
        """Every rank of the step's loads meets here: replicas then read their primary."""
        from vllm.distributed.parallel_state import get_tp_group  # noqa: PLC0415

        get_tp_group().barrier()

    def _copy_from_primary(self, loads: list[Load]) -> None:
        """A replica rank: the same blocks, from its primary's shared memory (same layout)."""
        self._loads_done()
        if self._primary is None:
            self._primary = shm.Segment.attach(self.setup.region(self.setup.shard_map.primary(self._rank)))
        src, dst = self._primary.array(), self._segment.array()
        lay = self._layout
        for load in loads:
            for b in load.blocks:
                for layer in range(lay["num_layers"]):
                    at = lay["offset"] + layer * lay["layer_stride"] + b * lay["block_stride"]
                    dst[at : at + lay["block_bytes"]] = src[at : at + lay["block_bytes"]]

    def save_kv_layer(self, layer_name: str, attn_metadata: Any) -> None:
        """Note the slots this step wrote (the first layer's ``slot_mapping``)."""
        if layer_name != self._first_layer or self._client is None:  # replicas send nothing
            return
        if isinstance(attn_metadata, dict):
            attn_metadata = attn_metadata.get(layer_name)
        slots = getattr(attn_metadata, "slot_mapping", None)
        if slots is None:
            return
        n = getattr(attn_metadata, "num_actual_tokens", None)
        n = slots.shape[0] if n is None else n
        arr = slots[:n].cpu().numpy()  # GPU: one small copy a step (the step syncs at sampling anyway)
        self._slots.append(arr[arr >= 0].copy())

    def wait_for_save(self, meta: GhostServeMetadata | None) -> None:
        """Queue this step's commit (no network wait; the daemon encodes later)."""
        if self._client is None or meta is None:
            self._slots.clear()
            self._loaded.clear()
            return
        fills: dict[int, int] = dict(meta.reprotect)
        for b, f in self._loaded.items():
            fills[b] = max(f, fills.get(b, 0))
        if self._slots:
            for b, f in fills_of(np.concatenate(self._slots), self.block_size).items():
                fills[b] = max(f, fills.get(b, 0))
        self._slots.clear()
        self._loaded.clear()
        records = [pb.RequestRecord(request_id=r, tokens=t, blocks=b, reset=reset)
                   for r, t, b, reset in meta.records] if self._client.rank == 0 else []
        restarted = {r for r, _, _, reset in meta.records if reset}
        event = None
        if self._events is not None:  # after this step's KV writes, on their stream; never waited on here
            self._events.protected(self._client.protected_step)
            event = self._events.record(self._step)
        self._client.commit(self._step, [(b, 0, self._block_bytes) for b in sorted(fills)],
                            requests=meta.requests, finished=[r for r in meta.finished if r not in restarted],
                            fills=fills,
                            released=meta.released, records=records, cuda_event=event or b"")
        self.stats.data["commits"] += 1
        self._step += 1

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors


    def shutdown(self) -> None:
        """vLLM's worker shutdown: a clean end, so the daemon drops the group and
        unlinks this rank's segment (a death never gets here: its group is kept)."""
        if self._client is not None:
            self._client.goodbye(release_region=True)
            self._client = None



class SchedulerSide:
    """The connector in vLLM's engine core (its scheduler thread calls every
    method): it tracks each request's tokens and block table, ships them to the
    workers in the step's metadata (rank 0 forwards them to the daemon's index),
    frees parity when a request finishes or is preempted (reference-counted:
    prefix-cached blocks may be shared), and answers ``get_num_new_matched_tokens``
    from the daemon's ``Lookup``: a resubmitted request whose KV an ended engine
    left protected is loaded, not recomputed."""

    def __init__(self, setup: Setup):
        self.setup, self.options = setup, setup.options
        self.block_size, self.namespace = setup.block_size, setup.namespace
        self._lookup_stub: Any = None
        self._reqs: dict[str, Request] = {}
        self._recorded: dict[str, int] = {}
        self._blocks: dict[str, list[int]] = {}
        self._refs: Counter[int] = Counter()
        self._finished: list[str] = []
        self._released: list[int] = []
        self._matches: dict[str, tuple[pb.LookupResponse, int, int]] = {}
        self._loads: dict[str, Load] = {}
        self._loaded_local: dict[str, int] = {}
        self.matched_tokens = 0

    def on_new_request(self, request: Request) -> None:
        self._reqs[request.request_id] = request

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens of ``request`` beyond ``num_computed_tokens`` that an ended
        engine left protected (0 if none). Loads are synchronous."""
        self._reqs[request.request_id] = request
        tokens = list(request.all_token_ids)
        if (not self.options.resume or len(tokens) < 2 or num_computed_tokens % self.block_size
                or not plain_tokens(request)):
            return 0, False
        try:
            if self._lookup_stub is None:
                self._lookup_stub = wire.stub(channel(self.options.socket), "Worker")
            resp = self._lookup_stub.Lookup(pb.LookupRequest(
                tokens=np.asarray(tokens, dtype="<u4").tobytes(), namespace=self.namespace), timeout=5)
        except GhostServeError as exc:
            log.warning("ghostserve: lookup failed (%s); computing %s from scratch", exc.code,
                        request.request_id)
            return 0, False
        usable = min(resp.tokens, len(tokens) - 1)  # vLLM computes at least the last token
        if not resp.group or usable <= num_computed_tokens or resp.block_slots != self.block_size:
            return 0, False
        self._matches[request.request_id] = (resp, num_computed_tokens, usable)
        return usable - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        match = self._matches.pop(request.request_id, None)
        if match is None or num_external_tokens <= 0:
            return
        resp, local, usable = match
        ids = list(blocks.get_block_ids()[0])
        first, last = local // self.block_size, -(-usable // self.block_size)
        self._loads[request.request_id] = Load(
            request.request_id, resp.group, list(resp.blocks[first:last]), ids[first:last],
            usable - first * self.block_size)
        self._loaded_local[request.request_id] = local
        self.matched_tokens += usable - local

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        so = scheduler_output
        for rid in so.preempted_req_ids or ():
            self._forget(rid)  # its blocks are gone; a resumed request starts a new record
        meta = GhostServeMetadata(finished=self._finished, released=self._released)
        self._finished, self._released = [], []
        for new in so.scheduled_new_reqs:
            req = self._reqs.get(new.req_id)
            tokens = list(req.all_token_ids) if req is not None else list(new.prompt_token_ids or [])
            self._start(meta, new.req_id, tokens, list(new.block_ids[0]), new.num_computed_tokens,
                        so.num_scheduled_tokens.get(new.req_id, 0), req is None or plain_tokens(req))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            req = self._reqs.get(rid)
            if req is None:
                continue
            computed = cached.num_computed_tokens[i]
            upto = computed + so.num_scheduled_tokens.get(rid, 0)
            added = list(cached.new_block_ids[i][0]) if cached.new_block_ids[i] else []
            if rid in cached.resumed_req_ids:  # back from preemption: all its blocks are new
                self._start(meta, rid, list(req.all_token_ids), added, computed, upto - computed, plain_tokens(req))
                continue
            self._track(rid, added, reset=False)
            if rid in self._recorded and computed < self._recorded[rid]:
                # vLLM went back (a load failed and is recomputed, or drafts were
                # rejected): record the request afresh from its block table
                meta.records.append((rid, list(req.all_token_ids[:upto]), list(self._blocks[rid]), True))
            elif rid in self._recorded:
                meta.records.append((rid, list(req.all_token_ids[self._recorded[rid]:upto]), added, False))
            if rid in self._recorded:
                self._recorded[rid] = upto
            meta.requests[rid] = upto
        return meta

    def _start(self, meta: GhostServeMetadata, rid: str, tokens: list[int], blocks: list[int],
               computed: int, scheduled: int, indexed: bool) -> None:
        """A request (new, or resumed after preemption) gets its first blocks this step."""
        upto = computed + scheduled
        self._track(rid, blocks, reset=True)
        if indexed:  # only plain token requests: their KV depends on the tokens alone
            meta.records.append((rid, tokens[:upto], blocks, True))
            self._recorded[rid] = upto
        meta.requests[rid] = upto
        load = self._loads.pop(rid, None)
        local = self._loaded_local.pop(rid, computed if load is None else 0)
        for b in blocks[: local // self.block_size]:  # vLLM's own prefix cache: encode again
            meta.reprotect[b] = self.block_size
        if load is not None:
            meta.loads.append(load)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Drop the request's watermark and the parity of blocks no live request uses."""
        self._forget(request.request_id)
        for table in (self._reqs, self._matches, self._loads, self._loaded_local):
            table.pop(request.request_id, None)
        return False, None

    def _track(self, rid: str, blocks: list[int], reset: bool) -> None:
        if reset:
            for b in self._blocks.pop(rid, []):
                self._refs[b] -= 1
        self._blocks.setdefault(rid, []).extend(blocks)
        self._refs.update(blocks)

    def _forget(self, rid: str) -> None:
        """Queue the request's end for the next step's metadata."""
        if rid not in self._blocks:
            return
        for b in self._blocks.pop(rid, []):
            self._refs[b] -= 1
            if self._refs[b] <= 0:
                del self._refs[b]
                self._released.append(b)
        self._recorded.pop(rid, None)
        self._finished.append(rid)




class GhostServeConnector(KVConnectorBase_V1):
    """vLLM KV connector (V1 API) backed by the ghostserve daemon. vLLM builds one
    per role, as its own connectors are built: in the engine core a scheduler-side
    object (:class:`SchedulerSide`), in each TP worker a worker-side one
    (:class:`WorkerSide`); each hook goes to its side. See the module doc."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        setup = Setup.of(vllm_config, self._kv_transfer_config, kv_cache_config)
        self.setup = setup
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                # a block ghostserve cannot deliver must be recomputed, not fail the request
                log.info("ghostserve: kv_load_failure_policy set to recompute")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            self.scheduler_side = SchedulerSide(setup)
        else:
            request_amx_permission()  # before this process's first AMX attention (resume: 1-token steps)
            self.worker_side = WorkerSide(setup, vllm_config)

    def _worker(self) -> WorkerSide:
        assert self.worker_side is not None, "a worker-side hook called on the scheduler's connector"
        return self.worker_side

    def _scheduler(self) -> SchedulerSide:
        assert self.scheduler_side is not None, "a scheduler-side hook called on a worker's connector"
        return self.scheduler_side

    def _meta(self) -> GhostServeMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, GhostServeMetadata) else None

    # ================================================================ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self._worker().handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker().start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv already waited

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker().save_kv_layer(layer_name, attn_metadata)

    def wait_for_save(self) -> None:
        self._worker().wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_kv_connector_stats(self) -> GhostServeStats | None:
        side = self.worker_side
        if side is None or side.stats.is_empty():
            return None
        out, side.stats = side.stats, GhostServeStats()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> GhostServeStats:
        return GhostServeStats(data=dict(data or {}))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

    # ============================================================= scheduler side

    def on_new_request(self, request: Request) -> None:
        self._scheduler().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler().build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().request_finished(request, block_ids)


def request_amx_permission() -> bool:
    """Ask Linux for this process's AMX tile permission (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XTILEDATA)``, via torch); True if granted. A no-op returning False on CPUs without AMX.

    Why: on a CPU with AMX, vLLM's bf16 CPU attention runs AMX tile instructions
    (``isa="amx"``) but vLLM (0.32) never asks for the permission; it is granted only
    as a side effect of an AMX GEMM: building a oneDNN linear (layers over 1 MiB of
    weights per rank, at load) or vLLM's packed GEMM taking its brgemm path (more
    than 4 tokens in the step). A small model, all packed GEMMs, whose worker's
    first steps have at most 4 tokens, runs AMX attention without it and the
    kernel kills the worker with SIGILL ("Illegal instruction" in
    ``cpu_attention_with_kv_cache``). A resumed engine is that case: a resumed
    request computes one token, so up to 4 of them never make a step big enough.
    Any shape is fine once granted; plain vLLM dies the same way on a first batch
    of at most 4 prompt tokens. Asking at start-up makes resume behave the same
    on CPUs with and without AMX.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    except (AttributeError, RuntimeError) as exc:  # private torch API: absent or refused
        log.warning("ghostserve: could not request AMX permission (%s)", exc)
        return False


def plain_tokens(request: Any) -> bool:
    """Does the request's KV depend on its token ids alone? (Not with an adapter,
    images or other features behind placeholder tokens, prompt embeddings, or a
    cache salt: those are neither indexed nor looked up.)"""
    return not (getattr(request, "lora_request", None) or getattr(request, "mm_features", None)
                or getattr(request, "prompt_embeds", None) is not None or getattr(request, "cache_salt", None))


def model_namespace(vllm_config: Any) -> str:
    """Names the weights and numerics a KV was computed with (Lookup matches within it)."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    load = vllm_config.load_config
    parts = [mc.model, getattr(mc, "revision", None), str(mc.dtype), getattr(mc, "quantization", None),
             cc.cache_dtype, cc.block_size, vllm_config.parallel_config.tensor_parallel_size,
             getattr(load, "load_format", None), mc.seed if str(getattr(load, "load_format", "")) == "dummy" else None,
             getattr(mc, "hf_overrides", None)]
    return namespace_of(parts)


def resume_request(prompt_token_ids: list[int], output_token_ids: list[int], sampling_params: Any) -> tuple[dict, Any]:
    """What a front end resubmits after the engine died: the prompt plus the tokens
    already streamed to the client, asking only for the rest. Returns (prompt, params)
    for ``LLM.generate`` / ``add_request``; the new engine's connector then loads
    the KV ghostserve kept instead of recomputing it."""
    params = sampling_params.clone()
    if params.max_tokens is not None:
        params.max_tokens = max(1, params.max_tokens - len(output_token_ids))
    params.min_tokens = max(0, (params.min_tokens or 0) - len(output_token_ids))
    return {"prompt_token_ids": list(prompt_token_ids) + list(output_token_ids)}, params


__all__ = ["ConnectorOptions", "GhostServeConnector", "GhostServeMetadata", "GhostServeStats", "Load",
           "SchedulerSide", "Setup", "WorkerSide", "model_namespace", "plain_tokens", "probe_slot_map",
           "request_amx_permission", "resume_request"]
