"""Workers' processes, watched without polling.

Linux (5.3 and later) gives a process descriptor (``pidfd_open``) that becomes
readable when the process ends, zombies included. :class:`PidWatch` holds one per
watched pid and the ``gs-pids`` thread sleeps in ``poll(2)`` on all of them,
plus a wake-up pipe, until a worker dies, the set of pids changes, or a deadline
passes: a death is seen at once, and an idle daemon does not wake (polling every
50 ms woke the thread about 50 times a second on every node).

Where pidfds are missing (another OS, an old kernel, a sandbox that refuses the
call) ``events`` is False and the caller checks the pids itself on a timer.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Iterable


class PidWatch:
    """Which of a set of processes have ended.

    Thread contract: :meth:`kick` from any thread (it never blocks); :meth:`sync`,
    :meth:`wait` and :meth:`close` from the one watcher thread. The descriptors
    are this object's own and are closed when a pid leaves the set."""

    def __init__(self) -> None:
        self.events = hasattr(os, "pidfd_open")
        self._fds: dict[int, int] = {}    # pid -> pidfd
        self._gone: set[int] = set()      # pids already ended when they were first seen
        self._reported: set[int] = set()  # pids reported ended and still asked for: never again
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # kick against close: never write to a reused descriptor
        self._closed = False

    def kick(self) -> None:
        """Make a :meth:`wait` in progress (or the next one) return at once."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending
                    os.write(self._w, b"\0")

    def sync(self, pids: Iterable[int]) -> None:
        """Watch exactly ``pids``: open descriptors for new ones, close those of
        pids no longer asked for. A pid that has no process any more is reported
        ended by the next :meth:`wait`, once: a caller may keep asking for a pid
        that ended (a detached rank's worker), and it is not reported again."""
        want = set(pids)
        for pid in list(self._fds):
            if pid not in want:
                os.close(self._fds.pop(pid))
        self._gone &= want
        self._reported &= want
        if not self.events:
            return
        for pid in want - self._fds.keys() - self._gone - self._reported:
            try:
                self._fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self._gone.add(pid)
            except OSError:  # ENOSYS, EPERM (seccomp): fall back to the caller's timer
                self.events = False
                return

    def wait(self, timeout: float | None) -> set[int]:
        """Block until a watched process ends, :meth:`kick` is called, or ``timeout``
        seconds pass (None: no limit); returns the pids that ended, which are then
        no longer watched."""
        gone, self._gone = self._gone, set()
        if gone:
            timeout = 0.0
        poller = select.poll()
        poller.register(self._r, select.POLLIN)
        by_fd = {fd: pid for pid, fd in self._fds.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        for fd, _ in ready:
            if fd == self._r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._r, 4096):
                        pass
            elif fd in by_fd:
                pid = by_fd[fd]
                os.close(self._fds.pop(pid))
                gone.add(pid)
        self._reported |= gone
        return gone

    def close(self) -> None:
        """Close every descriptor; the watch is not used again."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            os.close(self._r)
            os.close(self._w)


__all__ = ["PidWatch"]
