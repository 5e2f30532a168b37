# PEDConv ResNet-18: the official README training command (NVIDIA DeepLearningExamples trainer):
# 8 GPUs x 64 = total batch 512, 250 epochs, SGD lr 0.512 momentum 0.875, weight decay 3.0517578125e-05
# (not on BatchNorm), 8 warm-up epochs + cosine, label smoothing 0.1, mixup 0.2, AutoAugment; the
# info-max auxiliary loss is added with weight 0.001 (official training.py).
_base_ = [
    '../_base_/datasets/imagenet_bs64_pil_autoaug.py',
    '../_base_/schedules/imagenet_bs512_sgd_pedconv.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(type='PEDResNet', depth=18),
    neck=dict(type='GlobalAveragePooling'),  # = the official fixed AvgPool2d(7) at 224x224
    head=dict(
        type='LinearClsHead',  # default init: normal(0, 0.01), as the official fc
        num_classes=1000,
        in_channels=512,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5)),
    train_cfg=dict(augments=dict(type='Mixup', alpha=0.2)),
)

train_dataloader = dict(batch_size=64)

custom_hooks = [dict(type='AuxLossHook', loss_weight=0.001)]
