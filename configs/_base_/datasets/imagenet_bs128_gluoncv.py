# ImageNet with GluonCV's classification training pipeline (scripts/classification/imagenet/
# train_imagenet.py): RandomResizedCrop(224) + flip + colour jitter 0.4/0.4/0.4 + PCA lighting 0.1;
# test: resize the short side to 256, centre crop 224.
_base_ = ['mmpretrain::_base_/datasets/imagenet_bs32_pil_resize.py']

# AlexNet-style PCA lighting noise (eigen-decomposition of the ImageNet RGB covariance), BGR order
EIGVAL = [55.4625, 4.7940, 1.1475]
EIGVEC = [
    [-0.5836, -0.6948, 0.4203],
    [-0.5808, -0.0045, -0.8140],
    [-0.5675, 0.7192, 0.4009],
]

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.4),
    dict(type='Lighting', eigval=EIGVAL, eigvec=EIGVEC, alphastd=0.1, to_rgb=False),
    dict(type='PackInputs'),
]

train_dataloader = dict(batch_size=128, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=128)
test_dataloader = dict(batch_size=128)
