"""Who watches which groups (``Operator.Watch``), and what each has not read yet.

Groups publish :class:`~ghostserve.daemon.calls.Notice` s as things happen
(under their lock: publishing never blocks); each watcher has a
:class:`Subscription`, read by its RPC's handler thread. A watcher that reads
slowly costs bounded memory: consecutive STEP_PROTECTED notices of one group
are merged into the newest.
"""

from __future__ import annotations

import collections
import threading

from ghostserve.daemon.calls import Notice, NoticeKind


class Subscription:
    """One watcher's unread notices, oldest first. Thread-safe."""

    def __init__(self, group: str):
        self.group = group  # "" for every group
        self._items: collections.deque[Notice] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, notice: Notice) -> None:
        with self._cond:
            last = self._items[-1] if self._items else None
            if (notice.kind == NoticeKind.STEP_PROTECTED and last is not None
                    and last.kind == NoticeKind.STEP_PROTECTED and last.group == notice.group):
                self._items[-1] = notice
            else:
                self._items.append(notice)
            self._cond.notify()

    def get(self, timeout: float) -> Notice | None:
        """The next notice, or None after ``timeout`` seconds or once closed."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Watchers:
    """Every open watch. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()

    def subscribe(self, group: str) -> Subscription:
        sub = Subscription(group)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        with self._lock:
            self._subs.discard(sub)

    def publish(self, notice: Notice) -> None:
        """Give ``notice`` to every watcher of its group (or of all)."""
        with self._lock:
            subs = [s for s in self._subs if s.group in ("", notice.group)]
        for s in subs:
            s.put(notice)

    def close(self) -> None:
        """The daemon stops: every watch ends."""
        with self._lock:
            subs, self._subs = list(self._subs), set()
        for s in subs:
            s.close()


__all__ = ["Subscription", "Watchers"]
