# DWNet-T: official configs/dwnet_tiny_patch4_window7_224.yaml, config.py defaults and
# scripts/run_dwnet_tiny_patch4_window7_224.sh (8 GPUs x 128 = total batch 1024, lr 5e-4 x 1024 / 512).
# The official run used apex AMP O1; add --amp to tools/train.py for mixed precision.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',  # RandAugment m9-mstd0.5, RandomErasing 0.25, bicubic
    '../_base_/schedules/imagenet_bs1024_adamw_dwnet.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='DWNet',
        arch='tiny',
        window_size=7,
        dynamic=False,
        drop_path_rate=0.2,
        mode='classification'),  # LayerNorm output norm = the official final norm
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
