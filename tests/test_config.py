"""The config contract: documented default loads, unknown keys and bad values name the key."""

from pathlib import Path

import pytest

from dicom_node.config import DEMO_WEIGHTS, load_config, parse_config
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_documented_default_config_loads():
    config = load_config(REPO / "config" / "dicom-node.toml")
    assert config.node.ae_title == "DICOM_NODE"
    assert config.detector.weights == DEMO_WEIGHTS
    # Relative paths resolve against the config file's folder, not the working directory.
    assert config.node.data_dir == (REPO / "var").resolve()
    assert [d.name for d in config.destinations] == ["pacs"]


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[node]\nae_titel = 'X'\n", "node.ae_titel: unknown key"),
        ("[nodes]\nae_title = 'X'\n", "nodes: unknown key"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nae_title = 'THIS_IS_FAR_TOO_LONG'\n", "node.ae_title"),
        ("[workers]\ndevice = 'gpu'\n", "workers.device"),
        ("[detector]\narchitecture = 'yolo'\n", "detector.architecture"),
        ("[detector]\nscore_threshold = 1.5\n", "detector.score_threshold"),
        ("[report]\ncontent_label = 'lower case'\n", "report.content_label"),
        ("[[destinations]]\nname = 'a'\nae_title = 'A'\nhost = 'h'\nport = 0\n", "destinations[0].port"),
        ("[security]\nallowed_callers = [{ ae_title = 'A', port = 1 }]\n", "security.allowed_callers[0].port"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert key in str(error.value)
    assert str(path) in str(error.value)


def test_duplicate_destination_names_are_rejected():
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigError, match="destinations: .*repeated: \\['pacs'\\]"):
        parse_config({"destinations": [destination, destination]}, base_dir=Path("."))


@pytest.mark.parametrize("outputs, message", [
    ([], r"destinations\[0\]\.outputs: .*at least 1"),
    (["gsps", "gsps"], r"destinations\[0\]\.outputs: .*twice"),
    (["gsps", "pdf"], r"destinations\[0\]\.outputs\[1\]: .*'gsps', 'sr' or 'sc'"),
])
def test_destination_outputs_are_checked(outputs, message):
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "outputs": outputs}
    with pytest.raises(ConfigError, match=message):
        parse_config({"destinations": [destination]}, base_dir=Path("."))


def test_a_destination_takes_the_gsps_unless_told_otherwise():
    destinations = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                    {"name": "ohif", "ae_title": "OHIF", "host": "127.0.0.1", "port": 4242, "outputs": ["sr"]},
                    {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": 104,
                     "outputs": ["gsps", "sr", "sc"]}]
    config = parse_config({"destinations": destinations}, base_dir=Path("."))
    assert config.outputs_by_destination == {"pacs": ["gsps"], "ohif": ["sr"], "plain": ["gsps", "sr", "sc"]}


def test_unreadable_and_invalid_toml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[retention]\nkeep_delivered_for = '30x'\n", "retention.keep_delivered_for: Value error, '30x' is not a duration"),
        ("[retention]\nkeep_delivered_for = 30\n", "retention.keep_delivered_for: Value error, 30 is not a duration"),
        ("[retention]\ncheck_interval = '0s'\n", "retention.check_interval: Value error, must be at least 1s"),
        ("[retention]\nmin_free_megabytes = -1\n", "retention.min_free_megabytes"),
        ("[retention]\nkeep_for = '7d'\n", "retention.keep_for: unknown key"),
        ("[node]\nmin_free_megabytes = 4096\n[retention]\nmin_free_megabytes = 2048\n",
         "retention.min_free_megabytes: 2048 is below node.min_free_megabytes (4096)"),
    ],
)
def test_bad_retention_values_are_rejected_naming_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: {message}" in str(error.value)


