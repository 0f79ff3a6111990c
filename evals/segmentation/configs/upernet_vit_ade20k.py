# UperNet on ADE20K with a `repro` ViT export: MAE's / BEiT's recipe (MAE appendix A.4; mmseg's
# configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py). A native mmengine config: it runs as it is with
# OpenMMLab's tools, e.g.
#   python tools/train.py evals/segmentation/configs/upernet_vit_ade20k.py \
#       --cfg-options model.backbone.export=runs/.../ train_dataloader.dataset.data_root=/data/ADEChallengeData2016
# `python -m evals.segmentation` starts from this file and applies evals.dense.options.cfg_options (export geometry,
# data, recipe, device) on top; it never edits this file.
_base_ = [
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
]
custom_imports = dict(imports=["evals.dense.vit"], allow_failed_imports=False)

crop_size = (512, 512)
norm_cfg = dict(type="SyncBN", requires_grad=True)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=crop_size,
    ),
    backbone=dict(
        type="ReproViT",
        export=None,  # set by the launcher / --cfg-options: a directory with backbone.safetensors + backbone.json
        out_indices=[3, 5, 7, 11],  # blocks 4/6/8/12 of ViT-B
        rescales=[4, 2, 1, 0.5],  # strides 4/8/16/32 from the stride-16 patch grid (BEiT fpn1..fpn4)
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

optim_wrapper = dict(
    type="AmpOptimWrapper",
    dtype="bfloat16",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="ReproLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=1500, end=160000),
]
# 8 GPUs x 2 images = batch 16
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
train_cfg = dict(type="IterBasedTrainLoop", max_iters=160000, val_interval=16000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator
default_hooks = dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=16000))
custom_hooks = [dict(type="ReproCheckBackboneHook")]
