"""Detection datasets in COCO format: loading, validation, splits, and converters.

- :mod:`dicom_node.lab.datasets.coco`: load and validate a COCO JSON file, the
  ``CocoDataset`` that yields images through the node's pixel pipeline, and
  deterministic train/val/test splits.
- :mod:`dicom_node.lab.datasets.cbis_ddsm`: convert the public CBIS-DDSM layout
  (CSV description files + DICOM folders) into that COCO format.

The phantoms of :mod:`dicom_node.lab.phantom` are written in the same format.
"""

from dicom_node.errors import ConfigError


class DatasetError(ConfigError):
    """The dataset is invalid.

    A ConfigError: a dataset is input the user names on the command line, so a bad
    one is exit status 2 with one line, like a bad config (dicom_node.cli).
    """


__all__ = ["DatasetError"]
