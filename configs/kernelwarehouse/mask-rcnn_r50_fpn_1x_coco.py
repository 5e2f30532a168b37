# Mask R-CNN + FPN with a plain ResNet-50, COCO 1x: the baseline of the KernelWarehouse detection table
# (official detection/configs/kernelwarehouse/resnet50/mask_rcnn_resnet50_adamw_1x_coco.py): AdamW lr 1e-4,
# wd 0.05, DETR-style multi-scale + crop augmentation, 12 epochs, steps [8, 11], BN frozen (norm_eval),
# stem and first stage frozen. Published: box AP 39.6, mask AP 36.4.
#
# Backbone weights: the official 300-epoch ImageNet ResNet-50 of the KernelWarehouse repository (plain
# ResNet keys); the KW converter handles it with --baseline (no warehouse keys):
#   python tools/model_converters/kernelwarehouse_to_mm.py resnet50.pth \
#       checkpoints/resnet50_in1k_kw-recipe.pth --arch resnet --baseline --trusted
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50_in1k_kw-recipe.pth',
                      prefix='backbone.')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
