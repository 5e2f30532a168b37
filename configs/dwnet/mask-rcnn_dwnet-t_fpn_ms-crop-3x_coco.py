# Mask R-CNN + FPN with DWNet-T, COCO 3x. There is no official DWNet Mask R-CNN: this config uses
# the DWNet detection recipe (dense-mode DWNet with SyncBN, DETR-style multi-scale + crop augmentation,
# AdamW lr 1e-4 wd 0.05, 36 epochs, steps [27, 33], drop path 0.2) with mmdet's standard Mask R-CNN
# heads, and loads only the converted ImageNet backbone. No published result.
#
# Backbone weights:
#   python tools/model_converters/dwnet_to_mm.py dwnet_tiny_224.pth \
#       checkpoints/dwnet-tiny_in1k_dense.pth --target dense_backbone --trusted
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-3x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='DWNet',
        arch='tiny',
        mode='dense',
        dynamic=False,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dwnet-tiny_in1k_dense.pth', prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))
