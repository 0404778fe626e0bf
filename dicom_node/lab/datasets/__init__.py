"""Detection datasets in COCO format: loading, validation, splits, and converters.

- :mod:`dicom_node.lab.datasets.coco`: load and validate a COCO JSON file, the
  ``CocoDataset`` that yields images through the node's pixel pipeline, and
  deterministic train/val/test splits.
- :mod:`dicom_node.lab.datasets.cbis_ddsm`: convert the public CBIS-DDSM layout
  (CSV description files + DICOM folders) into that COCO format.

The phantoms of :mod:`dicom_node.lab.phantom` are written in the same format.
"""

from dicom_node.errors import NodeError


class DatasetError(NodeError):
    """The dataset is invalid."""


__all__ = ["DatasetError"]
