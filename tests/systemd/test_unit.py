"""systemd/dicom-node.service: valid for systemd, hardened, and consistent with the node.

`systemd-analyze verify` and `systemd-analyze security --offline=yes` work without a
running systemd (in a container, in CI). The override snippets in systemd/README.md
are checked the same way, applied on top of the unit as drop-ins would be.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from dicom_node import node
from dicom_node.analyse import pool
from dicom_node.cli import build_parser, cmd_serve, cmd_worker
from dicom_node.log import report_failure
from dicom_node.config import NodeConfig, WorkersConfig, load_config, parse_config
from dicom_node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "dicom-node.service"
WORKER_UNIT = ROOT / "systemd" / "dicom-node-worker.service"
README = ROOT / "systemd" / "README.md"
MAX_EXPOSURE = 1.5
# All README overrides at once: GPU devices (0.1) and a capability for port 104 (0.1) on top.
MAX_EXPOSURE_ALL_OVERRIDES = 1.6
DROP_IN_PREFIX = "# /etc/systemd/system/dicom-node.service.d/"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Unit file sections as ordered (key, value) lists; keys may repeat, as in systemd."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None and "=" in line:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"not a unit file line: {raw!r}")
    return sections


def setting(section: list[tuple[str, str]], key: str) -> str | None:
    """The effective value of a single-valued key: the last assignment wins."""
    values = [value for name, value in section if name == key]
    return values[-1] if values else None


def seconds(value: str) -> float:
    """A systemd time span such as "60", "90s", "2min", "1min 30s" in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> list[tuple[str, str]]:
    return parse_unit(UNIT.read_text())["Service"]


@pytest.fixture(scope="module")
def unit_section() -> list[tuple[str, str]]:
    return parse_unit(UNIT.read_text())["Unit"]


def size_bytes(value: str) -> int:
    """A systemd size such as "4G", "512M" or "1073741824" in bytes (base 1024)."""
    number, suffix = re.fullmatch(r"(\d+)([KMGT]?)", value).groups()
    return int(number) * 1024 ** " KMGT".index(suffix or " ")


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_drop_ins() -> dict[str, str]:
    """The drop-in examples of README.md, by file name (first line names the file)."""
    blocks = [b for b in readme_blocks("ini") if b.startswith(DROP_IN_PREFIX)]
    return {block.splitlines()[0].removeprefix(DROP_IN_PREFIX): block for block in blocks}


def test_unit_is_a_notify_service_with_watchdog_restart_and_a_graceful_stop(service):
    assert setting(service, "Type") == "notify"
    # Only the main process may report readiness; worker processes cannot fake it.
    assert setting(service, "NotifyAccess") == "main"
    assert seconds(setting(service, "WatchdogSec")) == 60
    assert setting(service, "Restart") == "on-failure"
    assert seconds(setting(service, "RestartSec")) == 5
    assert setting(service, "KillSignal") == "SIGTERM"
    assert setting(service, "User") == setting(service, "Group") == "dicom-node"


def test_a_config_error_is_not_restarted_and_repeated_failures_end_the_restarts(service, unit_section):
    # The CLI's exit status for a config error (a corrupt database, a bad key) is the one
    # systemd does not restart on: the node would fail the same way forever.
    assert setting(service, "RestartPreventExitStatus") == str(report_failure(ConfigError("x"))) == "2"
    # Start limits belong in [Unit] (systemd 230 moved them there from [Service]).
    interval = seconds(setting(unit_section, "StartLimitIntervalSec"))
    burst = int(setting(unit_section, "StartLimitBurst"))
    assert setting(service, "StartLimitIntervalSec") is None and setting(service, "StartLimitBurst") is None
    # The limit can be reached: `burst` restarts RestartSec apart fit in the interval.
    assert 1 < burst and burst * seconds(setting(service, "RestartSec")) < interval <= 3600


