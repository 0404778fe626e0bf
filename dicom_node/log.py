"""structlog set-up: JSON lines to stderr, bound identifiers, and no PHI.

Our own events carry only UIDs, job ids, AE titles and addresses. As a second line of
defence, any field whose name looks like a patient identifier is dropped before rendering
(PatientName, PatientID, PatientBirthDate, AccessionNumber...).

Everything else a process prints goes through the same pipeline, so that every line on
stderr is one JSON object (with ``logging.format = "json"``) and none quotes a dataset:

- stdlib log records of other libraries (pynetdicom, alembic, ...): ``library_log``, with
  the logger's name, the source location of the call and the message cut by
  ``redact_text``; an attached traceback becomes its exception type and raise site.
- Python warnings (routed by dicom_node.libraries): ``library_warning``, the same way.
- uncaught exceptions in the main thread, in other threads, and "unraisable" ones (in
  ``__del__``, callbacks): ``uncaught_exception`` / ``unraisable_exception`` with the
  exception type and where it was raised, never its message.
- anything written straight to stdout/stderr (``capture_stray_output``, in `serve` and its
  workers): ``stray_output``, one event per line, cut by ``redact_text``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import traceback

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
OWN_LOGGER = "dicom_node"

# --------------------------------------------------------------------------- redaction

# Where a library's message may start quoting a value: a quote, a value marker (`=`, `:`,
# as in "Invalid value for VR DA: 19700101" or "PatientName=DOE^JOHN") or a line break
# (a traceback or a dump follows).
_VALUE_START = re.compile("[\r\n'\"`\u2018\u2019\u201c\u201d\u00ab\u00bb=:]")
# A word of prose: ASCII letters, capitalised at most on its first letter. A name in
# capitals (DOE, JOHN), a caret name, a date, an ID, a UID or a path is not one.
_PROSE_WORD = re.compile(r"[A-Z]?[a-z]+(?:-[a-z]+)*")
_PUNCTUATION = "()[]{},;.!?"
# Words in capitals that libraries use in static text and no patient is called.
_PROTOCOL_WORDS = frozenset((
    "A", "I", "DICOM", "DIMSE", "ACSE", "DUL", "PDU", "PDV", "UID", "SOP", "AE", "SCP", "SCU",
    "TLS", "SSL", "LUT", "VOI", "JPEG", "RLE", "CUDA", "GPU", "CPU", "IOD", "API", "OK",
    "ERROR", "WARNING", "INFO", "DEBUG", "C-STORE", "C-ECHO", "C-FIND", "C-MOVE", "C-GET",
))  # fmt: skip
CUT = "..."


def _is_prose(word: str) -> bool:
    core = word.strip(_PUNCTUATION)
    return bool(core) and (core in _PROTOCOL_WORDS or _PROSE_WORD.fullmatch(core) is not None)


def redact_text(text: object) -> str:
    """What may be logged of a message written by code other than ours.

    A library's message may quote dataset values (highdicom: ``The string "DOE JOHN" is
    unlikely to represent...``). Without knowing the values, keep only the leading prose:
    the text before the first quote, value marker (``=``, ``:``) or line break, and of that
    only the words up to the first one that is not plain prose (a word in capitals other
    than a few protocol acronyms, or with a digit, a caret or any other sign). ``" ..."``
    marks a cut. So a name in capitals (``DOE JOHN``), a caret name (``Doe^John``), a date,
    an ID or a UID never passes, quoted or not; what could pass is a name written in mixed
    case, without carets, unquoted, in the leading prose of a library's message.
    """
    text = str(text)
    head = _VALUE_START.split(text, maxsplit=1)[0]
    words = head.split()
    kept = []
    for word in words:
        if not _is_prose(word):
            break
        kept.append(word)
    cut = len(kept) < len(words) or len(head) < len(text.rstrip())
    if not cut:
        return " ".join(kept)
    return " ".join([*kept, CUT])


def code_location(filename: str | None, lineno: int | None) -> str:
    """``package/module.py:123``: a source file, relative to the sys.path entry holding it."""
    if not filename:
        return "?"
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if filename.startswith(root) and len(root) > len(best):
            best = root
    return f"{filename[len(best):] if best else os.path.basename(filename)}:{lineno}"


def raise_site(tb) -> str:
    """Where an exception was raised (the innermost frame of its traceback)."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return code_location(frames[-1].filename, frames[-1].lineno) if frames else "?"


def describe_error(error: BaseException) -> str:
    """An error safe to store and log: our own messages, else its type and raise site.

    Messages of library exceptions (pydicom, numpy, codecs, SQLAlchemy) can quote values
    they were given, patient name included, so they never reach the job table or the logs.
    """
    from dicom_node.errors import NodeError

    if isinstance(error, NodeError):
        return str(error)
    return f"{type(error).__name__} at {raise_site(error.__traceback__)}"


def _drop_phi(_logger, _method, event_dict):
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        event_dict[key] = "<removed>"
    return event_dict


