"""Object detection evaluation (Mask R-CNN via mmdet) and its support code."""
