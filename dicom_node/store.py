"""Durable files: received instances and the result objects built from them.

Layout under ``data_dir`` (one filesystem, so ``os.link`` and ``os.replace`` are atomic)::

    instances/<study uid>/<series uid>/<sop instance uid>.dcm
    results/<name>                       a result: one file (GSPS, structured report)
    results/<name>/<name>                ... or a folder of files (a study's burned-in captures)
    results/delivered/<study uid>.json   the delivered-results ledger (see below)
    results/delivered/.lock              held while a ledger is rewritten
    tmp/            files being written; anything left here after a crash is garbage
    tmp/<owner>/    the same, of one process (`SpoolArea`): several processes (receivers,
                    workers, on one host or several) may share data_dir

A file reaches its final name only after its bytes are on disk: it is written
under tmp/, fsynced, linked (an instance: ``os.link`` never replaces the first copy
received) or renamed (a result: ``os.replace``) into place, and the directory
holding the new name is fsynced (so is every directory created on the way).
After a power loss a final name therefore points at a complete file or does not
exist; it never points at a partial one.

At startup `reconcile` makes the files and the queue's instance rows agree again
(see its docstring and README "Crash safety and faults").

The delivered-results ledger is the record of what reached a destination that outlives
the job database: one small JSON file per study (UIDs, file names, destination names and
times; no patient data), updated when a delivery completes. When the database is lost
and rebuilt, `reconcile` reads it so that delivered studies are not analysed and sent
again (a PACS keeps the first object it gets under a UID, and the radiologist would see
a second result).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from dicom_node.files import fsync_directory
from dicom_node.log import get_logger

log = get_logger("dicom_node.store")

# PS3.5 9.1: a UID is digits and dots, at most 64 characters. Only such a value
# may become a path component, so a hostile UID ("../../etc") cannot leave data_dir.
# Leading zeros in a component are tolerated: some modalities send them.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64
# Result names are chosen by the node (e.g. "<uid>.dcm"); still, no separators.
_RESULT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
LEDGER_FORMAT = "dicom-node-delivered/1"
# results/delivered/.lock: held while a ledger is read, changed and rewritten, by the
# thread and the process doing it (an fcntl record lock, which NFS passes to its server).
LEDGER_LOCK_NAME = ".lock"
# fcntl record locks belong to a process, not a thread: its threads take this one first.
_LEDGER_THREADS = threading.Lock()


class LedgerError(ValueError):
    """A delivered-results ledger file cannot be read (the caller logs it and goes on)."""


@dataclass(frozen=True)
class DeliveredResult:
    """One entry of a study's delivered-results ledger (UIDs, a path, destination names)."""

    result_sop_instance_uid: str
    result_path: str
    sop_instance_uids: tuple[str, ...]  # the images the result covers
    delivered: dict[str, datetime]  # destination name -> when it was delivered there
    output: str = "gsps"  # which of its job's results: "gsps", "sr", "sc"


