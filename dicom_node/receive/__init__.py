"""Receive stage: the Storage SCP.

- server.py: the AE, its sockets, pynetdicom adapted to a hostile network;
- access.py: who may associate;
- handlers.py: C-STORE: validate, store, record, answer a named status;
- structure.py: the data set's structure, checked without decoding pixels.
"""

from dicom_node.receive.server import start_scp

__all__ = ["start_scp"]
