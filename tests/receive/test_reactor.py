"""The DUL thread waits on its socket and on an eventfd its outgoing queue signals: the wait
ends when something is queued, and no association leaves a file descriptor behind. A
C-STORE request is served by the thread that decoded it, in the association's log context."""

from __future__ import annotations

import contextvars
import copy
import gc
import json
import os
import threading
import time

from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation as MG
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification

from dicom_node.receive import handlers
from dicom_node.receive.reactor import ServingQueue, SignallingQueue
from dicom_node.receive.responses import HANDLER_FAILED
from tests.integration.process import wait_for
from tests.receive.helpers import association, echoscu, make_encoded, stored_files, storescu, temp_files


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


LOG_FIELD = contextvars.ContextVar("log_field", default=None)


class RecordingServer:
    """What ServingQueue is given of an association: whether it is established, and the
    function serving a request, which records the request with its thread and log field."""

    def __init__(self) -> None:
        self.established = True
        self.served: list[tuple[object, int, str, object]] = []
        self.announced = 0

    def queue(self) -> ServingQueue:
        return ServingQueue(self.announce, serve=self.serve, can_serve=lambda: self.established)

    def announce(self) -> None:
        self.announced += 1

    def serve(self, primitive, context_id: int) -> None:
        self.served.append((primitive, context_id, threading.current_thread().name, LOG_FIELD.get()))


def put_from_thread(queue: ServingQueue, item, name: str) -> None:
    thread = threading.Thread(target=queue.put, args=(item,), name=name)
    thread.start()
    thread.join(30)


def serve_in_association_thread(queue: ServingQueue) -> None:
    """As the association's thread does once established, with its log field bound."""

    def establish() -> None:
        LOG_FIELD.set("a7")
        queue.serve_with_this_context()

    thread = threading.Thread(target=establish)
    thread.start()
    thread.join(30)


def test_a_c_store_request_is_served_by_the_putting_thread_with_the_associations_log_context():
    server = RecordingServer()
    queue = server.queue()
    serve_in_association_thread(queue)
    store = C_STORE()
    put_from_thread(queue, (1, store), "dul")
    assert server.served == [(store, 1, "dul", "a7")]
    assert queue.empty() and server.announced == 0
    assert LOG_FIELD.get() is None  # this thread's own context is untouched


def test_requests_go_to_the_association_thread_until_it_is_established_or_behind_others():
    server = RecordingServer()
    queue = server.queue()
    early, echo, behind, after_release = C_STORE(), C_ECHO(), C_STORE(), C_STORE()
    put_from_thread(queue, (1, early), "dul")  # before EVT_ESTABLISHED: no log context yet
    serve_in_association_thread(queue)
    put_from_thread(queue, (3, echo), "dul")  # not a C-STORE
    put_from_thread(queue, (1, behind), "dul")  # others wait before it: their order is kept
    assert [queue.get_nowait() for _ in range(3)] == [(1, early), (3, echo), (1, behind)]
    server.established = False
    put_from_thread(queue, (1, after_release), "dul")
    assert server.served == []
    assert queue.get_nowait() == (1, after_release)
    assert server.announced == 4  # each one queued woke the association's thread


def test_a_node_serves_each_c_store_in_the_dul_thread_that_decoded_it(node, tmp_path, monkeypatch):
    serving_threads = []
    store = handlers._store

    def recording_store(event, *args):
        serving_threads.append(threading.current_thread() is event.assoc.dul)
        return store(event, *args)

    monkeypatch.setattr(handlers, "_store", recording_store)
    files = [make_encoded(tmp_path / str(index), "explicit-little") for index in range(3)]
    assert storescu(node.port, *files).returncode == 0
    assert len(stored_files(node.data_dir)) == 3
    assert serving_threads == [True, True, True]


def test_a_failing_c_store_handler_is_answered_as_by_pynetdicom_and_leaves_no_spool(
    node, tmp_path, monkeypatch, log_output
):
    def failing_store(event, *args):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(handlers, "_store", failing_store)
    file = make_encoded(tmp_path, "explicit-little")
    with association(node.port, [(MG, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_store(file).Status == HANDLER_FAILED
        assert assoc.send_c_store(file).Status == HANDLER_FAILED  # the association goes on
    events = [json.loads(line) for line in log_output().splitlines() if line.startswith("{")]
    failures = [event for event in events if event["event"] == "c_store_handler_failed"]
    assert len(failures) == 2 and "RuntimeError" in failures[0]["error"]
    assert stored_files(node.data_dir) == [] and temp_files(node.data_dir) == []


def test_associations_share_the_servers_presentation_contexts_without_changing_them(node, tmp_path):
    """pynetdicom deep-copies the contexts for every association; the node hands each the same
    objects (SharedContexts), which is sound only while negotiation leaves them as they are."""

    def contexts() -> list[tuple]:
        return [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id)
                for cx in node.server.contexts]

    before = contexts()
    shared = copy.deepcopy(node.server.contexts)
    assert shared is not node.server.contexts and all(a is b for a, b in zip(shared, node.server.contexts))
    assert storescu(node.port, make_encoded(tmp_path, "explicit-little")).returncode == 0
    with association(node.port, [(MG, [ImplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
    assert contexts() == before
