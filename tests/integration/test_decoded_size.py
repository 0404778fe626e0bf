"""A worker refuses to decode an image larger than the cap it declares, before decoding.

A few kilobytes of JPEG-LS can declare more pixels than any mammogram has; the worker
reads Rows x Columns x frames x Bits Allocated first and leaves such an image out of the
analysis (the GSPS says "not analysed" for it), instead of decoding it into memory.
node.max_dataset_megabytes is the cap, as for received data sets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom.uid import JPEGLSLossless

from tests import synthetic
from tests.receive.helpers import association

from .node_process import NodeProcess, write_config
from .process import wait_for

pytestmark = pytest.mark.integration


def test_an_image_declaring_more_than_the_cap_is_not_decoded(tmp_path):
    ds = synthetic.mammogram(rows=1400, columns=1000)  # declares 2.7 MB of 16-bit pixels
    ds.PixelData = np.full((1400, 1000), 300, dtype=np.uint16).tobytes()  # compresses to almost nothing
    source = synthetic.write(ds, tmp_path / "flat.dcm")
    small = synthetic.transcode(source, tmp_path / "flat-jpls.dcm", "jpeg-ls-lossless")
    assert small.stat().st_size < 256 * 1024

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": []}))
    config = write_config(tmp_path / "node.toml", {
        "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data"),
                 "max_dataset_megabytes": 1},
        "study": {"stable_seconds": 1},
        "workers": {"count": 1, "device": "cpu"},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
    })  # fmt: skip
    node = NodeProcess(config).start()
    try:
        with association(node.port, [(ds.SOPClassUID, [JPEGLSLossless])]) as assoc:
            assert assoc.send_c_store(small).Status == 0x0000  # 1 MB cap: the received bytes fit
        skipped = wait_for(lambda: node.events("image_skipped"), 120, description="image_skipped")
        assert skipped[0]["sop_instance_uid"] == ds.SOPInstanceUID
        assert "node.max_dataset_megabytes" in skipped[0]["reason"]
        assert wait_for(lambda: node.events("job_done"), 60, description="job_done")[0]["skipped"] == 1
    finally:
        node.stop()
