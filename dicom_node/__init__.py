"""dicom-node: a DICOM node that detects masses in mammograms and reports them as GSPS.

Not a medical device. The shipped demo weights find synthetic phantom masses only.
"""

__version__ = "0.1.0"