def _exception_as_type_and_site(_logger, _method, event_dict):
    """``log.exception(...)``/``exc_info=``: the exception's type and raise site, no traceback.

    A traceback ends with the exception's message, and a library's can quote a dataset.
    """
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and exc_info[0] is not None:
        event_dict.setdefault("error", exc_info[0].__name__)
        event_dict.setdefault("error_at", raise_site(exc_info[2]))
    event_dict.pop("stack_info", None)
    return event_dict


# --------------------------------------------------------------------------- output streams

# Where our lines go once capture_stray_output has replaced sys.stdout/sys.stderr; until
# then (and in tests, where pytest swaps sys.stderr per test) whatever sys.stderr is now.
_direct_stream = None


def _output():
    return _direct_stream if _direct_stream is not None else sys.stderr


class _StderrLogger:
    """Writes each line to the process's stderr (see _output)."""

    def msg(self, message: str) -> None:
        # One write per line: worker processes share the stream, and print() writes the
        # line and its newline separately, so two processes' lines could interleave.
        stream = _output()
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args) -> _StderrLogger:
    return _StderrLogger()


# --------------------------------------------------------------------------- foreign records

_LEVELS = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"),
           (logging.INFO, "info"))


def _method_for(levelno: int) -> str:
    return next((name for level, name in _LEVELS if levelno >= level), "debug")


def _is_ours(record: logging.LogRecord) -> bool:
    return record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")


def redacted_fields(record: logging.LogRecord) -> dict:
    """What may be logged of another library's log record (see _LibraryRecords)."""
    done = getattr(record, "redacted_fields", None)
    if done is not None:
        return done
    fields = {
        "logger": record.name,
        "at": code_location(record.pathname, record.lineno),
        # Never record.getMessage(): with arguments, record.msg is the call's template
        # (static text), so what is kept of it is code, not data.
        "message": redact_text(record.msg),
    }
    if record.exc_info and record.exc_info[0] is not None:
        fields["error"] = record.exc_info[0].__name__
        fields["error_at"] = raise_site(record.exc_info[2])
    return fields


