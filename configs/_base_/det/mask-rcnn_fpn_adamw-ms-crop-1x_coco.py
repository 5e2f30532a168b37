# Mask R-CNN + FPN, COCO, official KernelWarehouse recipe (AdamW, multi-scale + crop augmentation, 1x).
# Configs built on this file replace ``model.backbone`` (and the FPN input channels).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './coco_instance_ms-crop.py',
    './schedule_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
