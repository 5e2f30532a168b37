# Mask R-CNN + FPN, COCO, mmdet's standard 1x recipe (SGD lr 0.02 for a total batch of 16, momentum 0.9,
# weight decay 1e-4, 12 epochs, steps [8, 11], 500 warm-up iterations, single-scale 1333x800 with flip).
# Configs built on this file replace ``model.backbone``.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
