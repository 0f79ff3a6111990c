# Mask R-CNN on COCO with a `repro` ViT export through ViTDet's simple feature pyramid: the recipe MAE's COCO
# transfer uses (ViTDet, Li et al. 2022: 1024x1024 large-scale jitter 0.1-2.0, batch 64, AdamW lr 1e-4, wd 0.1,
# layer decay 0.7, drop path 0.1, 100 epochs = 184,375 iterations, lr x0.1 at 163,889 and 177,546; 4conv1fc box
# head and mask head with LayerNorm, 2-conv RPN). A native mmengine config: it runs as it is with OpenMMLab's
# tools given --cfg-options model.backbone.export=DIR train_dataloader.dataset.data_root=... ;
# `python -m evals.detection` starts from this file and applies evals.dense.options.cfg_options on top.
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["evals.dense.vit"], allow_failed_imports=False)

image_size = (1024, 1024)
head_norm = dict(type="ReproLN2d", requires_grad=True)
model = dict(
    # pad every test image to 1024x1024 with zeros after normalisation (ViTDet); training crops are already 1024
    data_preprocessor=dict(pad_size_divisor=1024, batch_augments=[
        dict(type="BatchFixedSizePad", size=image_size, pad_mask=True)]),
    backbone=dict(
        _delete_=True,
        type="ReproViT",
        export=None,  # set by the launcher / --cfg-options
        out_indices=[11],  # the last block of ViT-B; ViTDet's pyramid is built from it alone
        rescales=[],
        drop_path_rate=0.1,
    ),
    neck=dict(
        _delete_=True,
        type="ReproSimpleFPN",
        in_channels=768,
        out_channels=256,
        rescales=[4.0, 2.0, 1.0, 0.5],  # strides 4, 8, 16, 32 from the stride-16 grid; + max-pooled stride 64
        norm_cfg=head_norm,
        num_outs=5,
    ),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type="Shared4Conv1FCBBoxHead",
            conv_out_channels=256,
            norm_cfg=head_norm,
        ),
        mask_head=dict(norm_cfg=head_norm),
    ),
)

backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomResize", scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_type="absolute_range", crop_size=image_size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
# 16 GPUs x 4 images = batch 64 (ViTDet); the launcher sets batch per process from the global batch
train_dataloader = dict(batch_size=4, num_workers=4, sampler=dict(type="InfiniteSampler", shuffle=True),
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    dtype="bfloat16",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    constructor="ReproLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay=0.7),
)
max_iters = 184375
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[163889, 177546], gamma=0.1),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=10000, max_keep_ckpts=1, save_last=True))
log_processor = dict(by_epoch=False)
custom_hooks = [dict(type="ReproCheckBackboneHook")]