def test_memory_tasks_and_core_dumps_are_limited(service):
    # One CPU worker with the demo model peaked at 1.2 GiB (PSS, systemd/README.md section 7).
    assert size_bytes(setting(service, "MemoryMax")) >= 2 * int(1.2 * 1024**3)
    # About 16 + 2 per association + per worker 8 + 2 per core (README): the defaults on 64 cores.
    cores = 64
    needed = 16 + 2 * NodeConfig().max_associations + WorkersConfig().count * (8 + 2 * cores)
    assert int(setting(service, "TasksMax")) >= 2 * needed
    # A core dump would hold the images in memory: patient data.
    assert setting(service, "LimitCORE") == "0"


def test_readme_documents_the_limits_and_the_database_recovery():
    text = README.read_text()
    for key in ("MemoryMax=", "TasksMax=", "LimitCORE=0", "RestartPreventExitStatus=2", "StartLimitBurst=5",
                "systemctl reset-failed dicom-node", "mv /var/lib/dicom-node/dicom-node.sqlite*"):
        assert key in text, key
    limits = readme_drop_ins()["limits.conf"]
    assert "MemoryMax=" in limits and "TasksMax=" in limits


def test_exec_start_runs_serve_with_the_system_config(service):
    program, *arguments = shlex.split(setting(service, "ExecStart"))
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    console_scripts = setup["options.entry_points"]["console_scripts"]
    assert Path(program).name in re.findall(r"^\s*([\w-]+)\s*=", console_scripts, flags=re.M)
    assert program.startswith("/opt/dicom-node/.venv/bin/")

    args = build_parser().parse_args(arguments)

    assert args.func is cmd_serve
    assert args.config == "/etc/dicom-node/dicom-node.toml"


def test_start_and_stop_timeouts_cover_the_node_own_timeouts(service):
    # systemd must not kill a node that is still loading its model before the node
    # itself gives up with an error that names the cause.
    assert seconds(setting(service, "TimeoutStartSec")) >= pool.WORKER_START_TIMEOUT_SECONDS
    # On SIGTERM in-flight associations get SHUTDOWN_GRACE_SECONDS before the rest of
    # the shutdown; the stop timeout has to leave room for that.
    assert seconds(setting(service, "TimeoutStopSec")) > pool.SHUTDOWN_GRACE_SECONDS + node.SHUTDOWN_GRACE_SECONDS


def test_default_port_needs_no_capability(service):
    assert setting(service, "CapabilityBoundingSet") == ""
    assert setting(service, "AmbientCapabilities") in (None, "")
    # Without CAP_NET_BIND_SERVICE only ports >= 1024 can be bound (104 cannot).
    assert NodeConfig().port >= 1024
    assert load_config(ROOT / "config" / "dicom-node.toml").node.port >= 1024


def test_readme_example_config_is_valid_and_writes_to_the_state_directory(service):
    (example,) = readme_blocks("toml")

    config = parse_config(tomllib.loads(example), base_dir=Path("/etc/dicom-node"))

    # ProtectSystem=strict: the state directory is the only writable path.
    assert setting(service, "ProtectSystem") == "strict"
    assert config.node.data_dir == Path("/var/lib") / setting(service, "StateDirectory")
    assert setting(service, "WorkingDirectory") == str(config.node.data_dir)


def test_readme_documents_the_gpu_port_104_and_ip_overrides():
    drop_ins = readme_drop_ins()
    assert {"gpu.conf", "port-104.conf", "ip-allow.conf", "data-dir.conf"} <= drop_ins.keys()
    assert "PrivateDevices=no" in drop_ins["gpu.conf"]
    assert "CAP_NET_BIND_SERVICE" in drop_ins["port-104.conf"]


# --- systemd-analyze ------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return path


