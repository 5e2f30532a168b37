# KernelWarehouse ResNet-18 (1x): official configs/resnet18/kw1x_resnet18.json and main.py defaults.
# 8 GPUs x 128 images x 4 accumulation steps = total batch 4096 (the official example command).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',  # RandAugment m9-mstd0.5, RandomErasing 0.25, bicubic
    '../_base_/schedules/imagenet_bs4096_adamw_kw.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='KWResNet',
        depth=18,
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'conv'),
        drop_path_rate=0.1),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5),
        init_cfg=None),  # the official fc keeps PyTorch's default initialisation
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
optim_wrapper = dict(accumulative_counts=4)

# attention temperature: 1 -> 0 linearly over the first 20 epochs (per iteration), then 0
custom_hooks = [dict(type='TemperatureHook', preset='kernelwarehouse')]
