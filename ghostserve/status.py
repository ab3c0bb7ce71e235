"""``ghostserve status``: a running daemon's groups and ranks, as text or JSON.

The text is one block per group (a few lines of facts, then a row per rank),
so it stays readable in an 80-column terminal: long values wrap, none is cut.
``--json`` prints the StatusResponse with every number as a JSON number (the
proto3 JSON mapping would give 64-bit integers as strings).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from ghostserve.client import OperatorClient
from ghostserve.config import default_socket
from ghostserve.v1 import ghostserve_pb2 as pb

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
_STATE_STYLE = {"healthy": "green", "alive": "green", "degraded": "red", "stalled": "red", "lost": "red",
                "replacing": "yellow", "detached": "yellow", "ended": "blue", "left": "blue"}


def daemon_socket(given: str | None = None) -> str:
    """The socket a client command talks to: ``--socket``, else GHOSTSERVE_SOCKET,
    else the default. Only that variable is read: the daemon's other settings
    (TLS files, ...) are none of a client's business."""
    return given or os.environ.get("GHOSTSERVE_SOCKET") or default_socket()


def to_json(msg: Message) -> dict[str, Any]:
    """``msg`` as a JSON-ready dict: field names as in the proto, fields without
    presence included, 64-bit integers as ints."""
    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(d, msg.DESCRIPTOR)


def _numbers(d: dict[str, Any], desc: Descriptor) -> dict[str, Any]:
    for f in desc.fields:
        if f.name not in d:
            continue
        value = d[f.name]
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                vf = f.message_type.fields_by_name["value"]
                d[f.name] = {k: _scalar(vf, v) if vf.message_type is None else _numbers(v, vf.message_type)
                             for k, v in value.items()}
            elif isinstance(value, list):
                d[f.name] = [_numbers(v, f.message_type) for v in value]
            else:
                d[f.name] = _numbers(value, f.message_type)
        elif isinstance(value, list):
            d[f.name] = [_scalar(f, v) for v in value]
        else:
            d[f.name] = _scalar(f, value)
    return d


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    return int(value) if f.type in _INT64 else value


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def group_facts(g: pb.GroupStatus) -> list[tuple[str, str]]:
    """(label, value) lines of one group's block, in display order."""
    lag = f"lag {g.lag_steps}"
    if g.lag_seconds >= 1:  # a step waiting this long: protection has stalled (a rank not back, not replaced)
        lag += f" steps, the oldest waiting [red]{_duration(g.lag_seconds)}[/]"
    facts = [("protected step", f"{g.protected_step} (newest committed {g.newest_step}, {lag})"),
             ("protected KV", f"{_bytes(g.protected_bytes)} of {_bytes(g.kv_bytes)} registered"),
             ("parity", f"{_bytes(g.parity_bytes)} (arena {_bytes(g.parity_arena_bytes)})")]
    if g.state == "ended":
        ended = [f"{_duration(g.ended_seconds)} ago"] if g.ended_seconds > 0 else []
        if g.held_bytes:
            ended.append(f"holds {_bytes(g.held_bytes)}")
        if g.expires_seconds > 0:
            ended.append(f"dropped in {_duration(g.expires_seconds)} (--ended-ttl)")
        facts.append(("ended", ", ".join(ended) or "yes"))
    elif g.held_bytes:
        facts.append(("shared memory", f"holds {_bytes(g.held_bytes)}"))
    facts.append(("requests", f"{len(g.watermarks)} with protected tokens"))
    if g.mirrored_step >= 0 or g.remote_bytes:  # --store: what survives this node
        behind = g.protected_step - g.mirrored_step
        text = f"step {g.mirrored_step}, {_bytes(g.remote_bytes)} on other nodes"
        facts.append(("off-node", text + (f", [yellow]{behind} steps behind[/]" if behind > 0 else "")))
    if g.HasField("last_restore"):
        lr = g.last_restore
        text = f"rank {lr.rank}, {lr.seconds:.3f} s, {_bytes(lr.restored_bytes)} rebuilt"
        if lr.unrecoverable_bytes:
            text += f", [red]{_bytes(lr.unrecoverable_bytes)} unrecoverable[/]"
        facts.append(("last restore", text))
    return facts


def render(resp: pb.StatusResponse) -> Any:
    """Every group of ``resp`` as a rich renderable: a block per group."""
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    where = f" on node {resp.node}" if resp.node else ""
    where += f", mirroring into {resp.store.split('?')[0]}" if resp.store else ""
    parts: list[Any] = [Text(f"ghostserve {resp.version}{where}: {len(resp.groups)} group(s)", style="bold")]
    for g in resp.groups:
        parts.append(Text.from_markup(f"\n[bold]{g.group}[/]  {g.world_size}+{g.parity}  {_styled(g.state)}",
                                      overflow="fold"))
        facts = Table.grid(padding=(0, 2))
        facts.add_column(no_wrap=True, style="dim")
        facts.add_column(overflow="fold")
        for label, value in group_facts(g):
            facts.add_row("  " + label, value)
        parts.append(facts)
        if g.ranks:
            ranks = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
            ranks.add_column("  rank", justify="right", no_wrap=True)
            for col in ("state", "pid", "committed", "region"):
                ranks.add_column(col, overflow="fold", justify="right" if col in ("pid", "committed") else "left")
            for r in g.ranks:
                state = _styled(r.state) + (" (process ended)" if r.process_ended and r.state == "detached" else "")
                ranks.add_row(str(r.rank), state, str(r.pid), str(r.committed_step), r.region)
            parts.append(ranks)
    return Group(*parts)


def run_status(args: Any) -> int:
    """``ghostserve status``: print once, or every ``--watch`` seconds."""
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    op = OperatorClient(daemon_socket(args.socket), timeout=3)
    if args.json:
        resp = op.status(args.group)  # DaemonUnavailable is reported by the CLI
        print(json.dumps(to_json(resp)))
        return 0
    console = Console()
    if args.watch is None:
        console.print(render(op.status(args.group)))
        return 0
    if not console.is_terminal:  # piped or logged: one block per refresh
        while True:
            console.print(render(op.status(args.group)))
            console.file.flush()
            time.sleep(args.watch)
    with Live(render(op.status(args.group)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(args.watch)
            live.update(render(op.status(args.group)), refresh=True)
