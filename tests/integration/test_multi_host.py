"""Two receivers and two workers on one shared data_dir and one PostgreSQL job table.

The scale-out deployment of README "Scaling out", on one machine: two `dicom-node serve`
receivers (workers.count = 0, each on its own port) and two `dicom-node worker` processes
share a data_dir and a real PostgreSQL server, and deliver to a real Orthanc. While
studies arrive over concurrent dcmtk associations, one worker is SIGKILLed in the middle
of a job and one receiver in the middle of a burst (the sender resends what that receiver
did not acknowledge, to the other one, as a modality would); both are restarted. Then
every study has exactly one GSPS in Orthanc, every acknowledged instance is stored and
recorded, a SIGTERMed worker finishes its job before exiting 0, and nothing a dead
process left in tmp/ remains.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pydicom
import pytest

from dicom_node.queue import Queue, State
from tests import synthetic

from .dcmtk import DcmtkResult, storescu
from .node_process import NodeProcess, write_config
from .process import wait_for
from .test_node_faults import J2K, slow_study
from .test_node_roundtrip import RELATIVE_BOX, fixed_boxes_file, gsps_for_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE_AE = "DICOM_NODE"
TIMEOUT_SECONDS = 150


def acknowledged(result: DcmtkResult) -> set[Path]:
    """The files storescu got a Success response for (it names each file it sends)."""
    acked, current = set(), None
    for line in result.output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(current)
    return acked


def owner_of(worker_id: str) -> str:
    return worker_id.split("/", 1)[0]


def pid_of_owner(owner: str) -> int:
    return int(owner.rsplit("-", 1)[1])


def test_receivers_and_workers_share_a_data_dir_through_kills_and_restarts(tmp_path, orthanc, postgres_url):
    data = tmp_path / "data"
    shared = {
        "queue": {"url": postgres_url},
        "study": {"stable_seconds": 4},
        "detector": {"architecture": "fixed_boxes", "weights": str(fixed_boxes_file(tmp_path, [RELATIVE_BOX])),
                     "score_threshold": 0.5},
        "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 5},
    }
    node = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(data), "fsync": True}
    destinations = [{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                     "port": orthanc.dicom_port}]
    receiver_config = write_config(tmp_path / "receiver.toml", {
        **shared, "node": node, "workers": {"count": 0}}, destinations)
    # A long lease: a dead worker's job must come back because its process is seen dead,
    # not because its lease ran out.
    worker_config = write_config(tmp_path / "worker.toml", {
        **shared, "node": node, "workers": {"count": 1, "device": "cpu", "lease_seconds": 600,
                                            "retry_backoff_seconds": 1}}, destinations)
    processes: list[NodeProcess] = []

    def launch(config: Path, command: str) -> NodeProcess:
        process = NodeProcess(config, command).launch()
        processes.append(process)
        return process

    queue = Queue(postgres_url)
    try:
        r1, r2 = launch(receiver_config, "serve"), launch(receiver_config, "serve")
        w1, w2 = launch(worker_config, "worker"), launch(worker_config, "worker")
        for process in (r1, r2, w1, w2):
            process.wait_ready()
        assert r1.port != r2.port
        for receiver in (r1, r2):  # a receiver loads no model: not even torch's library
            maps = Path(f"/proc/{receiver.process.pid}/maps").read_text()
            assert "libtorch" not in maps

        sent: dict[str, list[Path]] = {}  # study UID -> its files

        def study_of(files: list[Path]) -> list[Path]:
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            sent[study_uid] = files
            return files

        def running_job(study_files: list[Path]):
            study_uid = str(pydicom.dcmread(study_files[0], stop_before_pixels=True).StudyInstanceUID)
            return wait_for(
                lambda: next((j for j in queue.list_jobs(state=State.RUNNING) if j.study_uid == study_uid), None),
                TIMEOUT_SECONDS, description=f"a worker holding the job of study {study_uid}")

        # 1. A worker SIGKILLed while it holds a job (a slow study: decoding takes seconds).
        slow = study_of(slow_study(tmp_path / "slow", n_images=2))
        assert storescu(slow, r1.port, NODE_AE, extra_args=J2K).ok
        held = running_job(slow)
        victim = next(w for w in (w1, w2) if w.process.pid == pid_of_owner(owner_of(held.worker)))
        os.kill(victim.process.pid, signal.SIGKILL)  # its worker process dies with it (PDEATHSIG)
        victim.process.wait()
        assert queue.get_job(held.id).state == State.RUNNING, "the job ended before the kill: use a larger study"

        # 2. Concurrent bursts, one to each receiver; the second receiver is SIGKILLed mid-burst.
        studies = [study_of(synthetic.study(tmp_path / f"study{i}", n_images=4, rows=1024, columns=832))
                   for i in range(4)]
        to_r1, to_r2 = studies[0] + studies[1], studies[2] + studies[3]
        results: dict[str, DcmtkResult] = {}
        burst = threading.Thread(target=lambda: results.update(r1=storescu(to_r1, r1.port, NODE_AE)))
        burst.start()
        killer = threading.Thread(target=lambda: (
            wait_for(lambda: len(r2.events("instance_stored")) >= 2, TIMEOUT_SECONDS,
                     description="the second receiver storing its first instances", interval=0.01),
            r2.process.kill()))
        killer.start()
        results["r2"] = storescu(to_r2, r2.port, NODE_AE)
        killer.join()
        burst.join()
        r2.process.wait()
        assert results["r1"].ok, results["r1"].output
        acked_by_r2 = acknowledged(results["r2"])
        assert not results["r2"].ok and 1 <= len(acked_by_r2) < len(to_r2), results["r2"].output
        # The modality resends what was not acknowledged, to the receiver that answers.
        resent = [f for f in to_r2 if f not in acked_by_r2]
        assert storescu(resent, r1.port, NODE_AE).ok

        # 3. Both restarted: the new worker's start ends the dead worker's lease at once
        w3, r3 = launch(worker_config, "worker"), launch(receiver_config, "serve")
        w3.wait_ready()
        r3.wait_ready()
        # (or a receiver's periodic look for dead processes came first)
        reclaimed = [owner for p in processes for e in p.events("dead_process_leases_expired") for owner in e["owners"]]
        assert owner_of(held.worker) in reclaimed

        # 4. A worker SIGTERMed while it holds a job finishes that job, then exits 0.
        last = study_of(slow_study(tmp_path / "last", n_images=2))
        assert storescu(last, r3.port, NODE_AE, extra_args=J2K).ok
        in_hand = running_job(last)
        stopping = next(w for w in (w1, w2, w3) if w.process.poll() is None
                        and w.process.pid == pid_of_owner(owner_of(in_hand.worker)))
        stopping.process.send_signal(signal.SIGTERM)
        assert stopping.process.wait(TIMEOUT_SECONDS) == 0, stopping.output()
        names = [e["event"] for e in stopping.events()]
        assert "job_done" in names[names.index("signal_received"):], stopping.output()
        finished = queue.get_job(in_hand.id)
        assert (finished.state, finished.attempts, finished.worker) == (State.DONE, 1, in_hand.worker)

        # Exactly one GSPS per study in Orthanc, every delivery recorded once.
        def all_delivered():
            jobs = queue.list_jobs(limit=100)
            done = jobs and all(j.state == State.DONE and j.deliveries and
                                all(d.state == State.DONE for d in j.deliveries) for j in jobs)
            return done and {j.study_uid for j in jobs} == set(sent) and jobs

        jobs = wait_for(all_delivered, TIMEOUT_SECONDS, description="every study analysed and delivered")
        assert sorted(j.study_uid for j in jobs) == sorted(sent)  # one job per study
        for study_uid, files in sent.items():
            (gsps,) = gsps_for_study(orthanc, study_uid)
            referenced = {str(image.ReferencedSOPInstanceUID) for series in gsps.ReferencedSeriesSequence
                          for image in series.ReferencedImageSequence}
            instances = {i.sop_instance_uid: i for i in queue.study_instances(study_uid)}
            # Every acknowledged instance: recorded, its file in data_dir, in the one GSPS.
            for path in files:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uid = str(ds.SOPInstanceUID)
                stored = data / "instances" / study_uid / str(ds.SeriesInstanceUID) / f"{uid}.dcm"
                assert uid in instances and stored.is_file() and Path(instances[uid].path) == stored
                assert uid in referenced
        assert queue.get_job(held.id).attempts == 2  # the killed attempt counted, once
    finally:
        queue.close()
        statuses = {}
        for process in processes:
            if process.process.poll() is None:
                statuses[process.command + str(process.process.pid)] = process.stop()
            print(process.output())  # shown by pytest when the test failed
    assert set(statuses.values()) == {0}, statuses
    # What the killed receiver and worker left in tmp/ was swept; the others removed theirs.
    assert list((data / "tmp").iterdir()) == []
