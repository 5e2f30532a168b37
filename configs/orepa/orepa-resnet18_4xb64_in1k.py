# OREPA ResNet-18: official train.py defaults and README command (4 GPUs, total batch 256): 120 epochs,
# SGD lr 0.1 momentum 0.9 weight decay 1e-4 (not on biases, BatchNorms and priors; biases at 2x lr),
# per-iteration cosine, RandomResizedCrop + flip. Every conv+BN of the network is a re-parameterized
# block (7x7 stem: OREPA_LargeConv, 3x3: OREPA, BasicBlock shortcuts: plain conv+BN).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs32_pil_resize.py',
    '../_base_/schedules/imagenet_bs256_sgd_orepa.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(type='OREPAResNet', depth=18, block_type='OREPA'),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5),
        init_cfg=None),  # the official linear layer keeps PyTorch's default initialisation
)

train_dataloader = dict(batch_size=64)
