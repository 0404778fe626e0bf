"""structlog set-up: JSON lines to stderr, bound identifiers, and no PHI.

Only UIDs, job ids, AE titles and addresses are logged. As a second line of
defence, any field whose name looks like a patient identifier is dropped
before rendering (PatientName, PatientID, PatientBirthDate, AccessionNumber...).
"""

from __future__ import annotations

import logging
import sys

import structlog

PHI_KEYS = frozenset(
    key.lower()
    for key in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "OtherPatientIDs",
        "PatientAddress",
        "patient_name",
        "patient_id",
        "birth_date",
        "accession_number",
    )
)


def _drop_phi(_logger, _method, event_dict):
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        event_dict[key] = "<removed>"
    return event_dict


class _StderrLogger:
    """Writes each line to whatever sys.stderr is *now* (pytest swaps it per test)."""

    def msg(self, message: str) -> None:
        # One write per line: worker processes share the stream, and print() writes the
        # line and its newline separately, so two processes' lines could interleave.
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler):
    """A stdlib handler that, like _StderrLogger, follows sys.stderr."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _stderr_logger_factory(*_args) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the stdlib loggers (pynetdicom's) once per process."""
    numeric = getattr(logging, level.upper())
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through the stdlib. At DEBUG it dumps whole datasets
    # (patient name included), so it is held at WARNING whatever our level is.
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    # highdicom narrates every module it copies at INFO: noise in an operator's log.
    logging.getLogger("highdicom").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str | None = None, **bound):
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)