def validate_uid(value: object, *, name: str) -> str:
    """Return ``value`` as a UID string; raise ValueError naming ``name`` if it is not one."""
    text = str(value) if value is not None else ""
    if not text:
        raise ValueError(f"{name} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise ValueError(f"{name} is longer than {MAX_UID_LENGTH} characters")
    if not _UID.fullmatch(text):
        raise ValueError(f"{name} is not a UID (digits and dots): {text[:MAX_UID_LENGTH]!r}")
    return text


@dataclass
class Removed:
    """What `InstanceStore.remove_files` deleted."""

    instances: int = 0  # instance files deleted
    results: int = 0  # result files deleted
    bytes: int = 0  # their size
    skipped: list[str] = field(default_factory=list)  # paths outside instances/ and results/

def covered_images(result: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs of the images a result object covers: a GSPS's Presentation
    State Relationship (PS3.3 C.11.11), a structured report's Current Requested Procedure
    Evidence (C.17.2), a burned-in capture's Source Image Sequence (C.12.4)."""
    referenced = [image.get("ReferencedSOPInstanceUID") for image in result.get("SourceImageSequence", [])] + [
        image.get("ReferencedSOPInstanceUID")
        for series in result.get("ReferencedSeriesSequence", [])
        for image in series.get("ReferencedImageSequence", [])
    ] + [
        image.get("ReferencedSOPInstanceUID")
        for study in result.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for image in series.get("ReferencedSOPSequence", [])
    ]
    return {str(uid) for uid in referenced if uid}


def result_files(path: Path) -> list[Path]:
    """The DICOM files of one result: the file at `path`, or the files of the folder at
    `path` (a study's burned-in captures, `InstanceStore.write_result_set`), by name."""
    path = Path(path)
    if path.is_dir():
        return sorted(entry for entry in path.iterdir() if entry.is_file())
    return [path]


def free_bytes(path: Path) -> int:
    """Bytes still writable on the filesystem holding ``path`` (``statvfs``: a cheap syscall).

    ``f_bavail`` leaves out the blocks reserved for root, so the answer is the
    same whichever user the node runs as.
    """
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class InstanceStore:
    """The node's files under ``data_dir``; see the module docstring for the layout."""

    def __init__(self, data_dir: Path, *, fsync: bool = True, tmp_dir: Path | None = None):
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        # Where this process writes temp files: its SpoolArea's folder when it shares
        # data_dir with other processes, tmp/ itself otherwise (a tool, a test).
        self._tmp_dir = Path(tmp_dir) if tmp_dir is not None else None
        # Where hard links are missing (persist_instance), two associations may deliver
        # the same SOP Instance at once; the check for an existing file and the rename
        # must not interleave (first one wins).
        self._rename_lock = threading.Lock()
        for folder in (self.instances_dir, self.results_dir, self.data_dir / TMP_DIR, self.tmp_dir):
            self._make_dirs(folder)

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        return self._tmp_dir or self.data_dir / TMP_DIR

    @property
    def ledger_dir(self) -> Path:
        return self.results_dir / "delivered"

    def ledger_path(self, study_uid: str) -> Path:
        """The study's delivered-results ledger file; ValueError if the UID is not a UID."""
        return self.ledger_dir / f"{validate_uid(study_uid, name='Study Instance UID')}.json"

    def instance_path(self, *, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Final path of an instance; raise ValueError if a UID is not a valid UID."""
        return (
            self.instances_dir
            / validate_uid(study_uid, name="Study Instance UID")
            / validate_uid(series_uid, name="Series Instance UID")
            / f"{validate_uid(sop_instance_uid, name='SOP Instance UID')}.dcm"
        )

    @contextlib.contextmanager
    def temp_path(self, *, suffix: str = ".dcm") -> Iterator[Path]:
        """A fresh path under tmp/ (file created, empty); removed on exit unless moved away."""
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.tmp_dir)
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def persist_instance(
        self, source: Path, *, study_uid: str, series_uid: str, sop_instance_uid: str,
        keep_source: bool = False,
    ) -> Path:
        """Make ``source`` durable at the instance's final path and return that path.

        A ``source`` under tmp/ is fsynced and hard-linked into place (no copy), then
        removed unless ``keep_source`` (the SCP's spool file, which pynetdicom removes once
        the handler returns); any other file is copied and left in place. If the final
        file already exists (the same SOP Instance UID was received before, by this
        process or another sharing data_dir) the existing file is kept and returned:
        a link, unlike a rename, never replaces it. Raises ValueError for an invalid UID.
        """
        source = Path(source)
        final = self.instance_path(
            study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_instance_uid
        )
        if source.parent != self.tmp_dir and source.parent.resolve() != self.tmp_dir.resolve():
            with self.temp_path() as staged:
                shutil.copyfile(source, staged)
                return self.persist_instance(
                    staged,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=sop_instance_uid,
                )
        if not final.exists():
            self._fsync_file(source)
            self._make_dirs(final.parent)
            self._link_or_copy(source, final)
        # The name may be another writer's that has not yet made it durable (its fsync of
        # the directory comes after the link): this answer must not outrun it.
        self._fsync_dir(final.parent)
        if not keep_source:
            source.unlink(missing_ok=True)
        return final

    def _link_or_copy(self, source: Path, final: Path) -> None:
        """Give `final` the fsynced content of `source`, unless `final` exists already."""
        try:
            os.link(source, final)
        except FileExistsError:
            return
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # A filesystem without hard links: a copy, renamed into place unless the
            # name appeared meanwhile (a rename would replace it).
            with self.temp_path() as staged:
                shutil.copyfile(source, staged)
                self._fsync_file(staged)
                with self._rename_lock:
                    if not final.exists():
                        os.replace(staged, final)

    def write_result(self, ds: pydicom.Dataset, *, name: str) -> Path:
        """Write ``ds`` as a DICOM Part 10 file to results/``name`` durably; return the path.

        An existing result with the same name is replaced (a rebuilt result).
        """
        return self._replace(self._result_path(name), lambda staged: ds.save_as(staged, enforce_file_format=True))

    def _result_path(self, name: str) -> Path:
        """results/``name``; ValueError for a name that is not a plain file name."""
        if not _RESULT_NAME.fullmatch(name):
            raise ValueError(f"result name {name!r} must be letters, digits, '.', '_', '-'")
        return self.results_dir / name

    def write_result_set(self, datasets: Sequence[pydicom.Dataset], *, name: str) -> Path:
        """Write `datasets` as the files of the folder results/``name`` (``<SOP Instance
        UID>.dcm`` each, durably); return the folder.

        A result made of several objects (a study's burned-in captures) is one folder, so
        that it stays one delivery and one entry of the ledger. A rebuilt set replaces the
        files of the same name and removes any other file of the folder: it holds exactly
        this set once the call returns.
        """
        folder = self._result_path(name)
        self._make_dirs(folder)
        written = set()
        for ds in datasets:
            file_name = f"{validate_uid(ds.SOPInstanceUID, name='SOP Instance UID')}.dcm"
            self._replace(folder / file_name, lambda staged, ds=ds: ds.save_as(staged, enforce_file_format=True))
            written.add(file_name)
        stale = [entry for entry in folder.iterdir() if entry.name not in written]
        for entry in stale:
            entry.unlink(missing_ok=True)
        if stale:
            self._fsync_dir(folder)
        return folder

    def write_atomic(self, final: Path, data: bytes) -> Path:
        """Replace the file `final` (under data_dir) by `data`, durably and atomically."""
        final = Path(final)
        self._make_dirs(final.parent)
        return self._replace(final, lambda staged: staged.write_bytes(data))

    def _replace(self, final: Path, write) -> Path:
        """`write(staged)` a file under tmp/, fsync it, rename it over `final`, fsync the
        directory: a reader (or a restart after a power loss) sees the old file or the new
        one, never a part, and a crash leaves only a temp file that reconcile removes."""
        with self.temp_path() as staged:
            write(staged)
            self._fsync_file(staged)
            os.replace(staged, final)
        self._fsync_dir(final.parent)
        return final

    def record_delivered(
        self, result_path: Path, destination: str, *, output: str = "gsps", at: datetime | None = None
    ) -> Path:
        """Note in the study's ledger that the result at `result_path` (the job's `output`:
        "gsps", "sr", "sc") reached `destination`.

        The result file says what it covers: its study, its SOP Instance UID, and every
        image it references (a GSPS: PS3.3 C.11.11 Presentation State Relationship; a
        structured report: C.17.2 Current Requested Procedure Evidence; the analysed images
        and those skipped by design). A folder of captures (`write_result_set`) is one
        entry, named by its first capture (the lowest Instance Number, as the delivery row
        is), covering the source images of all. Returns the ledger file.
        """
        at = at or datetime.now(timezone.utc)
        results = [pydicom.dcmread(path, stop_before_pixels=True) for path in result_files(result_path)]
        if not results:
            raise LedgerError(f"{result_path}: an empty result folder")
        result = min(results, key=lambda ds: int(ds.get("InstanceNumber") or 0))
        study_uid = validate_uid(result.get("StudyInstanceUID"), name="Study Instance UID")
        entry = {
            "result_sop_instance_uid": validate_uid(result.get("SOPInstanceUID"), name="SOP Instance UID"),
            "result_file": Path(result_path).name,
            "output": output,
            "sop_instance_uids": sorted(set().union(*(covered_images(ds) for ds in results))),
            "delivered": {},
        }
        path = self.ledger_path(study_uid)
        # Two deliveries of one study may end at once, in two threads or two receivers:
        # without the lock, one's rewrite would drop what the other had just added.
        with self._ledgers_locked():
            ledger = self._read_ledger(path) or {"format": LEDGER_FORMAT, "study_uid": study_uid, "results": []}
            same = [e for e in ledger["results"] if e["result_sop_instance_uid"] == entry["result_sop_instance_uid"]]
            if same:
                entry = same[0]
            else:
                ledger["results"].append(entry)
            # The first delivery's time stays; a re-send (after a lost acknowledgement) adds nothing.
            entry["delivered"].setdefault(destination, at.astimezone(timezone.utc).isoformat())
            return self.write_atomic(path, (json.dumps(ledger, indent=1) + "\n").encode())

    @contextlib.contextmanager
    def _ledgers_locked(self) -> Iterator[None]:
        """Every ledger to this thread alone, among all processes sharing data_dir."""
        self._make_dirs(self.ledger_dir)
        with _LEDGER_THREADS:
            fd = os.open(self.ledger_dir / LEDGER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # and with it the lock

    def delivered_results(self, study_uid: str) -> list[DeliveredResult]:
        """The study's delivered results from its ledger, oldest first; [] without one."""
        ledger = self._read_ledger(self.ledger_path(study_uid)) or {"results": []}
        return [
            DeliveredResult(
                result_sop_instance_uid=entry["result_sop_instance_uid"],
                result_path=str(self.results_dir / entry["result_file"]),
                sop_instance_uids=tuple(entry["sop_instance_uids"]),
                delivered={name: datetime.fromisoformat(at) for name, at in entry["delivered"].items()},
                output=entry.get("output", "gsps"),  # ledgers written before outputs: the GSPS
            )
            for entry in ledger["results"]
        ]

    @staticmethod
    def _read_ledger(path: Path) -> dict | None:
        try:
            ledger = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise LedgerError(f"{path}: unreadable delivered-results ledger ({type(error).__name__})") from None
        if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{path}: not a delivered-results ledger ({LEDGER_FORMAT})")
        return ledger

    def free_bytes(self) -> int:
        """Bytes still writable on data_dir's filesystem (see `free_bytes`)."""
        return free_bytes(self.data_dir)

    def remove_files(self, instance_paths: Iterable[str], result_paths: Iterable[str] = ()) -> Removed:
        """Delete these instance and result files, then the series and study folders left empty.

        Only files at instance depth under instances/ and directly under results/ are
        touched (a result that is a folder of captures, `write_result_set`: its files, then
        the folder): a path anywhere else (a moved data_dir, a row edited by hand) is left
        alone and returned in ``skipped``. A file already gone is not an error. The
        directories are fsynced before returning, so the removal is on disk before the
        caller commits the matching row deletions (see Queue.purge_study): after a power
        loss a removed file cannot reappear without its row.

        A folder is removed only while empty (``rmdir``): an instance the SCP has just
        renamed into it keeps it. The SCP creating a folder just as it is removed gets
        an OSError before it acknowledges anything, and answers Out of Resources.
        """
        removed = Removed()
        touched: set[Path] = set()
        instances_root, results_root = self.instances_dir.resolve(), self.results_dir.resolve()
        for paths, root, depth, kind in (
            (instance_paths, instances_root, 3, "instances"),
            (result_paths, results_root, 1, "results"),
        ):
            for name in paths:
                path = Path(name).resolve()
                if not (path.is_relative_to(root) and len(path.relative_to(root).parts) == depth):
                    removed.skipped.append(str(name))
                    continue
                for file in result_files(path) if kind == "results" else [path]:
                    try:
                        size = file.stat().st_size
                        file.unlink()
                    except FileNotFoundError:
                        continue
                    if kind == "instances":
                        removed.instances += 1
                    else:
                        removed.results += 1
                    removed.bytes += size
                    touched.add(path.parent)
                if kind == "results" and path.is_dir():  # a folder of captures, emptied
                    with contextlib.suppress(OSError):
                        path.rmdir()
                        touched.add(path.parent)
        for folder in sorted(touched):
            if folder == results_root:
                continue
            series, study = folder, folder.parent
            for empty in (series, study):
                try:
                    empty.rmdir()
                except OSError:  # not empty (another series, a new instance) or gone
                    break
                touched.add(empty.parent)
        for folder in sorted(touched):
            if folder.is_dir():
                self._fsync_dir(folder)
        return removed

    def remove_ledger(self, study_uid: str) -> bool:
        """Delete the study's delivered-results ledger (with its study, by retention)."""
        path = self.ledger_path(study_uid)
        with self._ledgers_locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        self._fsync_dir(path.parent)
        return True

    def instance_files(self) -> Iterator[Path]:
        """Every file at instance depth (instances/<study>/<series>/<file>), in no order."""
        for study in _subdirs(self.instances_dir):
            for series in _subdirs(study):
                with os.scandir(series) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            yield Path(entry.path)

    def remove_orphan_temp_files(self) -> int:
        """Delete what crashed processes left in tmp/; call at startup. Returns the count.

        Left alone: this store's own folder and the `SpoolArea` of every live process
        (its lock is held). Everything else in tmp/ is a dead process's: its area (see
        `sweep_spool_areas`) or a file written before the spool areas existed.
        """
        removed = len(sweep_spool_areas(self.data_dir, keep=self.tmp_dir))
        top = self.data_dir / TMP_DIR
        entries = list(top.iterdir())
        # Listed after the entries: an area's lock is made before its folder, so a live
        # area in `entries` has its lock here (the dead ones' were swept just above).
        live = {lock.name[: -len(AREA_LOCK_SUFFIX)] for lock in top.glob(f"*{AREA_LOCK_SUFFIX}")}
        live.add(self.tmp_dir.name)
        for entry in entries:
            if entry.name in live or entry.name.endswith(AREA_LOCK_SUFFIX):
                continue  # a live area or a lock (a dead one's was swept above)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("orphan_temp_files_removed", count=removed, tmp_dir=str(top))
        return removed

    def _make_dirs(self, folder: Path) -> None:
        """mkdir -p, fsyncing the parent of every directory created so the entry survives."""
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:  # another association created it meanwhile
                continue
            self._fsync_dir(directory.parent)

    def _fsync_file(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self, path: Path) -> None:
        # The rename is durable only once the directory entry is on disk.
        if self.fsync:
            fsync_directory(path)


# --------------------------------------------------------------------------- spool areas

TMP_DIR = "tmp"
AREA_LOCK_SUFFIX = ".lock"
AREA_LOCK_WAIT_SECONDS = 2.0


def process_owner() -> str:
    """This process's name among every process sharing data_dir: ``<host>-<pid>``.

    The host name keeps two hosts' pids apart on a shared data_dir (and in the job
    table, where worker ids start with it); only letters, digits, '.', '-' are kept.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"
    return f"{host[:64]}-{os.getpid()}"


def _lock_path(top: Path, owner: str) -> Path:
    return top / f"{owner}{AREA_LOCK_SUFFIX}"


def _lock_if_free(path: Path, *, create: bool) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process holds it.

    None as well when `path` was removed or replaced meanwhile (a sweeper deleted a dead
    area's lock between our open and our flock): the lock we hold would then guard nothing.
    """
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


class SpoolArea:
    """``data_dir/tmp/<owner>/``: one process's temp files, guarded by ``tmp/<owner>.lock``.

    The process holds an flock on the lock file for its whole life; the kernel drops it
    when the process ends, even on SIGKILL (on NFSv4 and CephFS the lock is the server's,
    so a dead host's lock is dropped once its lease runs out). A starting process removes
    only the areas whose lock it can take: their owner is dead, so nothing it removes is
    being written (an unacknowledged C-STORE, a result being built). The lock file comes
    first and the folder second, so a folder never exists unguarded by a live owner.
    Workers spawned by the owner write here too; they die with it (PR_SET_PDEATHSIG).
    """

    def __init__(self, data_dir: Path, owner: str | None = None):
        self.owner = owner or process_owner()
        self.top = Path(data_dir) / TMP_DIR
        self.path = self.top / self.owner
        self._fd: int | None = None

    def acquire(self) -> SpoolArea:
        self.top.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + AREA_LOCK_WAIT_SECONDS
        # Taken only for a moment: by a sweeper that found a dead namesake (it then
        # removes that lock file, and we make a new one).
        while (fd := _lock_if_free(_lock_path(self.top, self.owner), create=True)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"spool area {self.path} is held by another process")
            time.sleep(0.05)
        self._fd = fd
        # A dead process of the same name (a pid reused after a restart, in a container):
        # what it left is garbage like any dead area's.
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        fsync_directory(self.top)
        return self

    def release(self) -> None:
        """Remove the folder and its lock (a clean stop); the lock itself drops last."""
        if self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        _lock_path(self.top, self.owner).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def sweep_spool_areas(data_dir: Path, *, keep: Path | None = None) -> list[str]:
    """Remove the spool areas of dead processes; returns their owners (see `SpoolArea`).

    The caller also ends the dead owners' leases (Queue.expire_leases(owners=...)): their
    worker ids start with the owner, and a dead process's job is then claimed again at
    once instead of after its lease.
    """
    top = Path(data_dir) / TMP_DIR
    dead = []
    for lock in sorted(top.glob(f"*{AREA_LOCK_SUFFIX}")):
        owner = lock.name[: -len(AREA_LOCK_SUFFIX)]
        if keep is not None and (top / owner) == Path(keep):
            continue
        fd = _lock_if_free(lock, create=False)
        if fd is None:
            continue  # alive (or swept by another process meanwhile)
        try:
            shutil.rmtree(top / owner, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
        dead.append(owner)
    if dead:
        log.info("dead_spool_areas_removed", owners=dead)
    return dead


def _subdirs(folder: Path) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


# --------------------------------------------------------------------------- startup


@dataclass
class Reconciliation:
    """What `reconcile` found and did at startup (UIDs and paths only, never patient data)."""

    temp_files_removed: int = 0
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs whose file is gone
    found_again: int = 0  # rows marked missing earlier whose file is back
    recorded: list[str] = field(default_factory=list)  # files that had no row, now recorded
    unrecognised: list[str] = field(default_factory=list)  # paths left alone (not ours to judge)
    restored_jobs: list[int] = field(default_factory=list)  # done jobs restored from the ledger


def _stored_identity(store: InstanceStore, path: Path) -> dict | None:
    """record_instance() arguments for a file the SCP wrote, or None if it is not one.

    The file must parse, and its UIDs must give back exactly its own path: anything
    else was not put there by the SCP and is left alone.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identity = {
            "sop_instance_uid": validate_uid(ds.get("SOPInstanceUID"), name="SOP Instance UID"),
            "sop_class_uid": validate_uid(ds.get("SOPClassUID"), name="SOP Class UID"),
            "study_uid": validate_uid(ds.get("StudyInstanceUID"), name="Study Instance UID"),
            "series_uid": validate_uid(ds.get("SeriesInstanceUID"), name="Series Instance UID"),
            "transfer_syntax": validate_uid(
                ds.file_meta.get("TransferSyntaxUID"), name="Transfer Syntax UID"
            ),
        }
        # The SCP writes the caller into the File Meta (PS3.10 7.1, Sending AE Title).
        calling_ae = str(ds.file_meta.get("SendingApplicationEntityTitle", "") or "").strip()
    except Exception:  # whatever pydicom raises: not a file the SCP wrote (the caller logs it)
        return None
    expected = store.instance_path(
        study_uid=identity["study_uid"],
        series_uid=identity["series_uid"],
        sop_instance_uid=identity["sop_instance_uid"],
    )
    if os.path.abspath(expected) != os.path.abspath(path):
        return None
    return {
        **identity,
        "path": str(path),
        "calling_ae": calling_ae[:16] or "UNKNOWN",
        "size_bytes": path.stat().st_size,
    }


def reconcile(
    store: InstanceStore, queue, *, destinations: Mapping[str, Sequence[str]] | Collection[str] = ()
) -> Reconciliation:
    """Make the instance files and the instance rows agree again; call at startup only.

    - tmp/ is emptied (writes a crash interrupted; never acknowledged);
    - a row whose file is gone is marked missing (``missing_since``), shown by
      ``dicom-node status`` and logged; a job for its study fails naming the file;
    - a file without a row (a crash between the rename and the commit: the sender got
      no Success and will likely send it again, as a duplicate) is recorded, so nothing
      stored is ignored; its study gets analysed like any other;
    - a file under instances/ that the SCP did not write is logged and left in place;
    - a study whose files were recorded here and which has no job (the database was
      rebuilt) gets its delivered results back from the ledger as done jobs: the images
      they cover are not analysed and sent again, later images are. A destination of
      `destinations` (name -> the outputs it takes; a list of names takes the GSPS) that
      takes a result's output and never got it gets a pending delivery of it.
    """
    result = Reconciliation(temp_files_removed=store.remove_orphan_temp_files())
    on_disk = {os.path.abspath(path): path for path in store.instance_files()}
    known_paths = set()
    for sop_instance_uid, path in queue.instance_paths():
        known_paths.add(os.path.abspath(path))
        if os.path.abspath(path) not in on_disk and not os.path.exists(path):
            result.missing.append(sop_instance_uid)
    newly_missing, result.found_again = queue.set_missing_instances(result.missing)
    recorded_studies: dict[str, None] = {}  # in order of recording, each once
    for key in sorted(set(on_disk) - known_paths):
        path = on_disk[key]
        identity = _stored_identity(store, path)
        if identity is not None and queue.record_instance(**identity):
            result.recorded.append(identity["sop_instance_uid"])
            recorded_studies[identity["study_uid"]] = None
        else:
            result.unrecognised.append(str(path))
    for study_uid in recorded_studies:
        result.restored_jobs += _restore_delivered(store, queue, study_uid, destinations)
    if result.missing:
        log.error(
            "instances_missing", count=len(result.missing), newly_missing=newly_missing,
            sop_instance_uids=result.missing[:10],
        )
    if result.found_again:
        log.info("instances_found_again", count=result.found_again)
    if result.recorded:
        log.warning(
            "unrecorded_instances_recorded", count=len(result.recorded),
            sop_instance_uids=result.recorded[:10],
        )
    if result.unrecognised:
        log.warning(
            "unrecognised_instance_files", count=len(result.unrecognised),
            paths=result.unrecognised[:10],
        )
    return result


def _restore_delivered(store: InstanceStore, queue, study_uid: str, destinations) -> list[int]:
    """Restore a study's delivered results from its ledger (see reconcile); the new job ids."""
    try:
        delivered = store.delivered_results(study_uid)
    except LedgerError as error:
        # Without it the study is analysed and sent again: a second result, not a lost one.
        log.error("ledger_unreadable", study_uid=study_uid, error=str(error))
        return []
    job_ids = queue.restore_delivered(study_uid, delivered, resend_to=destinations) if delivered else []
    if job_ids:
        log.warning(
            "delivered_results_restored", study_uid=study_uid, job_ids=job_ids,
            result_sop_instance_uids=[r.result_sop_instance_uid for r in delivered],
        )
    return job_ids
