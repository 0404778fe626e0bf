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


def test_unreadable_and_invalid_toml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
