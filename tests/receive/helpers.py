"""Senders for the SCP tests: dcmtk command-line tools and a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association

from tests import synthetic

NODE_AE = "DICOM_NODE"
SENDER_AE = "TEST_SCU"
TOOL_TIMEOUT_SECONDS = 60

# Every transfer syntax the SCP must accept, by the name synthetic.transcode knows
# (or jpeg2000-*, made with pydicom's encoder).
SYNTAXES = {
    "implicit-little": ImplicitVRLittleEndian,
    "explicit-little": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless-sv1": JPEGLosslessSV1,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg-ls-near-lossless": JPEGLSNearLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpeg2000": JPEG2000,
    "rle": RLELossless,
}
def make_encoded(folder: Path, syntax: str, **mammogram_kwargs) -> Path:
    """A synthetic mammogram written in ``syntax`` (real encoders: dcmtk or OpenJPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    if syntax == "jpeg-baseline":
        mammogram_kwargs.setdefault("bits_stored", 8)  # JPEG Baseline is 8-bit only
    source = synthetic.write(synthetic.mammogram(**mammogram_kwargs), folder / f"{syntax}.src.dcm")
    target = folder / f"{syntax}.dcm"
    if syntax.startswith("jpeg2000"):
        return synthetic.compress_jpeg2000(source, target, lossless=syntax == "jpeg2000-lossless")
    return synthetic.transcode(source, target, syntax)


def storescu(
    port: int,
    *files: Path,
    calling: str = SENDER_AE,
    called: str = NODE_AE,
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """dcmtk storescu; each file is offered in its own transfer syntax (plus uncompressed)."""
    command = [
        "storescu", "-v", "-aet", calling, "-aec", called, *options,
        "127.0.0.1", str(port), *map(str, files),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)


def echoscu(port: int, *, calling: str = SENDER_AE, called: str = NODE_AE):
    command = ["echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)


@contextlib.contextmanager
def association(
    port: int,
    contexts: list[tuple[str, list[str]]],
    *,
    calling: str = SENDER_AE,
    called: str = NODE_AE,
) -> Iterator[Association]:
    """A pynetdicom association (may be rejected: check ``is_established``); released on exit."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def reject_reason(assoc: Association) -> tuple[int, int, int]:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ a rejected association got."""
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def stored_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "instances").rglob("*.dcm"))


def temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").iterdir())
