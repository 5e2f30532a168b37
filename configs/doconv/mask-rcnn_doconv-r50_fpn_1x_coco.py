# Mask R-CNN + FPN with a DO-Conv ResNet-50 (mmdet's ResNet, every convolution of the residual stages a
# DOConv2d through ``conv_cfg``), COCO 1x. The DO-Conv repository has no detection code: this is mmdet's
# standard Mask R-CNN R-50 1x recipe (SGD 0.02, 12 epochs, steps [8, 11]); BatchNorms frozen (norm_eval),
# stem and layer1 frozen. No published result.
#
# Backbone weights: no PyTorch checkpoint was released; train
# configs/doconv/doconv-resnet50_8xb128_in1k.py and load its ``backbone.`` part:
#   checkpoints/doconv-resnet50_in1k.pth
_base_ = '../_base_/det/mask-rcnn_fpn_sgd-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        conv_cfg=dict(type='DOConv2d'),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/doconv-resnet50_in1k.pth', prefix='backbone.')))
