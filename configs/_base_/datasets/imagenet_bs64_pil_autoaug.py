# ImageNet with the NVIDIA DeepLearningExamples "pytorch" data backend (used by PEDConv):
# torchvision RandomResizedCrop(224) + flip + AutoAugment (ImageNet policy); test: resize the short
# side to 256, centre crop 224. PIL bilinear resizing throughout; the augmentations fill with grey 128
# and shear bicubically, as the trainer's AutoaugmentImageNetPolicy.
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs32_pil_resize.py']

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='AutoAugment', policies='imagenet', hparams=dict(pad_val=128, interpolation='bicubic')),
    dict(type='PackInputs'),
]

train_dataloader = dict(batch_size=64, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=64)
test_dataloader = dict(batch_size=64)
