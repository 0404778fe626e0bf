"""Deliver stage: send results to the configured DICOM destinations (C-STORE SCU, C-ECHO)."""

from dicom_node.deliver.scu import echo, send_file, send_files

__all__ = ["echo", "send_file", "send_files"]
