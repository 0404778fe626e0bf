"""Crash safety: `kill -9` the node mid-burst and mid-analysis, restart it, lose nothing.

Three modalities send 6 studies x 4 images concurrently to a real `dicom-node serve`
whose destination is a real Orthanc. The node is SIGKILLed after some but not all
C-STOREs were acknowledged, restarted on the same config and data_dir, and the
modalities re-send what was not acknowledged (as modalities do). It is SIGKILLed again
while a worker analyses a study (between `job_started` and `job_done`) and restarted.

Then Orthanc must hold exactly one GSPS per study, each referencing exactly the images
of its study, with the GSPS UID of the study's one job (its analysis key and the model); every instance
acknowledged before the first kill must have been in the node's data at the kill (file
that parses with its UIDs, and a row), and nothing may be left to analyse.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest

from dicom_node.analyse.worker import result_uid
from dicom_node.config import load_config
from dicom_node.model.detector import load_detector
from dicom_node.queue.ops import Queue
from tests import synthetic
from tests.dciodvfy import assert_dciodvfy_clean

from . import node_process
from .gsps_read import GSPS_SOP_CLASS, referenced_images
from .modality import Modality, clone_study, send_concurrently
from .node_process import write_config
from .process import free_ports, wait_for

pytestmark = pytest.mark.integration

STUDIES, IMAGES_PER_STUDY, MODALITIES = 6, 4, 3
# The first kill comes once this many C-STOREs were acknowledged (of 24).
KILL_AFTER_ACKNOWLEDGED = 6
STABLE_SECONDS = 3
# Short leases: a job or delivery held by a killed process is taken up again soon.
LEASE_SECONDS = 6
TIMEOUT_SECONDS = 120
PHI_VALUES = (
    synthetic.FAKE_PATIENT_NAME,
    synthetic.FAKE_PATIENT_ID,
    synthetic.FAKE_ACCESSION,
    synthetic.FAKE_BIRTH_DATE,
)


class NodeProcess(node_process.NodeProcess):
    """A node whose log lines may arrive merged: ``{...}{...}`` on one line.

    dicom_node.log writes a line with print(), i.e. the text and its newline in two
    write() calls, so a worker's line can land between them. That happens here when a
    restarted node's worker takes up the interrupted job at once and logs while the main
    process logs node_ready. (The fix, in dicom_node/log.py: one write() per line.)
    """

    def _read(self) -> None:
        decoder = json.JSONDecoder()
        for line in self.process.stdout:
            text, parts = line.strip(), []
            while text.startswith("{"):
                try:
                    _, end = decoder.raw_decode(text)
                except ValueError:
                    break
                parts.append(text[:end])
                text = text[end:].lstrip()
            for part in parts + ([text] if text else []):
                self.lines.append(part)
                event = self._parse(part)
                if event.get("event") == "node_ready":
                    self.port = int(event["port"])
                    self._ready.set()


def child_pids(pid: int) -> set[int]:
    """The direct children of a running process (Linux /proc)."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return children


def is_gone(pid: int) -> bool:
    """True when the process no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_node(node: NodeProcess) -> None:
    """SIGKILL the node; its workers must die with it (PR_SET_PDEATHSIG in the worker)."""
    children = child_pids(node.process.pid)
    node.kill()
    wait_for(lambda: all(is_gone(pid) for pid in children), 30,
             description=f"the node's child processes {sorted(children)} to die with it")


def node_config(folder: Path, orthanc, port: int) -> Path:
    boxes = folder / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [[0.2, 0.2, 0.4, 0.4, 0.9]]}))
    return write_config(
        folder / "node.toml",
        {
            # A fixed port, as modalities are configured with one.
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": port,
                     "data_dir": str(folder / "data")},
            "study": {"stable_seconds": STABLE_SECONDS},
            "workers": {"count": 1, "device": "cpu", "lease_seconds": LEASE_SECONDS,
                        "retry_backoff_seconds": 1},
            "detector": {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
            "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 5, "lease_seconds": LEASE_SECONDS},
        },
        destinations=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )


@pytest.fixture
def nodes():
    """Every node process the test starts; killed at teardown if still running, logs printed."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.kill()
        print(f"--- node log ({len(node.lines)} lines)\n{node.output()}")


