# Mask R-CNN + FPN with a plain MobileNetV2 (1.0), COCO 1x: the baseline of the KernelWarehouse detection
# table (official .../mobilenetv2/mask_rcnn_mobilenetv2_100_adamw_1x_coco.py). The FPN takes the outputs
# of torchvision ``features.3/6/13/18`` (24, 32, 96, 1280 channels) = mmdet's ``layer2``, ``layer3``,
# ``layer5`` and ``conv2`` (out_indices 1, 2, 4, 7). The official ``frozen_stages=1`` freezes
# ``features.0..3`` = ``conv1``, ``layer1``, ``layer2`` here (frozen_stages=2). Published: box AP 33.8,
# mask AP 31.7.
#
# Backbone weights: the official 150-epoch ImageNet MobileNetV2 (torchvision ``features.*`` keys); the
# KW converter maps them to mmdet/mmpretrain MobileNetV2 keys with --baseline (no warehouse keys):
#   python tools/model_converters/kernelwarehouse_to_mm.py mobilenetv2_100.pth \
#       checkpoints/mobilenet-v2_in1k_kw-recipe.pth --arch mobilenetv2 --baseline --trusted
_base_ = '../_base_/det/mask-rcnn_fpn_adamw-ms-crop-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='MobileNetV2',
        widen_factor=1.0,
        out_indices=(1, 2, 4, 7),
        frozen_stages=2,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobilenet-v2_in1k_kw-recipe.pth',
                      prefix='backbone.')),
    neck=dict(in_channels=[24, 32, 96, 1280]))
