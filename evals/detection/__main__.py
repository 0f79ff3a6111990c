"""Fine-tune Mask R-CNN on COCO from a ``repro`` export with mmdet and record box AP and mask AP.

ViTDet recipe: the plain ViT's last block through a simple feature pyramid (strides 4-64), 1024x1024 large-scale
jitter, batch 64, AdamW lr 1e-4, layer decay 0.7, 184k iterations; COCO AP from mmdet's CocoMetric.
`--recipe tiny` runs 2 iterations on 128-px canvases (smoke test).

  python -m evals.detection --export runs/imagenet/mae/.../ --data /data/coco
"""

import sys

from evals.dense.launch import main

if __name__ == "__main__":
    sys.exit(main("coco", __doc__))
