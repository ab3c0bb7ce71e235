"""``ghostserve status``: a running daemon's groups and ranks as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from ghostserve.client import OperatorClient
from ghostserve.config import Config
from ghostserve.v1 import ghostserve_pb2 as pb


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(resp: pb.StatusResponse) -> Any:
    from rich.table import Table  # noqa: PLC0415

    t = Table(title=f"ghostserve {resp.version}: {len(resp.groups)} group(s)")
    for col in ("group", "code", "state", "ranks", "protected step", "lag", "protected", "parity",
                "requests", "last restore"):
        t.add_column(col)
    for g in resp.groups:
        ranks = " ".join(f"{r.rank}:{r.state}" for r in g.ranks)
        last = (f"rank {g.last_restore.rank}, {g.last_restore.seconds:.3f} s, "
                f"{_bytes(g.last_restore.restored_bytes)}" if g.HasField("last_restore") else "-")
        state = f"[red]{g.state}[/]" if g.state != "healthy" else f"[green]{g.state}[/]"
        t.add_row(g.group, f"{g.world_size}+{g.parity}", state, ranks, str(g.protected_step),
                  str(g.lag_steps), _bytes(g.protected_bytes), _bytes(g.parity_bytes),
                  str(len(g.watermarks)), last)
    return t


def run_status(args: Any) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    socket = args.socket or Config.from_env().socket
    op = OperatorClient(socket, timeout=3)
    if args.json:
        resp = op.status(args.group)  # DaemonUnavailable is reported by the CLI
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)))
        return 0
    console = Console()
    if args.watch is None:
        console.print(render(op.status(args.group)))
        return 0
    if not console.is_terminal:  # piped or logged: one table per refresh
        while True:
            console.print(render(op.status(args.group)))
            console.file.flush()
            time.sleep(args.watch)
    with Live(render(op.status(args.group)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(args.watch)
            live.update(render(op.status(args.group)), refresh=True)
