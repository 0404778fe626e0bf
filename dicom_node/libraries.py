"""Settings of the libraries we run, and our workarounds for them, in one place.

Every process calls ``configure_libraries()`` when it starts, before it reads a dataset:
the CLI commands that load a config (`serve`, `analyze`, `evaluate`, ...: cli._load), each
analysis worker process (dicom_node.analyse.worker.worker_main, a spawned process that
inherits none of its parent's settings), and build_ae (so that an SCP started in-process,
as tests do, has them too). It is idempotent.

The pynetdicom socket and PDU adaptations of the SCP stay with the SCP
(dicom_node.receive.server); this module holds what concerns every process, mostly what
the libraries print.
"""

from __future__ import annotations

import logging
import warnings

from dicom_node.log import RedactRecords, code_location, get_logger, redact_text

log = get_logger("dicom_node.libraries")

# Distinct warnings logged per process (see _log_warning); they are keyed by code location
# and redacted text, so a running node meets a few dozen at most.
MAX_DISTINCT_WARNINGS = 1024
_logged_warnings: set[tuple] = set()


def configure_libraries() -> None:
    """Apply every setting below; each says why it exists."""
    _pydicom_reads_without_warnings()
    _pynetdicom_logs_no_datasets()
    _chatty_loggers_at_warning()
    _received_data_loggers_redacted()
    _warnings_into_the_log()


def _pydicom_reads_without_warnings() -> None:
    """pydicom's reading validation warns about each odd value it reads, quoting it (an
    invalid "UID" may hold a patient's name). The node checks what it relies on itself
    (dicom_node.receive.structure, the handlers' UID checks), so reading stays quiet."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _pynetdicom_logs_no_datasets() -> None:
    """pynetdicom binds its own logging handlers to every association ("standard"): at
    DEBUG they dump each PDU and DIMSE message, data sets and C-FIND identifiers included.
    Its logger is held at WARNING anyway (below); without the handlers it does not even
    format those lines."""
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def _chatty_loggers_at_warning() -> None:
    """Library loggers held at WARNING whatever logging.level says: pynetdicom dumps whole
    data sets at DEBUG; highdicom narrates every module it copies at INFO (noise in an
    operator's log). What they log at WARNING and above is redacted (dicom_node.log)."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _received_data_loggers_redacted() -> None:
    """The root handler redacts every library's records (dicom_node.log); the loggers of
    the libraries that parse what peers send also redact them in place (RedactRecords),
    for any other handler too (pytest's log capture). pynetdicom quotes received values
    ("Non-conformant 'Affected SOP Instance UID' value '...'": a hostile UID may hold a
    patient's name). A logger's filters do not apply to its children's records: each one
    is filtered."""
    import pynetdicom  # noqa: F401 - its loggers exist once it is imported

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("pynetdicom", "pydicom")]
    for logger in map(logging.getLogger, names):
        if not any(isinstance(f, RedactRecords) for f in logger.filters):
            logger.addFilter(RedactRecords())


def _warnings_into_the_log() -> None:
    """Python warnings (pydicom, highdicom, torch, numpy...) become ``library_warning``
    events: category, where the warning points to, and the message cut by redact_text.

    Python prints a warning raw on stderr with its full text, and highdicom's person-name
    check quotes the name (``The string "DOE JOHN" is unlikely to represent the intended
    person name...``, for any name without a caret). Python also remembers every distinct
    warning text it has shown (``__warningregistry__``), one entry per patient name there:
    warnings not filtered otherwise are therefore passed on every time ("always", added
    after any existing filter) and _log_warning logs each distinct redacted one once.
    """
    warnings.showwarning = _log_warning
    warnings.filterwarnings("always", append=True)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    fields = {
        "category": getattr(category, "__name__", str(category)),
        "at": code_location(filename, lineno),
        "message": redact_text(message),
    }
    key = tuple(fields.values())
    if key in _logged_warnings:
        return
    if len(_logged_warnings) < MAX_DISTINCT_WARNINGS:
        _logged_warnings.add(key)
    log.warning("library_warning", **fields)
