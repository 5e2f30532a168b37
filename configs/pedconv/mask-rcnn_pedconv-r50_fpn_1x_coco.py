# Mask R-CNN + FPN with a PEDConv ResNet-50, COCO 1x. The PEDConv repository has no detection code: this
# is mmdet's standard Mask R-CNN R-50 1x recipe (SGD 0.02, 12 epochs, steps [8, 11]) with the backbone
# swapped; BatchNorms frozen (norm_eval) and the stem + layer1 frozen, as mmdet does for ResNet-50. The
# info-max auxiliary loss of the PEDConv layers (weight 0.001, as in the official ImageNet trainer) is
# added to the detector's losses by AuxLossHook. No published result.
#
# Backbone weights: no official checkpoint was released; train
# configs/pedconv/pedconv-resnet50_8xb64_in1k.py and load its ``backbone.`` part:
#   checkpoints/pedconv-resnet50_in1k.pth
_base_ = '../_base_/det/mask-rcnn_fpn_sgd-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='PEDResNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/pedconv-resnet50_in1k.pth', prefix='backbone.')))

custom_hooks = [dict(type='AuxLossHook', loss_weight=0.001)]
