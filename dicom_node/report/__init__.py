"""Report stage: turn detections into a DICOM object the PACS can show (a GSPS)."""

from dicom_node.report.gsps import build_gsps

__all__ = ["build_gsps"]