def test_retention_defaults_and_the_derived_free_space_level():
    from datetime import timedelta

    documented = load_config(REPO / "config" / "dicom-node.toml").retention
    default = parse_config({}, base_dir=Path(".")).retention
    assert documented == default
    assert (default.enabled, default.keep_delivered_for, default.check_interval) == (
        True, timedelta(days=7), timedelta(minutes=1))
    node = parse_config({}, base_dir=Path(".")).node
    assert default.min_free_bytes(node) == 2 * 1024 * 1024 * 1024  # twice node.min_free_megabytes
    raised = parse_config({"node": {"min_free_megabytes": 5000}}, base_dir=Path("."))
    assert raised.retention.min_free_bytes(raised.node) == 10000 * 1024 * 1024
    equal = parse_config({"node": {"min_free_megabytes": 5000}, "retention": {"min_free_megabytes": 5000}},
                         base_dir=Path("."))
    assert equal.retention.min_free_bytes(equal.node) == 5000 * 1024 * 1024


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("30m", 1800), ("48h", 172800), ("7d", 604800), ("0s", 0), ("1.5h", 5400), (" 2d ", 172800)],
)
def test_durations(text, seconds):
    from dicom_node.config import parse_duration

    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7 d", "-1d", "7w", "1e3s", "7D", "1.d", "9999999999d", "7d7h"])
def test_not_durations(text):
    from dicom_node.config import parse_duration

    with pytest.raises(ValueError, match="is not a duration: a number and a unit s, m, h or d"):
        parse_duration(text)


def test_durations_longer_than_100_years_are_refused():
    from dicom_node.config import parse_duration

    assert parse_duration("36500d").days == 36500
    with pytest.raises(ValueError, match="'36501d' is longer than 36500d"):
        parse_duration("36501d")


@pytest.mark.parametrize("url, message", [
    ("nonsense", "queue.url: Value error, not a database URL"),
    ("mysql://node:s3cret@db/queue", "queue.url: Value error, mysql://node:***@db/queue: the job table runs on"),
    ("postgresql+psycopg2://node:s3cret@db/queue", "queue.url: Value error, postgresql+psycopg2://node:***@db/queue: "
                                                   "use the psycopg 3 driver"),
    ("sqlite://", "queue.url: Value error, sqlite://: the job table runs on a SQLite file"),
])
def test_bad_queue_urls_are_rejected_naming_the_key_without_the_password(url, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"queue": {"url": url}}, base_dir=Path("."))
    assert message in str(error.value) and "s3cret" not in str(error.value)


def test_queue_url_defaults_to_the_sqlite_file_in_data_dir_and_takes_postgresql():
    base = Path("/etc/dicom-node")
    assert parse_config({}, base_dir=base).database_url == "sqlite:////etc/dicom-node/var/dicom-node.sqlite"
    assert parse_config({"queue": {"url": "sqlite:///q/jobs.sqlite"}}, base_dir=base).database_url == (
        "sqlite:////etc/dicom-node/q/jobs.sqlite")  # relative, like every path: to the config's folder
    postgresql = parse_config({"queue": {"url": "postgresql://node@db.example/dicom"}}, base_dir=base)
    assert postgresql.database_url == "postgresql+psycopg://node@db.example/dicom"  # the driver we ship


def test_a_receiver_without_workers_needs_a_shared_job_table():
    with pytest.raises(ConfigError, match="workers.count: 0 \\(a receiver only\\) needs a PostgreSQL queue.url"):
        parse_config({"workers": {"count": 0}}, base_dir=Path("."))
    receiver = parse_config({"workers": {"count": 0}, "queue": {"url": "postgresql://dn@db/dn"}}, base_dir=Path("."))
    assert (receiver.workers.count, receiver.shared_queue) == (0, True)
    assert not parse_config({}, base_dir=Path(".")).shared_queue


def test_reuse_port_is_refused_where_the_platform_has_no_so_reuseport(monkeypatch):
    import socket

    assert parse_config({"node": {"reuse_port": True}}, base_dir=Path(".")).node.reuse_port
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    with pytest.raises(ConfigError, match="node.reuse_port: .*no SO_REUSEPORT"):
        parse_config({"node": {"reuse_port": True}}, base_dir=Path("."))
    assert not parse_config({}, base_dir=Path(".")).node.reuse_port
