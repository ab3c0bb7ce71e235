"""``ghostserve demo``: what ghostserve does, end to end, on this machine.

Until the reference TP engine lands, the demo runs two real things and says so:
the Reed-Solomon codec losing and rebuilding shards, and a fault-injection run
(a real daemon and worker processes; two workers SIGKILLed and the daemon
restarted mid-run) whose every restored byte is checked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ghostserve.chaos.harness import Chaos
from ghostserve.chaos.workload import Shape
from ghostserve.codec import RSCode


def codec_demo(seed: int) -> dict[str, Any]:
    k, m, length = 4, 2, 1 << 20
    rng = np.random.default_rng(seed)
    code = RSCode(k, m)
    data = rng.integers(0, 256, (k, length), dtype=np.uint8)
    t = time.perf_counter()
    parity = code.encode(data)
    encode_s = time.perf_counter() - t
    shards = np.concatenate([data, parity])
    shards[[1, 4]] = 0  # lose a data shard and a parity shard
    t = time.perf_counter()
    code.reconstruct(shards, [1, 4])
    return {"k": k, "m": m, "shard_bytes": length, "backend": code.backend.name,
            "erased": [1, 4], "rebuilt_identical": bool(np.array_equal(shards[:k], data)),
            "encode_seconds": encode_s, "reconstruct_seconds": time.perf_counter() - t}


def run_demo(args: Any) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    err = Console(stderr=True)
    codec = codec_demo(args.seed)
    shape = Shape(ranks=4, parity=1, steps=80, seed=args.seed)
    plan = dict(kills=[(1, 25), (3, 55)], daemon_kills=[40])
    if args.json:
        chaos = Chaos(shape, **plan).run()
    else:
        err.print("[bold]ghostserve demo[/]: Reed-Solomon codec, then a daemon protecting the KV "
                  "of 4 worker processes (4+1) while 2 are SIGKILLed and the daemon restarts")
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("decode steps", total=shape.steps)
            chaos = Chaos(shape, **plan, progress=lambda d, t: progress.update(task, completed=d)).run()
    ok = codec["rebuilt_identical"] and chaos.ok
    result = {"ok": ok, "codec": codec, "chaos": asdict(chaos),
              "note": "the reference TP engine demo is not built yet; this runs the codec and the "
                      "fault-injection harness"}
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    t = Table(title="what happened")
    t.add_column("step")
    t.add_column("result", justify="right")
    t.add_row(f"codec {codec['k']}+{codec['m']} ({codec['backend']}): erase shards 1 and 4 of "
              f"{codec['shard_bytes'] >> 20} MiB, rebuild", "identical" if codec["rebuilt_identical"] else "DIFFERENT")
    t.add_row("steps run by 4 worker processes", str(chaos.steps))
    t.add_row("faults", ", ".join(f"{f['kind']} {f.get('rank', '')}@{f['step']}" for f in chaos.faults))
    t.add_row("bytes restored from parity / checked byte for byte",
              f"{chaos.restored_bytes:,} / {chaos.verified_bytes:,}")
    t.add_row("mismatched bytes (restore, final check)", f"{chaos.mismatched_bytes}, {chaos.final_mismatched_bytes}")
    t.add_row("failure detected after (s)", ", ".join(f"{s:.3f}" for s in chaos.detect_seconds))
    t.add_row("restore took (s)", ", ".join(f"{s:.3f}" for s in chaos.recovery_seconds))
    t.add_row("parity host memory vs protected KV", f"{chaos.parity_bytes:,} vs {chaos.kv_bytes:,} B "
              f"({chaos.parity_bytes / max(chaos.kv_bytes, 1):.0%}; replication would be 100%)")
    t.add_row("verdict", "[green]OK[/]" if ok else "[red]FAILED[/]")
    Console().print(t)
    return 0 if ok else 1
