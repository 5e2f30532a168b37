# Quick start: image classification with a KernelWarehouse (1x) ResNet-18 (half width) trained from scratch
# on the toy ImageNet-style set (docs/toy_datasets.md: 6 classes of shapes, 96 px images) with mmpretrain's
# real pipeline, LinearClsHead and Accuracy (top-1). The KW temperature anneals from 1 to 0 over the first
# half of training (TemperatureHook). The cheapest quick-start: also the one used for distributed training
#
#   bash tools/dist_train.sh configs/_quickstart_/kw1x-r18_toy-in6.py 2      # 2 processes, gloo on the CPU
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

max_iters = 200
anneal_iters = 100
data_root = 'data/toy/imagenet/'
metainfo = dict(classes=('cross', 'disc', 'rectangle', 'ring', 'star', 'triangle'))
num_classes = 6
img_size = 64

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='KWResNet',
        depth=18,
        base_channels=32,
        out_indices=(3,),
        norm_cfg=dict(type='BN', requires_grad=True),
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'conv')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=256,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1,)))

data_preprocessor = dict(
    num_classes=num_classes, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=img_size, crop_ratio_range=(0.6, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root=data_root, metainfo=metainfo, ann_file='meta/train.txt',
                 data_prefix='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, metainfo=metainfo, ann_file='meta/val.txt',
                 data_prefix='val', pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1,))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

train_cfg = dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05), clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, T_max=max_iters - 20, eta_min=1e-5),
]
custom_hooks = [dict(type='TemperatureHook', start=1.0, end=0.0, num_iters=anneal_iters)]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
randomness = dict(seed=0)
