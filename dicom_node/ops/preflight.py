"""Checks made before the node starts (`serve`) or instead of starting it (`check-config`).

Each failure is a ConfigError naming the key, printed as one line by the CLI: an
operator fixes the config or the machine, not the code.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from pathlib import Path

from dicom_node.config import Config
from dicom_node.errors import ConfigError, QueueUnavailable


def check_data_dir(data_dir: Path) -> None:
    """Create node.data_dir if needed and make sure this user can write files in it."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"node.data_dir: cannot create {data_dir} ({error.strerror or error})") from None
    try:
        # Write a file rather than ask os.access: ACLs, read-only mounts and root all count.
        with tempfile.TemporaryFile(dir=data_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"node.data_dir: {data_dir} is not writable ({error.strerror or error})") from None


def check_port_free(host: str, port: int, *, key: str) -> None:
    """ConfigError naming `key` if nothing could listen on host:port now (0: any free port)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"{key}: cannot resolve host {host!r} ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the servers do: a port whose last connections are in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"{key}: port {port} on {host} is in use by another program") from None
            raise ConfigError(f"{key}: cannot listen on {host}:{port} ({error.strerror or error})") from None


def check_ports_free(config: Config) -> None:
    """node.port on node.host, and health.port and metrics.port when their endpoint is enabled."""
    check_port_free(config.node.host, config.node.port, key="node.port")
    for key, endpoint in (("health", config.health), ("metrics", config.metrics)):
        if endpoint.enabled:
            check_port_free(endpoint.host, endpoint.port, key=f"{key}.port")


def check_queue(config: Config) -> None:
    """When queue.url names a database: it answers and is usable (no schema is changed).

    A server that does not answer is a ConfigError here, for the operator at the
    keyboard; `serve` itself exits 1 on it (not a config error: systemd's restarts wait
    for a server that is starting). The default SQLite file is checked by `serve`.
    """
    from dicom_node.queue.ops import Queue

    if config.queue.url is None:
        return
    queue = Queue(config.queue.url, busy_timeout_seconds=5)
    try:
        queue.check_database()
    except QueueUnavailable as error:
        raise ConfigError(f"queue.url: {error}") from None
    finally:
        queue.close()


def check_config(config: Config, *, source: str) -> str:
    """Everything `serve` would check before listening, cheapest first; the summary line.

    Raises ConfigError naming the first key at fault, in the order `serve` checks: the
    data directory, TLS files, who may send, the job database (queue.url, when set), the
    ports (unless a node already runs on that data_dir: then they are its own), and last
    the detector (it loads the checkpoint), unless the config is a receiver's
    (``workers.count = 0``), which never loads one.
    """
    from dicom_node.model.detector import load_detector
    from dicom_node.ops.runlock import running_node_pid
    from dicom_node.receive.access import check_access_config
    from dicom_node.tls import check_tls

    check_data_dir(config.node.data_dir)
    check_tls(config)
    check_access_config(config)
    check_queue(config)
    pid = running_node_pid(config.node.data_dir)
    if pid is None:
        check_ports_free(config)
        ports = "ports free"
    else:
        ports = f"ports not checked: a node runs on this data_dir (pid {pid or '?'})"
    if config.workers.count == 0:
        model = "receiver: workers.count = 0, no detector loaded"
    else:
        model = f"architecture {load_detector(config.detector, device='cpu').architecture}"
    return (f"{source}: OK ({model}, "
            f"{len(config.destinations)} destination(s), data_dir {config.node.data_dir}, {ports})")
