"""What a process prints: one JSON object per line, and nothing of a patient (dicom_node.log).

Redaction cannot know the patient's values, so it is checked against every shape a value
can take in a library's message (quoted, after a value marker, unquoted, in a traceback)
and every form of the value (with carets, with spaces, a date, an ID). The exception hooks
and the capture of stray output are checked in real child processes, where they are the
process's own.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicom_node.log import configure_logging, redact_text
from tests import synthetic

REPO = Path(__file__).resolve().parents[1]

_PATIENT = synthetic.fake_patient(seed=8)
PHI = (
    "DOE JOHN", "DOE^JOHN", "Doe^John", "DOE^JOHN^QUINCY^DR^JR", "O'BRIEN^SEÁN", "MÜLLER^JÖRG",
    "19700101", "1970-01-01", synthetic.FAKE_PATIENT_NAME, synthetic.FAKE_PATIENT_ID,
    synthetic.FAKE_ACCESSION, _PATIENT.name, _PATIENT.name_without_carets,
    _PATIENT.name_with_odd_characters, _PATIENT.patient_id, _PATIENT.accession, _PATIENT.birth_date,
)  # fmt: skip
# Shapes seen in pydicom, highdicom, pynetdicom and C decoders, and worse ones.
TEMPLATES = (
    'The string "{v}" is unlikely to represent the intended person name',
    "Invalid value for VR PN: '{v}'",
    "Invalid value for VR DA: {v}",
    "PatientName={v}",
    "Non-conformant 'Affected SOP Instance UID' value '1.2.{v}'",
    "value `{v}` and “{v}” and «{v}» and ‘{v}’",
    "{v}",
    "{v} is not a valid person name",
    "Unable to decode {v} born 19700101",
    "cannot read the file of patient {v}",
    "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nValueError: {v}",
    "[ERROR] {v}",
)


def components(value: str) -> list[str]:
    """The value and each of its parts, as a search would find them (case-insensitive words).

    One- and two-digit parts (the "01" of 1970-01-01) identify nobody and occur in every
    timestamp ("15:07:01"): searching for them made these tests fail at such seconds.
    """
    parts = re.split(r"[\^\s'\"=\-]+", value)
    return [value, value.replace("^", " "),
            *(p for p in parts if len(p) > 1 and not (p.isdigit() and len(p) <= 2))]


def leaked(text: str, value: str) -> list[str]:
    return [c for c in components(value) if re.search(rf"(?<![A-Za-z0-9]){re.escape(c)}(?![A-Za-z0-9])", text, re.IGNORECASE)]


@pytest.mark.parametrize("template", TEMPLATES)
def test_redaction_keeps_nothing_of_a_patient_value_in_any_shape(template):
    for value in PHI:
        message = template.format(v=value)
        redacted = redact_text(message)
        assert leaked(redacted, value) == [], f"{message!r} -> {redacted!r}"


def test_redaction_keeps_the_leading_prose_and_marks_the_cut():
    assert redact_text('The string "DOE JOHN" is unlikely') == "The string ..."
    assert redact_text("Invalid value for VR DA: 19700101") == "Invalid value for ..."
    assert redact_text("DOE JOHN is not a valid name") == "..."
    # Static text of libraries passes whole.
    for text in ("Association Aborted", "DIMSE timeout reached while waiting for message response",
                 "Received an invalid C-FIND response from the peer", "Network timeout reached"):
        assert redact_text(text) == text
    assert redact_text("") == ""


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    events = []
    for line in lines:
        event = json.loads(line)  # raises on a line that is not JSON
        assert isinstance(event, dict), line
        events.append(event)
    return events


def assert_no_phi(text: str) -> None:
    for value in PHI:
        assert leaked(text, value) == [], f"{value!r} in {text!r}"


def test_foreign_log_records_are_json_events_without_values(capsys):
    configure_logging("debug", "json")
    library = logging.getLogger("somelibrary.reader")
    library.warning("Invalid value for VR PN: '%s' in %s", "DOE^JOHN", "19700101")
    library.error(f"Unable to decode DOE JOHN born {synthetic.FAKE_BIRTH_DATE}")
    try:
        raise ValueError(f"bad name DOE^JOHN {synthetic.FAKE_PATIENT_ID}")
    except ValueError:
        library.exception("Reading failed for %s", "DOE^JOHN")
    library.error("two placeholders, one argument: %s %s", "DOE JOHN")  # a library's bug
    logging.getLogger("dicom_node.ours").info("ours as it is")

    err = capsys.readouterr().err
    assert_no_phi(err)
    assert "Traceback" not in err and "Logging error" not in err
    events = json_lines(err)
    assert [e["event"] for e in events] == ["library_log"] * 4 + ["ours as it is"]
    first, _, failed, bug, _ = events
    assert first["logger"] == "somelibrary.reader" and first["level"] == "warning"
    assert first["message"] == "Invalid value for ..."
    assert re.fullmatch(r"test_log\.py:\d+", first["at"]), first["at"]
    assert failed["error"] == "ValueError" and failed["message"] == "Reading failed for ..."
    assert re.fullmatch(r"test_log\.py:\d+", failed["error_at"])
    assert bug["message"] == "two placeholders, one argument ..."


def run_python(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` as a script in a fresh interpreter with this checkout first on the path."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_an_uncaught_exception_in_the_main_thread_is_one_json_line_without_its_message(tmp_path):
    result = run_python(tmp_path, """
        from dicom_node.log import configure_logging
        configure_logging()
        raise ValueError("cannot read DOE^JOHN born 19700101")
    """)
    assert result.returncode == 1
    (event,) = json_lines(result.stderr)
    assert event["event"] == "uncaught_exception" and event["error"] == "ValueError"
    assert event["at"] == "child.py:4" and event["thread"] == "MainThread"
    assert_no_phi(result.stderr + result.stdout)


def test_an_uncaught_exception_in_a_thread_is_one_json_line_without_its_message(tmp_path):
    result = run_python(tmp_path, """
        import threading
        from dicom_node.log import configure_logging
        configure_logging()
        def read():
            raise KeyError("DOE JOHN")
        thread = threading.Thread(target=read, name="reader")
        thread.start()
        thread.join()
    """)
    assert result.returncode == 0
    (event,) = json_lines(result.stderr)
    assert (event["event"], event["thread"], event["error"], event["at"]) == (
        "uncaught_exception", "reader", "KeyError", "child.py:6")
    assert_no_phi(result.stderr + result.stdout)


def test_an_unraisable_exception_is_one_json_line_without_the_object(tmp_path):
    result = run_python(tmp_path, """
        from dicom_node.log import configure_logging
        configure_logging()
        class Holder:
            def __repr__(self):
                return "Holder(DOE^JOHN)"
            def __del__(self):
                raise RuntimeError("DOE^JOHN")
        Holder()
    """)
    (event,) = json_lines(result.stderr)
    assert (event["event"], event["error"], event["at"]) == ("unraisable_exception", "RuntimeError", "child.py:8")
    assert_no_phi(result.stderr + result.stdout)


def test_stray_output_from_python_and_from_c_becomes_redacted_json_events(tmp_path):
    """print(), sys.stderr and C's stdio on descriptor 2 (as openjpeg's and libjpeg's
    fprintf(stderr) do): each line becomes a stray_output event, cut by redact_text."""
    result = run_python(tmp_path, """
        import ctypes, os, sys
        from dicom_node.log import capture_stray_output, configure_logging, get_logger
        configure_logging()
        stray = capture_stray_output(native=True)
        print("patient DOE^JOHN")
        sys.stderr.write("Unable to decode DOE JOHN\\nsecond line 19700101\\n")
        os.write(1, b"[WARNING] raw descriptor write: DOE JOHN\\n")
        libc = ctypes.CDLL(None)
        c_stderr = ctypes.c_void_p.in_dll(libc, "stderr")
        libc.fprintf(c_stderr, b"Corrupt JPEG data: %s\\n", b"DOE^JOHN")
        get_logger("dicom_node.test").info("ours", study_uid="1.2.3")
        stray.close()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    events = json_lines(result.stderr)
    assert_no_phi(result.stderr)
    stray = sorted((e["stream"], e["message"]) for e in events if e["event"] == "stray_output")
    assert stray == [
        ("native", "Corrupt JPEG data ..."),
        ("native", "[WARNING] raw descriptor write ..."),
        ("stderr", "Unable to decode ..."),
        ("stderr", "second line ..."),
        ("stdout", "patient ..."),
    ]
    assert any(e["event"] == "ours" and e["study_uid"] == "1.2.3" for e in events)  # ours untouched


def test_our_own_exception_logging_keeps_the_type_and_site_not_the_traceback(capsys):
    from dicom_node.log import get_logger

    configure_logging("info", "json")
    try:
        raise ValueError(f"cannot decode {synthetic.FAKE_PATIENT_NAME}")
    except ValueError:
        get_logger("dicom_node.test").exception("decode_failed", study_uid="1.2.3")
    err = capsys.readouterr().err
    (event,) = json_lines(err)
    assert (event["event"], event["error"], event["study_uid"]) == ("decode_failed", "ValueError", "1.2.3")
    assert re.fullmatch(r"test_log\.py:\d+", event["error_at"])
    assert "Traceback" not in err
    assert_no_phi(err)
