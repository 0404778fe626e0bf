"""The lab: training, evaluation, datasets, phantoms and the detector benchmark.

It uses the model library (dicom_node.model) and the pixel pipeline (dicom_node.pixels),
exactly as the node does, and nothing of the node itself: `dicom-node serve` never loads
a module from here (tests/test_layers.py checks both).
"""
