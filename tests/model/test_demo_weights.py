"""The packaged demo weights, as a newcomer meets them: they mark masses on phantoms of a
look they never trained on, and never a burned-in view letter, text, ruler or marker.

The full held-out figures (hundreds of masses per set) are in dicom_node/weights/README.md,
made by ``scripts/train_demo_weights``; this is the check that every test run repeats on a
few fresh images through the node's own detector path.

The weights trained on the varied generator (shipped 2026-12-04) put no box on burned-in
marks here (the weights before them put a 0.99 box on a view letter, as they did on
CBIS-DDSM films). They find 8 of these 17 masses at the default threshold: short of the
floor below, so that check is a strict xfail (issue #9, point 2, open): the day weights
pass it, the run says so and the marker must go.
"""

from __future__ import annotations

import dataclasses

import pytest

from dicom_node.config import DetectorConfig
from dicom_node.lab.phantom import generate_phantom
from dicom_node.lab.phantom_variety import HELDOUT
from dicom_node.model.detector import load_detector
from dicom_node.pixels import prepare

pytestmark = pytest.mark.slow
NOT_YET = pytest.mark.xfail(strict=True, reason="issue #9 point 2: the packaged demo weights do not generalise yet")

# A texture family the demo never trained on, at the smaller end of the training sizes (fast),
# every hard negative drawn on every image.
UNSEEN = dataclasses.replace(HELDOUT["texture_reticular"], rows=((2000, 2300),), masses_per_image=(1, 3),
                             distractors=1.0)
THRESHOLD = 0.5  # the node's default score_threshold


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x1 - x0, 0) * max(y1 - y0, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlap_of(box, mark) -> float:
    """Share of ``box`` inside ``mark``."""
    x0, y0 = max(box[0], mark[0]), max(box[1], mark[1])
    x1, y1 = min(box[2], mark[2]), min(box[3], mark[3])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return max(x1 - x0, 0) * max(y1 - y0, 0) / area if area > 0 else 0.0


@pytest.fixture(scope="module")
def results():
    detector = load_detector(DetectorConfig(weights="demo", score_threshold=THRESHOLD))
    out = []
    for index in range(8):
        phantom = generate_phantom(seed=9090, index=index, variety=UNSEEN)
        prepared = prepare(phantom.dataset, input_size=detector.input_size)
        out.append((phantom, detector.detect([prepared])[0]))
    return out


@NOT_YET
def test_demo_finds_masses_in_a_texture_it_never_saw(results):
    masses = [(m.box, dets) for phantom, dets in results for m in phantom.masses]
    found = sum(any(_iou(box, d.box) >= 0.5 for d in dets) for box, dets in masses)
    assert len(masses) >= 12
    # Held-out figure for this set: see dicom_node/weights/README.md; a generous floor here.
    assert found / len(masses) >= 0.6, f"found {found} of {len(masses)} masses at score {THRESHOLD}"


def test_demo_marks_no_burned_in_text_ruler_or_marker(results):
    marks_seen = 0
    for phantom, dets in results:
        marks = [(kind, box) for kind, box in phantom.distractor_boxes if kind != "paddle"]
        marks_seen += len(marks)
        for d in dets:
            on_mark = [kind for kind, box in marks if _overlap_of(d.box, box) > 0.5 or _overlap_of(box, d.box) > 0.5]
            assert not on_mark, f"a {THRESHOLD}+ box ({d.score:.2f}) on burned-in {on_mark[0]}"
    assert marks_seen >= 16
    # A model that marks nothing would pass the loop above: it must mark masses here.
    assert sum(len(dets) for _, dets in results) >= 4

