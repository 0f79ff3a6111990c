"""Shared parts of the dense evaluations (ADE20K segmentation, COCO detection) on OpenMMLab."""
