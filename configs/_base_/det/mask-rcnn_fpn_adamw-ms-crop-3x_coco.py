# Mask R-CNN + FPN, COCO, DWNet's detection recipe (AdamW, multi-scale + crop augmentation, 3x).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './coco_instance_ms-crop.py',
    './schedule_adamw_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
