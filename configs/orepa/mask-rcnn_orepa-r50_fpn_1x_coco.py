# Mask R-CNN + FPN with an OREPA ResNet-50 (training-time form: every conv + BN position an OREPA block),
# COCO 1x. The OREPA repository has no detection code: this is mmdet's standard Mask R-CNN R-50 1x recipe
# (SGD 0.02, 12 epochs, steps [8, 11]) with the backbone swapped; block norms frozen (norm_eval), stem and
# layer1 frozen. After training, tools/reparameterize.py folds the backbone into plain convolutions
# (identical outputs). No published result.
#
# Backbone weights: the official OREPA ResNet-50 ImageNet checkpoint, converted:
#   python tools/model_converters/orepa_to_mm.py RES50_OREPA.pth checkpoints/orepa-resnet50_in1k_converted.pth
# (classification config: configs/orepa/orepa-resnet50_4xb64_in1k.py)
_base_ = '../_base_/det/mask-rcnn_fpn_sgd-1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='OREPAResNet',
        depth=50,
        block_type='OREPA',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/orepa-resnet50_in1k_converted.pth',
                      prefix='backbone.')))