class RedactRecords(logging.Filter):
    """A logger filter that redacts each record in place, for every handler that sees it.

    The root handler redacts anyway; on the loggers of the libraries that handle received
    data (pynetdicom, pydicom) this also covers other handlers, such as pytest's log capture.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_ours(record):
            fields = redacted_fields(record)
            record.redacted_fields = fields
            record.msg, record.args = fields["message"], ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


class _LibraryRecords(logging.Handler):
    """The root handler: stdlib log records, as events of our pipeline.

    A record of another library becomes ``library_log`` with its logger's name, level and
    source location, its message cut by redact_text, and an attached exception as its type
    and raise site (see redacted_fields).
    """

    def emit(self, record: logging.LogRecord) -> None:
        method = getattr(structlog.get_logger(record.name), _method_for(record.levelno))
        if _is_ours(record):
            method(record.getMessage())  # ours: never carries patient data
        else:
            method("library_log", **redacted_fields(record))

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's own report ("--- Logging error ---", a traceback, then the record's
        # message and arguments, which can be dataset values) would go raw to stderr.
        with contextlib.suppress(Exception):  # nowhere left to report it
            get_logger(OWN_LOGGER).error(
                "library_log_failed", logger=record.name, at=code_location(record.pathname, record.lineno)
            )


# --------------------------------------------------------------------------- exception hooks


def _error_fields(exc_type, exc_value, tb) -> dict:
    from dicom_node.errors import NodeError

    fields = {"error": getattr(exc_type, "__name__", str(exc_type)), "at": raise_site(tb)}
    if isinstance(exc_value, NodeError):  # our own messages never carry patient data
        fields["message"] = str(exc_value)
    return fields


def _excepthook(exc_type, exc_value, tb) -> None:
    """sys.excepthook: an exception that ends the main thread (the process exits 1)."""
    get_logger(OWN_LOGGER).critical(
        "uncaught_exception", thread=threading.current_thread().name, **_error_fields(exc_type, exc_value, tb)
    )


def _thread_excepthook(args) -> None:
    """threading.excepthook: an exception that ends a thread (pynetdicom's, ours)."""
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread's sys.exit() is silent
    thread = args.thread.name if args.thread is not None else None
    get_logger(OWN_LOGGER).error(
        "uncaught_exception", thread=thread, **_error_fields(args.exc_type, args.exc_value, args.exc_traceback)
    )


def _unraisablehook(unraisable) -> None:
    """sys.unraisablehook: an exception Python cannot raise (in __del__, a GC callback).

    The default hook prints the repr of the object involved, which can be a dataset.
    """
    get_logger(OWN_LOGGER).warning(
        "unraisable_exception",
        **_error_fields(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


# --------------------------------------------------------------------------- configuration


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog, the stdlib loggers and the exception hooks of this process."""
    numeric = getattr(logging, level.upper())
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_phi,
            _exception_as_type_and_site,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    # Other libraries log through the stdlib: every record reaches the root handler, which
    # redacts it (library loggers may hold their own, lower level: the handler's level too).
    handler = _LibraryRecords(level=numeric)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook


class _StrayLines(io.TextIOBase):
    """A text stream whose every line becomes a ``stray_output`` event (redacted)."""

    MAX_LINE = 8192

    def __init__(self, name: str, fileno: int):
        super().__init__()
        self.name = name
        self._fileno = fileno
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # For code that writes to the descriptor itself (faulthandler): in a worker the
        # descriptor is redirected too (native), in the main process it is the real one.
        return self._fileno

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            if len(self._pending) > self.MAX_LINE:
                lines.append(self._pending)
                self._pending = ""
        for line in lines:
            log_stray_line(line, stream=self.name)
        return len(text)

    def flush(self) -> None:
        pass


_emitting = threading.local()


def log_stray_line(line: str, *, stream: str) -> None:
    """One line that some code wrote to stdout/stderr instead of logging it."""
    if not line.strip() or getattr(_emitting, "active", False):
        return  # empty, or written while logging (it would loop)
    _emitting.active = True
    try:
        get_logger(OWN_LOGGER).warning("stray_output", stream=stream, message=redact_text(line))
    finally:
        _emitting.active = False


class _NativeOutput:
    """File descriptors 1 and 2 of this process into a pipe read by a thread, line by line.

    C code (the openjpeg and libjpeg decoders link printf/fprintf(stderr)) writes to the
    descriptors, not to sys.stderr. The pipe's write end is non-blocking: a writer that
    holds the GIL while the pipe is full (1 MiB) loses its excess output instead of
    waiting forever for the reader thread, which needs the GIL.
    """

    PIPE_BYTES = 1 << 20

    def __init__(self):
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        read_end, write_end = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        except (ImportError, AttributeError, OSError):
            pass  # the default size (64 KiB): only more is dropped
        os.set_blocking(write_end, False)
        for fd in (1, 2):
            os.dup2(write_end, fd)
        os.close(write_end)
        self._thread = threading.Thread(target=self._read, args=(read_end,), name="native-output", daemon=True)
        self._thread.start()

    def direct_stream(self):
        """A line-buffered text stream on the process's real stderr."""
        return open(os.dup(self._saved[2]), "w", buffering=1, encoding="utf-8", errors="backslashreplace")

    def _read(self, read_end: int) -> None:
        pending = b""
        with open(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > _StrayLines.MAX_LINE:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    log_stray_line(line.decode("utf-8", "replace"), stream="native")
        if pending:
            log_stray_line(pending.decode("utf-8", "replace"), stream="native")

    def close(self, timeout: float = 5.0) -> None:
        """Give fds 1 and 2 back and log what is still in the pipe."""
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # the pipe's last write ends close: the reader sees its end
            os.close(saved)
        self._thread.join(timeout)


class StrayOutput:
    """What capture_stray_output changed; ``close()`` undoes the descriptor part."""

    def __init__(self, native: _NativeOutput | None):
        self._native = native

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
            self._native = None


_operator_stream = None  # the real stdout, once capture_stray_output has replaced sys.stdout


def capture_stray_output(*, native: bool = False) -> StrayOutput:
    """Turn whatever this process writes to stdout/stderr, other than our log lines, into events.

    sys.stdout and sys.stderr become streams whose lines are logged as ``stray_output``
    (redacted): a library's print(), socketserver's traceback of a failed request, a
    progress bar. Our own lines keep going to the real stderr. With ``native``, file
    descriptors 1 and 2 are also redirected (see _NativeOutput): for processes that run C
    decoders (the analysis workers). The `serve` main process runs none and keeps its
    descriptors, which the workers it spawns inherit as their real stdout and stderr.
    """
    global _direct_stream
    if _direct_stream is not None:
        return StrayOutput(None)  # done already: sys.stderr is ours now, not the real one
    native_output = None
    if native:
        try:
            native_output = _NativeOutput()
        except OSError as error:  # no descriptor left to dup: C output stays as it is
            get_logger(OWN_LOGGER).warning("native_output_not_captured", error=type(error).__name__)
    _direct_stream = native_output.direct_stream() if native_output else sys.stderr
    global _operator_stream
    _operator_stream = sys.stdout
    sys.stdout = _StrayLines("stdout", 1)
    sys.stderr = _StrayLines("stderr", 2)
    return StrayOutput(native_output)


def say_to_operator(line: str) -> None:
    """One human line on the real stdout (the JSON logs are on stderr): `serve`'s start line.

    Our own words, never a received value; it bypasses the stray-output capture, which
    would turn it into a redacted `stray_output` event.
    """
    stream = _operator_stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def stray_output_captured() -> bool:
    """Whether capture_stray_output runs in this process (then print() is not for our lines)."""
    return _direct_stream is not None


def get_logger(name: str | None = None, **bound):
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


def report_failure(error) -> int:
    """Print `error` as one line on stderr; return the exit status (2: configuration, 1: other).

    In `serve`, where every line on stderr is a log event (dicom_node.log), the line is the
    `command_failed` event's `error`.
    """
    from dicom_node.errors import ConfigError

    status, line = (2, f"config error: {error}") if isinstance(error, ConfigError) else (1, f"error: {error}")
    if stray_output_captured():
        get_logger("dicom_node.cli").error("command_failed", error=line, exit_status=status)
    else:
        print(line, file=sys.stderr)
    return status
