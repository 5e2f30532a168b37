# A stock mmdet Mask R-CNN R-50 whose backbone convs come from dynconv_mm through conv_cfg.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
model = dict(backbone=dict(conv_cfg=dict(type='DOConv2d'), init_cfg=None))
