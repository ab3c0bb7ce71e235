"""A TP worker process with its KV on a GPU, for tests/test_gpu_worker.py (run
by bin/gpu-check on a machine with a CUDA device; never on the CPU suite).

    GS_LAYOUT=NAME python tests/gpu_worker.py SOCKET GROUP RANK N M MODE OUT [SOURCE_GROUP]

Its KV: LAYERS bf16 tensors on device 0, allocated one per layer with torch (as
vLLM does), in the vLLM backend layout NAME (LAYOUTS: FlashAttention
``(2, BLOCKS, SLOTS, HEADS, DIM)``, FlashInfer ``(BLOCKS, 2, ...)``, each also in
the HND stride order, viewed the way vLLM views them), exported with
ghostserve.integrations.gpukv (the connector's own code) and registered. MODE:

* ``commit``: write seeded random KV into BLOCKS_USED, one commit per block with
  an interprocess event recorded after the writes; once protected, write the
  digests of every used block to OUT and stay until killed (or stdin closes);
* ``restore``: register as the replacement of RANK, Restore, write the digests,
  stay as ``commit`` does;
* ``fetch SOURCE_GROUP``: register in GROUP, Fetch RANK's blocks of the ended
  SOURCE_GROUP into blocks BLOCKS_USED shifted by one, write their digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

LAYERS, BLOCKS, SLOTS, HEADS, DIM = 4, 16, 16, 4, 64
BLOCKS_USED = [0, 3, 7, 12]
# logical shape, memory order (the backend's stride order), the block dim
LAYOUTS = {
    "flash-attn": ((2, BLOCKS, SLOTS, HEADS, DIM), (0, 1, 2, 3, 4), 1),
    "flash-attn-hnd": ((2, BLOCKS, SLOTS, HEADS, DIM), (0, 1, 3, 2, 4), 1),
    "flashinfer": ((BLOCKS, 2, SLOTS, HEADS, DIM), (0, 1, 2, 3, 4), 0),
    "flashinfer-hnd": ((BLOCKS, 2, SLOTS, HEADS, DIM), (0, 1, 3, 2, 4), 0),
}


def allocate(name: str):
    """One layer's KV as vLLM makes it: raw bytes, viewed in memory order, permuted back."""
    import torch  # noqa: PLC0415

    shape, order, _ = LAYOUTS[name]
    raw = torch.zeros([shape[i] for i in order], dtype=torch.bfloat16, device="cuda")
    return raw.permute(*[order.index(i) for i in range(len(order))])


def block(t, name: str, b: int):
    return t.select(LAYOUTS[name][2], b)


def digests(kv, name: str, blocks) -> list[str]:
    import torch  # noqa: PLC0415

    torch.cuda.synchronize()
    return [hashlib.sha256(b"".join(block(t, name, b).contiguous().view(torch.uint8).cpu().numpy().tobytes()
                                    for t in kv)).hexdigest() for b in blocks]


def main(argv: list[str]) -> int:
    import torch  # noqa: PLC0415

    from ghostserve.client import WorkerClient  # noqa: PLC0415
    from ghostserve.integrations import gpukv  # noqa: PLC0415
    from ghostserve.v1 import ghostserve_pb2 as pb  # noqa: PLC0415

    sock, group, rank, n, m, mode, out = argv[:7]
    rank, n, m = int(rank), int(n), int(m)
    layout = os.environ.get("GS_LAYOUT", "flash-attn")
    torch.cuda.set_device(0)
    kv = [allocate(layout) for _ in range(LAYERS)]
    exp = gpukv.export(kv, BLOCKS, SLOTS, gpukv.BindingsCuda())
    regions = [pb.Region(cuda_ipc_handle=a.handle, size=a.size, device_uuid=a.device_uuid)
               for a in exp.allocations]
    client = WorkerClient(sock, group, rank, n, m, exp.layout, "", 0, regions=regions, keep_survivors=True)
    client.register()
    bb = exp.layout["block_bytes"]
    result: dict = {"pid": os.getpid(), "allocations": len(exp.allocations)}
    if mode == "commit":
        events = gpukv.StepEvents(lambda: torch.cuda.Event(interprocess=True), keep=64)
        gen = torch.Generator(device="cuda").manual_seed(1000 * rank + 7)
        for step, b in enumerate(BLOCKS_USED):
            for t in kv:
                part = block(t, layout, b)
                part.copy_(torch.randn(part.shape, generator=gen, device="cuda").to(torch.bfloat16))
            handle = events.record(step)
            records = [pb.RequestRecord(request_id="q", tokens=list(range(SLOTS * (step + 1))),
                                        blocks=BLOCKS_USED[: step + 1], reset=step == 0)] if rank == 0 else []
            client.commit(step, [(b, 0, bb)], {"q": SLOTS * (step + 1)}, fills={b: SLOTS}, records=records,
                          cuda_event=handle)
            events.protected(client.protected_step)
        if not client.wait_protected(len(BLOCKS_USED) - 1, timeout=60):
            result["error"] = "not protected"
        result["digests"] = digests(kv, layout, BLOCKS_USED)
    elif mode == "restore":
        resp = client.restore()
        result.update(restored_bytes=resp.restored_bytes, unrecoverable=list(resp.unrecoverable_blocks),
                      digests=digests(kv, layout, BLOCKS_USED))
    elif mode == "fetch":
        source = argv[7]
        dst = [b + 1 for b in BLOCKS_USED]
        resp = client.fetch(source, rank, BLOCKS_USED, SLOTS * len(BLOCKS_USED), dst)
        result.update(fetched_bytes=resp.fetched_bytes, rebuilt=resp.rebuilt,
                      unrecoverable=list(resp.unrecoverable_blocks), digests=digests(kv, layout, dst))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    if mode in ("commit", "restore"):
        sys.stdin.read()  # alive (a source, a survivor) until killed or stdin closes
    client.goodbye()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