def unit_with(drop_in: str, folder: Path, unit: Path = UNIT) -> Path:
    """The unit plus a drop-in, as systemd would merge them, with ExecStart made runnable.

    verify checks that ExecStart's program exists and is executable; a stub at a path
    under `folder` stands in for the virtual environment that is not installed here.
    """
    stub = folder / "bin" / "dicom-node"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = unit.read_text().replace("/opt/dicom-node/.venv/bin/dicom-node", str(stub))
    assert str(stub) in text
    path = folder / unit.name
    path.write_text(text + "\n" + drop_in)
    return path


def exposure(systemd_analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def drop_in_cases(*, with_bounds: bool = False) -> list:
    drop_ins = readme_drop_ins()
    cases = [
        ("", "unit", MAX_EXPOSURE),
        *[(text, name, MAX_EXPOSURE) for name, text in drop_ins.items()],
        ("\n".join(drop_ins.values()), "all-overrides", MAX_EXPOSURE_ALL_OVERRIDES),
    ]
    return [pytest.param(*((text, bound) if with_bounds else (text,)), id=name) for text, name, bound in cases]


@pytest.mark.parametrize("drop_in", drop_in_cases())
def test_systemd_analyze_verify_accepts_unit_and_overrides(systemd_analyze, tmp_path, drop_in):
    unit = unit_with(drop_in, tmp_path)

    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )

    # Unknown keys and unparsable values are only warnings (exit status 0): any output fails.
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@pytest.mark.parametrize(("drop_in", "bound"), drop_in_cases(with_bounds=True))
def test_security_exposure_is_at_most_one_and_a_half(systemd_analyze, tmp_path, drop_in, bound):
    assert exposure(systemd_analyze, unit_with(drop_in, tmp_path)) <= bound


def test_exposure_check_can_fail(systemd_analyze, tmp_path):
    # The same unit without its hardening scores badly: the check above measures something.
    plain = "\n".join(
        line for line in UNIT.read_text().splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    )  # fmt: skip
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "dicom-node.service").write_text(plain)

    assert exposure(systemd_analyze, stripped / "dicom-node.service") > MAX_EXPOSURE


# --- systemd/README.md is copy-pasteable and says what the unit does -----------------------


def test_readme_states_the_units_stop_timeout(service):
    stop = seconds(setting(service, "TimeoutStopSec"))
    text = " ".join(README.read_text().split())
    stated = re.findall(r"up to (\d+) s to finish", text) + re.findall(r"After (\d+) s .{0,80}?is killed", text)
    assert len(stated) >= 2, "README.md no longer says how long a stop may take"
    assert {float(s) for s in stated} == {stop}, f"README.md says {stated} s, the unit TimeoutStopSec={stop:g}"


def test_readme_install_steps_have_no_placeholder_url_and_name_the_python_version():
    commands = "\n".join(readme_blocks("sh"))
    assert "git clone" not in commands and "URL>" not in commands
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    minimum = setup["options"]["python_requires"].removeprefix(">=")
    assert f"**Python {minimum}** or newer" in README.read_text()


def test_worker_unit_runs_the_worker_role_with_the_units_hardening_and_limits():
    node, worker = parse_unit(UNIT.read_text()), parse_unit(WORKER_UNIT.read_text())
    exec_start = shlex.split(setting(worker["Service"], "ExecStart"))
    assert exec_start[1:] == ["worker", "--config", "/etc/dicom-node/dicom-node.toml"]
    assert build_parser().parse_args(exec_start[1:]).func is cmd_worker
    # Everything but the command and the description is the node's: hardening, limits, stop.
    differing = {"ExecStart", "Description"}
    for section in ("Unit", "Service", "Install"):
        assert [kv for kv in worker[section] if kv[0] not in differing] == \
            [kv for kv in node[section] if kv[0] not in differing], section


def test_systemd_analyze_accepts_the_worker_unit_and_its_exposure_is_the_units(systemd_analyze, tmp_path):
    unit = unit_with("", tmp_path, WORKER_UNIT)
    result = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""
    assert exposure(systemd_analyze, unit) <= MAX_EXPOSURE