def make_modalities(folder: Path) -> list[Modality]:
    """Three modalities, each with two studies of four JPEG 2000 images (1024 x 768)."""
    # Compressed pixels make each image's decoding take a noticeable time, so that an
    # analysis lasts long enough to be interrupted.
    source = synthetic.write(synthetic.mammogram(rows=1024, columns=768), folder / "source.dcm")
    template = synthetic.compress_jpeg2000(source, folder / "template.dcm")
    studies = [clone_study(template, folder / f"study-{i}", n_images=IMAGES_PER_STUDY) for i in range(STUDIES)]
    per_modality = STUDIES // MODALITIES
    return [
        Modality(f"MODALITY{m + 1}", [f for s in studies[m * per_modality:(m + 1) * per_modality] for f in s])
        for m in range(MODALITIES)
    ]


def gsps_by_study(orthanc) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for instance_id in orthanc.client.find_by_sop_class(GSPS_SOP_CLASS):
        ds = orthanc.client.instance_dataset(instance_id)
        found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return found


def check_acknowledged_are_stored(queue: Queue, study_of: dict[str, str], acknowledged: list[str]) -> int:
    """Every acknowledged instance has its row and a file that parses with its UIDs; returns rows."""
    rows = {i.sop_instance_uid: i for study in set(study_of.values()) for i in queue.study_instances(study)}
    for uid in acknowledged:
        assert uid in rows, f"acknowledged instance {uid} has no row after the kill"
        ds = pydicom.dcmread(rows[uid].path, stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.StudyInstanceUID) == (uid, study_of[uid])
    return len(rows)


def test_kill_mid_burst_and_mid_analysis_loses_nothing_and_reports_once(tmp_path, orthanc, nodes, monkeypatch):
    system_tmp = tmp_path / "system-tmp"  # the node's TMPDIR, to see what it leaves there
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    modalities = make_modalities(tmp_path / "images")
    study_of = {uid: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                for m in modalities for path, uid in m.files}
    total = len(study_of)
    (port,) = free_ports(1)
    config = node_config(tmp_path, orthanc, port)
    database_url = load_config(config).database_url

    def start() -> NodeProcess:
        node = NodeProcess(config)
        nodes.append(node)
        return node.start()

    def acknowledged() -> list[str]:
        return [uid for m in modalities for uid in m.acknowledged]

    # 1. Burst, SIGKILL after some acknowledgements.
    node = start()
    senders = send_concurrently(modalities, port)
    wait_for(lambda: len(acknowledged()) >= KILL_AFTER_ACKNOWLEDGED, TIMEOUT_SECONDS,
             description=f"{KILL_AFTER_ACKNOWLEDGED} acknowledged C-STOREs")
    kill_node(node)
    for thread in senders:
        thread.join(TIMEOUT_SECONDS)
    acknowledged_before_kill = acknowledged()
    assert 0 < len(acknowledged_before_kill) < total, "the kill did not come mid-burst"
    queue = Queue(database_url)
    stored_at_kill = check_acknowledged_are_stored(queue, study_of, acknowledged_before_kill)
    # C-STOREs cut off by the kill leave partial spooled datasets (patient data): under
    # data_dir/tmp, for the restart to remove, never in the system temp dir.
    assert list(system_tmp.glob("*.dcm")) == []
    left_by_kill = list((tmp_path / "data" / "tmp").iterdir())

    # 2. Restart; the modalities re-send what was not acknowledged. SIGKILL mid-analysis.
    node = start()
    assert not [path for path in left_by_kill if path.exists()], "the restart left the kill's temp files"
    for thread in send_concurrently(modalities, port):
        thread.join(TIMEOUT_SECONDS)
    assert sorted(acknowledged()) == sorted(study_of), "not everything was acknowledged after the restart"
    started = wait_for(lambda: node.events("job_started"), TIMEOUT_SECONDS, description="a job_started")
    kill_node(node)
    interrupted = started[0]["job_id"]
    assert not [e for e in node.events("job_done") if e["job_id"] == interrupted], \
        "the second kill did not come mid-analysis"

    # 3. Restart; every study gets its GSPS.
    node = start()

    def all_reported() -> bool:
        stats = queue.stats()
        idle = all(stats[table][state] == 0 for table in ("jobs", "deliveries") for state in ("pending", "running"))
        return idle and len(gsps_by_study(orthanc)) == STUDIES

    wait_for(all_reported, TIMEOUT_SECONDS, description="a GSPS in Orthanc for every study")
    assert node.stop() == 0
    assert list(system_tmp.glob("*.dcm")) == list((tmp_path / "data" / "tmp").iterdir()) == []
    # Nothing left to analyse: no study has an instance that no job has covered.
    assert queue.enqueue_ready_studies(stable_seconds=0) == []

    found = gsps_by_study(orthanc)
    jobs = queue.list_jobs(limit=100)
    model = load_detector(load_config(config).detector).fingerprint
    for study_uid in set(study_of.values()):
        (gsps,) = found[study_uid]  # exactly one GSPS per study
        assert referenced_images(gsps) == {uid for uid, s in study_of.items() if s == study_uid}
        # The UID of the study's job (its stored analysis key): a re-run after the kill is the same object.
        (job,) = [job for job in jobs if job.study_uid == study_uid]
        assert gsps.SOPInstanceUID == result_uid(job.analysis_key, model, "gsps-instance")
        path = tmp_path / f"{gsps.SOPInstanceUID}.dcm"
        gsps.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
    assert Counter(job.study_uid for job in jobs) == Counter({s: 1 for s in set(study_of.values())})
    assert all(job.state == "done" and len(job.deliveries) == 1 for job in jobs)
    (rerun,) = [job for job in jobs if job.id == interrupted]
    assert rerun.attempts >= 2, "the interrupted job was not taken up again"

    stored = sum(len(queue.study_instances(s)) for s in set(study_of.values()))
    reported = sum(len(referenced_images(g)) for gs in found.values() for g in gs)
    for process in nodes:
        log = process.output()
        for value in PHI_VALUES:
            assert value not in log, f"PHI value {value!r} reached the node's log"
    print(
        f"instances: {total} in {STUDIES} studies; C-STORE requests sent {sum(m.requests for m in modalities)}; "
        f"acknowledged before the kill {len(acknowledged_before_kill)}, stored (rows) at the kill {stored_at_kill} "
        f"(and {len(left_by_kill)} temp files of cut-off C-STOREs); "
        f"re-sent after the restart {total - len(acknowledged_before_kill)}; stored at the end {stored}; "
        f"referenced by the {len(found)} GSPS {reported}; interrupted job {interrupted} "
        f"({len(node.events('job_done'))} job_done after the last restart)"
    )
    assert stored == reported == total


