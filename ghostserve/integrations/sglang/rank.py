"""One SGLang TP rank's side of ghostserve: its KV segment, registration, and the
commit of every forward's writes.

An SGLang TP rank is one scheduler process (``sglang::scheduler_TP<r>``) that
runs its own scheduler, radix cache and model shard; every rank makes the same
scheduling decisions, so a token lands in the same slot on every rank and a
stripe (one page of one K or V plane on all ranks) is well defined.

Life of a :class:`RankState`, one per scheduler process (made by the KV pool
hook, because the segment must exist before SGLang's buffers do):

1. :meth:`make_buffers`: the pool's K and V buffers become views of a named
   shared-memory segment (:mod:`.kvpool`), or, for a pool on a GPU, of one
   allocation there, exported over CUDA IPC (:mod:`ghostserve.integrations.gpukv`;
   each commit then carries an interprocess event recorded after the forward).
2. :meth:`attach` (after ``Scheduler.__init__``): refuse set-ups the plug-in
   cannot protect, then register with the daemon. A daemon that does not answer
   is waited for (``daemon_wait``, one restarting); if it stays away the rank
   runs unprotected and says so: SGLang never fails because its sidecar did.
   KV heads replicated over ranks (fewer KV heads than TP ranks) need no parity:
   only the first rank of each replica set registers.
3. Each forward: :meth:`capture` (after ``run_batch``: the slots it wrote and
   the requests' KV lengths) and :meth:`commit` (after ``process_batch_result``:
   finished requests, pages freed, Lookup records) queue one commit; the daemon
   encodes it in its own threads.
4. :meth:`goodbye` on a graceful shutdown: the daemon drops the group and the
   segment at once. A death never gets there: the group is kept (its survivors
   detached) for a resume.

Threads: every method runs on the scheduler's thread; the ``WorkerClient``'s
own thread owns the gRPC stream. No locks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.client import WorkerClient
from ghostserve.errors import DaemonUnavailable, Unsupported
from ghostserve.integrations import common, gpukv, kvsegment
from ghostserve.integrations.common import ShardMap, fills_of, namespace_of
from ghostserve.integrations.sglang.kvpool import PoolGeometry, kv_buffers, pages_of
from ghostserve.integrations.sglang.options import PluginOptions
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.sglang")


def launch_group() -> str:
    """A group name every rank of this SGLang launch derives alike and no other
    launch on the node shares: the launcher's pid and start time (the schedulers
    are its children)."""
    import psutil  # noqa: PLC0415

    parent = psutil.Process(os.getppid())
    stamp = hashlib.sha256(f"{parent.pid}:{parent.create_time()!r}".encode()).hexdigest()[:10]
    return f"sglang-{parent.pid}-{stamp}"


@dataclasses.dataclass
class Capture:
    """What one forward wrote, taken right after ``run_batch``."""

    slots: np.ndarray                             # token slots written (int64)
    reqs: list[tuple[Any, int, int]]              # (Req, KV tokens after the forward, req_to_token row)
    released: set[int]                            # pages freed before the forward (it may reuse them)


@dataclasses.dataclass
class Recorded:
    """What this rank last told the daemon's index about a request."""

    tokens: int
    pages: int
    row: int


# what makes a request's KV depend on more than its token ids (SGLang's Req and its
# tokenized input name some of them differently; absent ones read as None)
NOT_FROM_TOKENS = ("lora_id", "multimodal_inputs", "mm_inputs", "input_embeds", "positional_embed_overrides",
                   "cache_salt", "extra_key", "session", "session_id", "session_params", "token_type_ids")


def plain(req: Any) -> bool:
    """Does the request's KV follow from its token ids alone? (Not with an
    adapter, images, input embeddings, embedding overrides, a cache salt or
    extra key, or a session: those are protected but never indexed or resumed.)
    Takes SGLang's ``Req`` or its ``TokenizedGenerateReqInput``."""
    return not any(getattr(req, a, None) for a in NOT_FROM_TOKENS)


# GPU KV: steps whose interprocess events are kept for a daemon that has not
# encoded them yet (gpukv.StepEvents: older ones go once the GPU has passed them)
EVENTS_KEPT = 1024

