# Quick start: semantic segmentation with UperNet on a small dynamic DWNet (dense mode, per-sample dynamic
# depth-wise kernels) trained from scratch on the toy ADE-style set (docs/toy_datasets.md: 6 classes, 128-160
# px scenes) on the CPU, with mmseg's real pipeline, UPerHead + FCN auxiliary head and IoUMetric (mIoU).
# The decode head's convolutions are DY-Conv layers (conv_cfg), whose attention temperature anneals from
# 30 to 1 over the first 40 % of training (TemperatureHook; DWNet's own dynamic kernels have none).
#
#   python tools/train.py configs/_quickstart_/upernet_dynamic-dwnet_toy-ade.py
_base_ = ['mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmseg'

max_iters = 200
anneal_iters = 80
data_root = 'data/toy/ade/'
metainfo = dict(classes=('disc', 'rectangle', 'star', 'triangle', 'backdrop', 'floor'),
                palette=[(220, 20, 60), (0, 130, 200), (255, 200, 0), (60, 180, 75), (120, 120, 160),
                         (140, 100, 60)])
num_classes = 6
crop_size = (128, 128)
img_scale = (160, 160)
norm_cfg = dict(type='BN', requires_grad=True)
embed_dims = 32

data_preprocessor = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
    pad_val=0, seg_pad_val=255, size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='DWNet',
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],
        mode='dense',
        dynamic=True,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[embed_dims, embed_dims * 2, embed_dims * 4, embed_dims * 8],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,
        dropout_ratio=0.1,
        num_classes=num_classes,
        conv_cfg=dict(type='DyConv2d', num_kernels=4, temperature=30.0),
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=embed_dims * 4,
        in_index=2,
        channels=32,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.8, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset_type = 'BaseSegDataset'
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=True, img_suffix='.jpg',
        seg_map_suffix='.png', data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=True, img_suffix='.jpg',
        seg_map_suffix='.png',
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
custom_hooks = [dict(type='TemperatureHook', start=30.0, end=1.0, num_iters=anneal_iters)]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
randomness = dict(seed=0)