def test_result_uids_are_the_same_on_every_attempt():
    """A job re-run after a crash must rebuild the same GSPS (PS3.5 B.2 UUID-derived UIDs)."""
    key, model = "0123456789abcdef0123456789abcdef", "fingerprint"
    first = result_uid(key, model, "gsps-instance")
    assert first == result_uid(key, model, "gsps-instance")
    assert first.startswith("2.25.") and len(first) <= 64
    others = {result_uid(key[::-1], model, "gsps-instance"), result_uid(key, model, "gsps-series"),
              result_uid(key, model + "2", "gsps-instance")}
    assert first not in others and len(others) == 3


def test_a_study_cut_off_by_a_restart_waits_for_its_resent_rest(tmp_path):
    """Downtime is not quiet time: the first analysis covers the images re-sent after a restart."""
    queue = Queue(f"sqlite:///{tmp_path / 'queue.sqlite'}")
    queue.migrate()
    study = "1.2.826.0.1.3680043.8.498.2"
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def receive(index: int, at: datetime) -> None:
        queue.record_instance(
            sop_instance_uid=f"{study}.{index}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
            study_uid=study, series_uid=f"{study}.0", path=f"/data/{index}.dcm",
            transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MODALITY", size_bytes=1, now=at,
        )

    receive(1, t0)
    receive(2, t0)  # ... the node is killed; it listens again 100 s later
    restarted = t0 + timedelta(seconds=100)

    def enqueue(after: float) -> list[int]:
        return queue.enqueue_ready_studies(
            stable_seconds=STABLE_SECONDS, now=restarted + timedelta(seconds=after), listening_since=restarted
        )

    assert enqueue(0.5) == []  # the scheduler's first pass: 100 s since the last image, yet not quiet
    receive(3, restarted + timedelta(seconds=1))  # the sender re-sends the rest
    receive(4, restarted + timedelta(seconds=1))
    assert enqueue(STABLE_SECONDS) == []
    (job_id,) = enqueue(1 + STABLE_SECONDS)
    assert enqueue(100) == []
    job = queue.claim_next_job(worker="w", lease_seconds=60)
    assert (job.id, job.generation) == (job_id, 1)
    assert len(queue.study_instances(study)) == 4
