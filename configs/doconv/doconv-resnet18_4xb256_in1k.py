# DO-Conv ResNet-18 (GluonCV ResNet-v1b layout = mmpretrain's ResNet, style 'pytorch'), every Conv2d a
# DOConv2d (D_mul = kernel height x width). The published DO-Conv ImageNet numbers were trained with
# GluonCV/MXNet using GluonCV's unchanged baseline recipe; this config is that recipe
# (gluon-cv model zoo resnet18_v1b.sh: 4 GPUs x 256, lr 0.4, 120 epochs, cosine, 5 warm-up epochs,
# --last-gamma). No PyTorch checkpoint was released.
_base_ = [
    '../_base_/datasets/imagenet_bs128_gluoncv.py',
    '../_base_/schedules/imagenet_bs1024_sgd_gluoncv.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ResNet',
        depth=18,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch',
        conv_cfg=dict(type='DOConv2d'),
        zero_init_residual=True),  # GluonCV --last-gamma
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)),
)

train_dataloader = dict(batch_size=256)