class RankState:
    """One TP rank (scheduler process); see the module doc."""

    def __init__(self, options: PluginOptions, rank: int, tp: int, group: str):
        self.options, self.rank, self.tp, self.group = options, rank, tp, group
        self.region = f"{options.shm_prefix}{group}-r{rank}"
        self.geometry: PoolGeometry | None = None
        self.segment: shm.Segment | None = None
        self.gpu: Any = None                      # a GPU pool: the allocation holding every K and V buffer
        self.cuda_region: pb.Region | None = None
        self.events: gpukv.StepEvents | None = None
        self.client: WorkerClient | None = None   # None on a replica rank, or unprotected
        self.replica = False                      # holds a copy of its primary's KV heads
        self.unprotected = False                  # no daemon answered: nothing is protected
        self.shard_map = ShardMap(tp, 1)  # set from the model's KV heads at attach
        self.namespace = ""
        self.can_resume = False
        self.scheduler: Any = None
        self.step = 0
        self._capture: Capture | None = None
        self._freed: set[int] = set()            # pages freed since the last capture or commit
        self._loaded: dict[int, int] = {}        # pages written by fetches, not yet committed
        self._recorded: dict[str, Recorded] = {}

    # ------------------------------------------------------------------ set-up

    def make_buffers(self, pool: Any) -> None:
        """Build ``pool.k_buffer`` and ``pool.v_buffer`` (``MHATokenToKVPool``) in
        this rank's segment. Raises :class:`Unsupported` for pools it cannot map."""
        if str(pool.device) != "cpu" and not str(pool.device).startswith("cuda"):
            raise Unsupported(f"KV on {pool.device}: the SGLang plug-in protects CPU and CUDA KV")
        if pool.kv_cache_layout != "nhd" or getattr(pool, "use_hnd", False):
            raise Unsupported(f"KV layout {pool.kv_cache_layout!r}: the plug-in maps SGLang's NHD layout")
        if pool.head_dim != pool.v_head_dim:
            raise Unsupported(f"K head dim {pool.head_dim} != V head dim {pool.v_head_dim}")
        if self.geometry is not None:
            raise Unsupported("a second KV pool in one scheduler (speculative decoding's draft model?)")
        dtype = pool.store_dtype
        geom = PoolGeometry(layers=pool.layer_num, rows=pool.size + pool.page_size, page=pool.page_size,
                            heads=pool.head_num, head_dim=pool.head_dim, itemsize=dtype.itemsize)
        try:
            kvsegment.check_daemon(self.options.socket, wait=self.options.daemon_wait)
        except DaemonUnavailable as exc:
            self._unprotect(exc)
        if str(pool.device).startswith("cuda"):
            self._make_gpu_buffers(pool, geom, dtype)
            return
        try:
            self.segment = kvsegment.allocate(self.options.socket, self.region, geom.size,
                                              ask_daemon=not self.unprotected)
        except FileExistsError:
            raise Unsupported(f"shared memory {self.region!r} exists: a server with the same group left it "
                              "(ghostserve drop its group with --unlink-regions, or set a new "
                              "GHOSTSERVE_SGLANG_GROUP)") from None
        self.geometry = geom
        if self.unprotected:
            shm.unlink(self.region)  # nobody will map it by name: it goes with the process
        pool.k_buffer, pool.v_buffer = kv_buffers(self.segment.buf, geom, dtype)
        log.info("ghostserve: rank %d KV (%d MiB, %d layers, %d slots) in %s", self.rank, geom.size >> 20,
                 geom.layers, geom.rows, self.region)

    def _make_gpu_buffers(self, pool: Any, geom: PoolGeometry, dtype: Any) -> None:
        """Every K and V buffer in one allocation on the pool's GPU, exported over
        CUDA IPC as this rank's region (the daemon maps it; nothing is named)."""
        import torch  # noqa: PLC0415

        if gpukv.expandable_segments():
            raise Unsupported(gpukv.EXPANDABLE)
        raw = torch.zeros(geom.size, dtype=torch.uint8, device=pool.device)
        cuda = gpukv.BindingsCuda()
        base, size = cuda.allocation(raw.data_ptr())
        self.cuda_region = pb.Region(cuda_ipc_handle=cuda.ipc_handle(base), size=geom.size,
                                     offset=raw.data_ptr() - base, device_uuid=cuda.device_uuid(raw.device.index))
        self.gpu, self.geometry = raw, geom
        self.events = gpukv.StepEvents(lambda: torch.cuda.Event(interprocess=True), keep=EVENTS_KEPT)
        pool.k_buffer, pool.v_buffer = kv_buffers(raw, geom, dtype)
        log.info("ghostserve: rank %d KV (%d MiB, %d layers, %d slots) on %s, in an allocation of %d MiB",
                 self.rank, geom.size >> 20, geom.layers, geom.rows, raw.device, size >> 20)

    def attach(self, scheduler: Any) -> None:
        """After the scheduler is built: check what it runs, then register.
        Raises :class:`Unsupported`, :class:`ConfigError` or :class:`DaemonUnavailable`."""
        try:
            self._attach(scheduler)
        except BaseException:
            if self.client is None and not self.unprotected and self.gpu is None:
                shm.unlink(self.region)  # the start fails: the segment would outlive it
            raise

    def _attach(self, scheduler: Any) -> None:
        from sglang.srt.runtime_context import get_parallel  # noqa: PLC0415

        if self.geometry is None:
            raise Unsupported("the scheduler's KV pool is not an MHA token pool the plug-in built "
                              "(MLA, hybrid, sliding-window and quantised pools are not supported)")
        par = get_parallel()
        problems = []
        if getattr(scheduler, "enable_overlap", False):
            problems.append("the overlap scheduler (start SGLang with --disable-overlap-schedule)")
        if not scheduler.spec_algorithm.is_none():
            problems.append("speculative decoding")
        if getattr(par, "pp_size", 1) > 1:
            problems.append("pipeline parallelism")
        if getattr(scheduler, "attn_dp_enabled", False):
            problems.append("data-parallel attention")
        if getattr(scheduler, "enable_hierarchical_cache", False):
            problems.append("the hierarchical cache")
        if problems:
            raise Unsupported("ghostserve's SGLang plug-in does not support " + ", ".join(problems))
        self.shard_map = ShardMap.of(self.tp, scheduler.model_config.get_total_num_kv_heads())
        self.shard_map.check_parity(self.options.parity, "GHOSTSERVE_SGLANG_PARITY")
        self.scheduler = scheduler
        self.namespace = self.options.namespace or model_namespace(scheduler)
        tree = getattr(scheduler, "tree_cache", None)
        self.can_resume = self.options.resume and tree is not None and tree.supports_prefix_sharing()
        if self.options.resume and not self.can_resume:
            log.warning("ghostserve: SGLang runs without a radix cache (--disable-radix-cache): KV is "
                        "protected, but resubmitted requests are prefilled, not loaded")
        if self.unprotected:
            self.can_resume = False
            return
        if self.shard_map.is_replica(self.rank):
            if self.gpu is not None:
                raise Unsupported("GPU KV with replicated KV heads (TP size above the KV heads): not supported yet")
            self.replica = True
            shm.unlink(self.region)  # nobody maps a replica's KV by name: it goes with the process
            log.info("ghostserve: rank %d replicates rank %d's KV heads: no parity needed", self.rank,
                     self.primary)
            return
        geom, smap = self.geometry, self.shard_map
        where: dict[str, Any] = (dict(region="", region_size=0, regions=[self.cuda_region]) if self.gpu is not None
                                 else dict(region=self.region, region_size=geom.size))
        client = WorkerClient(self.options.socket, self.group, smap.shard(self.rank), smap.shards,
                              self.options.parity, geom.layout(), keep_survivors=True, namespace=self.namespace,
                              **where)
        if not common.register(client, self.options.daemon_wait, self.rank, where["region"]):
            self.unprotected, self.can_resume = True, False
            return
        self.client = client
        log.info("ghostserve: rank %d registered as shard %d of group %s (%d+%d)", self.rank,
                 smap.shard(self.rank), self.group, smap.shards, self.options.parity)

    def _unprotect(self, why: Exception) -> None:
        """No daemon answered at start-up: this rank runs without protection, and says so."""
        self.unprotected, self.can_resume = True, False
        log.error("ghostserve: rank %d runs UNPROTECTED: %s. Its KV is not checkpointed; a failure of this "
                  "server recomputes its requests", self.rank, why)

    @property
    def primary(self) -> int:
        """The rank whose KV this rank's equals (itself unless a replica)."""
        return self.shard_map.primary(self.rank)

    # ------------------------------------------------------------------ steps

    def note_freed(self, pages: np.ndarray) -> None:
        """SGLang's allocator gave these pages back (they may be reused at once)."""
        self._freed.update(int(p) for p in pages if p > 0)  # page 0 is padding, never allocated

    def note_loaded(self, pages: np.ndarray) -> None:
        """A fetch wrote these (whole) pages: encode them with the next commit."""
        for p in pages.tolist():
            self._loaded[p] = self.geometry.page

    def capture(self, batch: Any) -> None:
        """After ``run_batch`` (the forward is done: the overlap scheduler is refused)."""
        loc = getattr(batch, "out_cache_loc", None)
        if loc is None or not batch.reqs:
            return
        lens = batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens.cpu()
        rows = batch.req_pool_indices.cpu().tolist()
        self._capture = Capture(loc.cpu().numpy().astype(np.int64), list(zip(batch.reqs, lens.tolist(), rows,
                                                                          strict=True)), self._freed)
        self._freed = set()

    def commit(self) -> None:
        """After ``process_batch_result``: queue the captured forward's commit
        (microseconds; the daemon encodes it later)."""
        cap, self._capture = self._capture, None
        if cap is None:
            return
        geom = self.geometry
        freed, self._freed = self._freed, set()
        loaded, self._loaded = self._loaded, {}
        if self.client is None:  # a replica (its primary's commit covers these bytes), or unprotected
            return
        slots = cap.slots[cap.slots >= geom.page]  # page 0 takes padded tokens' writes
        fills = fills_of(slots, geom.page)
        for p, f in loaded.items():
            fills[p] = max(f, fills.get(p, 0))
        requests, finished, records = {}, [], []
        for req, kv_len, row in cap.reqs:
            if req.finished():
                finished.append(req.rid)
                self._recorded.pop(req.rid, None)
                continue
            requests[req.rid] = int(kv_len)
            if self.rank == 0 and plain(req):
                records.extend(self._record(req, int(kv_len), row))
        event = b""
        if self.events is not None:  # after the forward's KV writes, on their stream; never waited on here
            self.events.protected(self.client.protected_step)
            event = self.events.record(self.step)
        self.client.commit(self.step, [(p, 0, geom.page_bytes) for p in sorted(fills)], requests=requests,
                           freed=sorted(freed), finished=finished, fills=fills, released=sorted(cap.released),
                           records=records, cuda_event=event)
        self.step += 1

    def _record(self, req: Any, kv_len: int, row: int) -> list[pb.RequestRecord]:
        """What the index learns of ``req`` this step: its tokens and pages so far
        (afresh when new, or when SGLang moved it: a retracted request comes back
        in a new row), else only what was added."""
        page = self.geometry.page
        old = self._recorded.get(req.rid)
        reset = old is None or old.row != row or kv_len < old.tokens
        start = 0 if reset else old.tokens
        first_page = 0 if reset else old.pages
        pages = -(-kv_len // page)
        if not reset and kv_len == old.tokens:
            return []
        tokens = token_slice(req, start, kv_len)
        table = self.scheduler.req_to_token_pool.req_to_token
        new_pages = pages_of(table[row, first_page * page : pages * page].cpu().numpy(), page).tolist()
        self._recorded[req.rid] = Recorded(kv_len, pages, row)
        return [pb.RequestRecord(request_id=req.rid, tokens=tokens, blocks=new_pages, reset=reset)]

    # ------------------------------------------------------------------ end

    def goodbye(self) -> None:
        """A graceful shutdown: the daemon drops the group and this rank's segment."""
        if self.client is not None:
            self.client.goodbye(release_region=True)
            self.client = None


def token_slice(req: Any, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without copying the whole sequence
    (a decode step adds one token to a context of thousands)."""
    prompt, out = req.origin_input_ids, req.output_ids
    n = len(prompt)
    head = list(prompt[start:end]) if start < n else []
    return head + list(out[max(0, start - n) : max(0, end - n)])


def model_namespace(scheduler: Any) -> str:
    """Names the weights and numerics a KV was computed with (Lookup matches within it)."""
    sa, mc = scheduler.server_args, scheduler.model_config
    parts = ["sglang", sa.model_path, getattr(sa, "revision", None), str(getattr(mc, "dtype", None)),
             getattr(sa, "quantization", None), getattr(sa, "kv_cache_dtype", None), scheduler.page_size,
             scheduler.tp_size, getattr(sa, "load_format", None), getattr(sa, "json_model_override_args", None),
             getattr(sa, "random_seed", None) if str(getattr(sa, "load_format", "")) == "dummy" else None]
    return namespace_of(parts)


__all__ = ["Capture", "RankState", "launch_group", "model_namespace", "plain", "token_slice"]
