"""Senders that behave like modalities: send in order, remember what was acknowledged, re-send the rest.

A `Modality` sends its files over one pynetdicom association, one C-STORE at a time,
and stops at the first request that gets no Success (the node died, the association
was aborted). An instance counts as acknowledged only when a Success status came
back (PS3.4 B.2.3); everything else is sent again by the next `send`, as a modality
keeps an image in its queue until the archive has confirmed it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.status import Status

NETWORK_TIMEOUT_SECONDS = 30


@dataclass
class Modality:
    """One sender with an ordered outbox; thread-safe counters for the test to read."""

    ae_title: str
    files: list[tuple[Path, str]]  # (path, SOP Instance UID), in sending order
    called_ae: str = "DICOM_NODE"
    acknowledged: list[str] = field(default_factory=list)
    requests: int = 0  # C-STORE requests sent, re-sends included
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def pending(self) -> list[tuple[Path, str]]:
        with self._lock:
            done = set(self.acknowledged)
        return [(path, uid) for path, uid in self.files if uid not in done]

    def acknowledged_count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def send(self, port: int) -> None:
        """Send what is not acknowledged yet, in order, over one association; never raises."""
        pending = self.pending()
        if not pending:
            return
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = NETWORK_TIMEOUT_SECONDS
        for context in sorted({_context_of(path) for path, _ in pending}):
            ae.add_requested_context(*context)
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=self.called_ae)
            if not assoc.is_established:
                return
            for path, uid in pending:
                with self._lock:
                    self.requests += 1
                status = assoc.send_c_store(path)
                if "Status" not in status or status.Status != Status.SUCCESS:
                    break  # no acknowledgement: it stays in the outbox
                with self._lock:
                    self.acknowledged.append(uid)
            if assoc.is_established:
                assoc.release()
        except Exception:  # a dead peer: whatever was not acknowledged is sent again later
            pass
        finally:
            ae.shutdown()


_CONTEXTS: dict[Path, tuple[str, str]] = {}


def _context_of(path: Path) -> tuple[str, str]:
    if path not in _CONTEXTS:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        _CONTEXTS[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    return _CONTEXTS[path]


def send_concurrently(modalities: Sequence[Modality], port: int) -> list[threading.Thread]:
    """Start one thread per modality sending its outbox; the caller joins them."""
    threads = [
        threading.Thread(target=m.send, args=(port,), name=f"send-{m.ae_title}", daemon=True)
        for m in modalities
    ]
    for thread in threads:
        thread.start()
    return threads


def clone_study(template: Path, folder: Path, *, n_images: int) -> list[tuple[Path, str]]:
    """`n_images` copies of an encoded image as one new study (new UIDs, pixel data untouched).

    Encoding is the slow part of making a compressed test image; re-labelling the same
    encoded bytes gives as many distinct instances as a test needs at the cost of a copy.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for index in range(n_images):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImageLaterality = "LR"[index % 2]
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((path, str(ds.SOPInstanceUID)))
    return files
