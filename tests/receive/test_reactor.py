"""The DUL thread waits on its socket and on an eventfd its outgoing queue signals: the wait
ends when something is queued, and no association leaves a file descriptor behind."""

from __future__ import annotations

import gc
import os
import threading
import time

from dicom_node.receive.reactor import SignallingQueue
from tests.integration.process import wait_for
from tests.receive.helpers import echoscu


def open_eventfds() -> int:
    """This process's eventfds (other descriptors come and go with other tests' threads)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:  # closed meanwhile
            pass
    return count


def test_a_put_ends_the_wait_at_once():
    queue = SignallingQueue()
    try:
        threading.Timer(0.2, queue.put, args=("primitive",)).start()
        started = time.monotonic()
        queue.wait(None, timeout=30)
        assert time.monotonic() - started < 10, "the wait ran to its timeout: put() did not wake it"
        assert queue.get_nowait() == "primitive"
        queue.wait(None, timeout=0.05)  # the signal was consumed: this one waits its timeout out
    finally:
        queue.close()


def test_closed_or_forgotten_queues_release_their_eventfd():
    # Each queue's own eventfd, not the process's count: associations of earlier tests may
    # still be ending (and closing theirs) meanwhile.
    queues = [SignallingQueue() for _ in range(50)]
    signals = [queue._signal for queue in queues]
    assert all(os.readlink(f"/proc/self/fd/{signal.fd}") == "anon_inode:[eventfd]" for signal in signals)
    for queue in queues[:25]:
        queue.put("x")
        queue.close()
        queue.put("after close: queued, not signalled")
    assert [signal.fd is None for signal in signals] == [True] * 25 + [False] * 25
    del queues, queue
    gc.collect()
    assert all(signal.fd is None for signal in signals)  # closed by the forgotten queues' finalizers


def test_associations_leave_no_file_descriptor_behind(node):
    assert echoscu(node.port).returncode == 0  # the first association warms up what stays
    wait_for(lambda: not node.server.active_associations, 10, description="the association to end")
    gc.collect()  # what earlier tests forgot
    before = open_eventfds()
    for _ in range(20):
        assert echoscu(node.port).returncode == 0
    wait_for(lambda: not node.server.active_associations, 10, description="the associations to end")
    assert open_eventfds() <= before
