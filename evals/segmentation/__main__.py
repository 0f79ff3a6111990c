"""Fine-tune UperNet on ADE20K from a ``repro`` export with mmsegmentation and record single-scale mIoU and mAcc.

MAE/BEiT recipe: 512x512 crops, 160k iterations, batch 16, AdamW lr 1e-4, layer decay 0.65; features from blocks
L/3, L/2, 2L/3 and L resampled to strides 4/8/16/32. `--recipe tiny` runs 2 iterations on 64-px crops (smoke test).

  python -m evals.segmentation --export runs/imagenet/mae/.../ --data /data/ADEChallengeData2016
"""

import sys

from evals.dense.launch import main

if __name__ == "__main__":
    sys.exit(main("ade20k", __doc__))
