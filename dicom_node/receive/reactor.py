"""pynetdicom's DUL and association threads, woken by their work instead of a clock.

pynetdicom's DUL reactor polls: after a turn with nothing to do it sleeps a millisecond,
then looks at its socket and at the queue of primitives to send. Each C-STORE waits on it
at least twice (for our answer to go out, for the sender's next request to be read): two
milliseconds of every instance, a tenth of the time a 17 MB mammogram takes over loopback,
and a thousand wake-ups a second of every idle association.

`wake_on_activity` makes the DUL wait in select() on its socket and on an eventfd that
the outgoing queue signals, so that it wakes as soon as either has something (or after
IDLE_WAIT_SECONDS, for its timers and its stop flag), and takes its sleep away.

The association thread polls too: it sleeps a millisecond, then looks for a decoded message
and for a release or abort from the peer. `wake_association_on_work` makes the wait after that
sleep last until the DUL hands it one of those.

A C-STORE request is not handed over at all: the DUL thread that decoded its last fragment
serves it at once (`ServingQueue`), with the log fields the association's thread bound.
Handing it to the association's thread and its answer back cost two thread switches, a
third of a millisecond of every instance; meanwhile the sender waits for the answer and
sends nothing (no asynchronous operations are negotiated, PS3.7 D.3.3.3), so the DUL has
nothing else to read.
"""

from __future__ import annotations

import contextvars
import functools
import os
import queue
import select
import threading
import weakref
from collections.abc import Callable

from pynetdicom.dimse_primitives import C_STORE

from dicom_node.receive.responses import serve_c_store

IDLE_WAIT_SECONDS = 0.01


class AnnouncingQueue(queue.Queue):
    """A queue whose put() then calls `announce()`: the thread waiting for work wakes."""

    def __init__(self, announce: Callable[[], object]) -> None:
        super().__init__()
        self._announce = announce

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._announce()


class ServingQueue(AnnouncingQueue):
    """An association's queue of decoded DIMSE requests (``dimse.msg_queue``), whose put()
    serves a C-STORE request at once, in the putting (DUL) thread, with `serve(request,
    context_id)`, when nothing waits before it, `can_serve()` (the association is
    established) and the association's log context is known; anything else is queued for
    the association's thread, as pynetdicom does."""

    def __init__(self, announce: Callable[[], object], *, serve: Callable[[C_STORE, int], None],
                 can_serve: Callable[[], bool]) -> None:
        super().__init__(announce)
        self._serve = serve
        self._can_serve = can_serve
        self._context: contextvars.Context | None = None

    def serve_with_this_context(self) -> None:
        """Serve C-STORE requests in the context of the calling thread (the association's,
        once established: the log fields bound at its request, dicom_node.receive.access)."""
        self._context = contextvars.copy_context()

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if self._context is not None and isinstance(primitive, C_STORE) and self.empty() and self._can_serve():
            self._context.run(self._serve, primitive, context_id)
            return
        super().put(item, block, timeout)


def serve_stores_in_dul_thread(event) -> None:
    """EVT_ESTABLISHED (in the association's thread): C-STORE requests are served from now
    on by the DUL thread that decodes them, in this thread's log context."""
    requests = event.assoc.dimse.msg_queue
    if isinstance(requests, ServingQueue):
        requests.serve_with_this_context()


class SignallingQueue(AnnouncingQueue):
    """A queue whose put() also makes an eventfd readable, for select().

    `close()` releases the eventfd (so does garbage collection, as a safety net); a put()
    after it (a late abort) only queues.
    """

    def __init__(self) -> None:
        self._signal = _EventFd()
        super().__init__(self._signal.write)
        # An association that never ran (it failed to start) never calls close().
        weakref.finalize(self, self._signal.close)

    def wait(self, sock, timeout: float) -> None:
        """Until `sock` (if any) is readable, something is put, or `timeout` passes."""
        fd = self._signal.fd
        if fd is None:
            return
        try:
            select.select([fd] if sock is None else [sock, fd], [], [], timeout)
        except (OSError, ValueError):  # the socket was closed meanwhile
            return
        self._signal.reset()

    def close(self) -> None:
        self._signal.close()


