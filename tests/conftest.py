"""Session-wide test settings shared by every test folder."""

import subprocess

import pytest

from tests import phi_guard


def pytest_configure(config):
    phi_guard.install(config)  # counts fake patient data in all output: see tests/phi_guard.py


@pytest.fixture(autouse=True, scope="session")
def _strict_dicom_values():
    # As highdicom's own suite does: refuse invalid values while building objects,
    # so a bad VR value fails the test instead of producing a bad object.
    import pydicom.config

    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.writing_validation_mode = previous


@pytest.fixture(autouse=True)
def _restore_logging_config():
    # Tests that run the CLI in-process call configure_logging (a process-wide setting,
    # e.g. an INFO filter, and the exception hooks); restore it so that later tests' log
    # captures see every event.
    import logging
    import sys
    import threading

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    yield
    structlog.configure(**saved)
    root.handlers[:], level = saved_root
    root.setLevel(level)
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks


@pytest.fixture(autouse=True)
def _tempfile_dir_untouched():
    # tempfile's folder is process-wide: the node keeps out of it (its spools are made under
    # data_dir/tmp, dicom_node.receive.spool), so a test's SCP can never leave a later one,
    # or a test peer, spooling into a folder already removed.
    import tempfile

    tempfile.gettempdir()  # sets tempfile.tempdir the first time it is called, by design
    before = tempfile.tempdir
    yield
    assert tempfile.tempdir == before, "tempfile.tempdir was changed"


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount real small filesystems to fill: ``small_filesystem(path, size="16m")`` gives a
    tests.sqlite_faults.SmallFilesystem (a tmpfs); all are unmounted at teardown. Skips
    where mounting is not permitted (not root)."""
    import os

    from tests.sqlite_faults import SmallFilesystem

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[SmallFilesystem] = []

    def mount(path, *, size: str = "16m") -> SmallFilesystem:
        filesystem = SmallFilesystem(path, size=size)
        try:
            filesystem.mount()
        except (OSError, subprocess.CalledProcessError) as error:
            pytest.skip(f"cannot mount a tmpfs here: {getattr(error, 'stderr', error)}")
        mounted.append(filesystem)
        return filesystem

    yield mount
    for filesystem in mounted:
        filesystem.unmount()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (dicom_node/bench/postgres.py), started on first use."""
    from dicom_node.bench.postgres import PostgresServer, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail("the PostgreSQL server is not installed (Debian: postgresql; scripts/test installs it)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
