"""Off-node protection: a group's protected KV mirrored into a Mooncake Store.

Node-local parity covers a lost GPU or worker, not a lost node: its host memory
goes with the node. With ``--store``, each daemon joins a Mooncake Store cluster,
gives it a segment of its own host memory, and copies the protected full blocks
of long requests into **another** node's segment, keyed by token prefix, so a
daemon on any node running the same model and KV layout finds them:

* :mod:`.objects`: the key space (model, layout, TP size) and block keys (a hash
  chain over the prefix's tokens), and the object format (header with CRC32C);
* :mod:`.store`: :class:`~.store.RemoteStore`, the small interface the mirror
  needs, and :class:`~.store.MooncakeStore` over Mooncake's Python client (imported
  only when a store is configured);
* :mod:`.mirror`: :class:`~.mirror.Mirror`, the daemon's mirroring thread, the
  store side of ``Lookup`` and ``Fetch``, and what status shows.

See ``docs/scale-out.md`` for the fault model and the design.
"""