class _EventFd:
    """An eventfd that is written, reset and closed under one lock: after close() its
    number, which the kernel may give to another file, is never touched again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def write(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.eventfd_write(self.fd, 1)

    def reset(self) -> None:
        with self._lock:
            if self.fd is not None:
                try:
                    os.eventfd_read(self.fd)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def wake_on_activity(dul, *, unread: Callable[[], int]) -> SignallingQueue:
    """Install the wait on `dul` (before its thread starts); the caller closes the queue
    returned once the association's threads have ended. `unread()`: how many bytes the
    PDU reader holds already (dicom_node.receive.limits.PduReader), which select() on the
    socket cannot see.

    pynetdicom's loop calls ``_is_transport_event`` when nothing waits to be sent; when it
    finds nothing either, the wait happens there, and whatever woke it becomes this
    turn's event: a primitive to send, or a PDU read.
    """
    outgoing = SignallingQueue()
    dul.to_provider_queue = outgoing
    # pynetdicom sleeps this long after a turn that queued no event (as after each answer
    # sent): the wait is in select() below, the sleep would only delay the next request.
    dul._run_loop_delay = 0
    transport_event = dul._is_transport_event

    def transport_event_or_wait() -> bool:
        if unread() and dul.state_machine.current_state != "Sta13":
            dul._read_pdu_data()
            return True
        if transport_event():
            return True
        if dul._kill_thread or not dul.event_queue.empty():
            return False
        association_socket = dul.socket
        outgoing.wait(association_socket.socket if association_socket is not None else None, IDLE_WAIT_SECONDS)
        return dul._process_recv_primitive() or transport_event()

    dul._is_transport_event = transport_event_or_wait
    return outgoing


class _WorkCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint (an Event that is set while the association's reactor
    may run, cleared to pause it) whose wait, while set, also lasts until there is work:
    `ready()` is true, `activity` is set, or IDLE_WAIT_SECONDS pass (its idle timer)."""

    def __init__(self, activity: threading.Event, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._activity = activity
        self._ready = ready

    def set(self) -> None:
        super().set()
        self._activity.set()  # kill() and the end of a pause set it: wake the reactor

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            self._activity.clear()
            if not self._ready():
                self._activity.wait(IDLE_WAIT_SECONDS)
            if self.is_set():
                return True
        return super().wait(timeout)  # paused (by a send or a release of ours): as pynetdicom


def wake_association_on_work(association) -> None:
    """Make `association`'s reactor wait for work instead of polling each millisecond;
    call before its threads start.

    The reactor's loop (Association._run_reactor) sleeps 1 ms, then waits on its checkpoint,
    then takes a decoded DIMSE message if there is one and looks at the DUL's primitives for
    the user (a release or abort request). Both queues signal one Event that the checkpoint
    waits on; kill() sets the checkpoint, and the DUL thread puts a last None on its way out
    (dicom_node.receive.server), so that every reason to end the loop also wakes it.
    """
    activity = threading.Event()
    dimse, dul = association.dimse, association.dul
    dimse.msg_queue = ServingQueue(
        activity.set, serve=functools.partial(serve_c_store, association),
        can_serve=lambda: association.is_established,
    )
    dul.to_user_queue = AnnouncingQueue(activity.set)
    checkpoint = _WorkCheckpoint(
        activity,
        ready=lambda: (not dimse.msg_queue.empty() or not dul.to_user_queue.empty()
                       or association._kill or not dul.is_alive()),
    )
    checkpoint.set()  # pynetdicom starts it set: the reactor runs
    association._reactor_checkpoint = checkpoint
