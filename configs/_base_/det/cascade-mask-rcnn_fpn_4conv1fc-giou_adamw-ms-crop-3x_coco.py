# Cascade Mask R-CNN + FPN, COCO, the official DWNet detector: three 4conv1fc box heads (4 shared 3x3
# convolutions with SyncBN + 1 fc), class-specific regression of decoded boxes with GIoU loss x10,
# AdamW, multi-scale + crop augmentation, 3x.
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    './coco_instance_ms-crop.py',
    './schedule_adamw_3x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(roi_head=dict(bbox_head=[
    _bbox_head([0.1, 0.1, 0.2, 0.2]),
    _bbox_head([0.05, 0.05, 0.1, 0.1]),
    _bbox_head([0.033, 0.033, 0.067, 0.067]),
]))
