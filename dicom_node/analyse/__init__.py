"""Analyse stage: the worker processes that claim a study's job, run the detector on its
images (dicom_node.model, dicom_node.pixels), build its GSPS (dicom_node.report) and record
the outcome (dicom_node.queue). See worker.py.
"""
