"""The durable queue: the only module that issues SQL (SQLite in WAL mode, Alembic schema).

    queue = Queue(config.database_url)   # one per process
    queue.migrate()
"""

from dicom_node.queue.models import Delivery, Instance, Job, State
from dicom_node.queue.ops import LeaseLost, Queue

__all__ = ["Delivery", "Instance", "Job", "LeaseLost", "Queue", "State"]
