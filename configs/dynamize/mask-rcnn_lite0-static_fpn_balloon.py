# Mask R-CNN + FPN with an ImageNet-pretrained EfficientNet-Lite0 backbone (timm's tf_efficientnet_lite0 through
# mmpretrain's TIMMBackbone), fine-tuned on the balloon photos (one class, 61 train / 13 val images) on the CPU.
# The backbone is built by the Dynamized wrapper without rules: loaded with the static weights exactly as the
# dynamized variants are, so the four runs of docs/dynamize.md differ only in what they compare.
#
#   python tools/model_converters/efficientnet_lite0_to_timm.py work_dirs/pretrained/efficientnet-lite0_timm.pth
#   python tools/train.py configs/dynamize/mask-rcnn_lite0-static_fpn_balloon.py
#   python tools/test.py configs/dynamize/mask-rcnn_lite0-static_fpn_balloon.py \
#       work_dirs/mask-rcnn_lite0-static_fpn_balloon/iter_200.pth --show-dir vis
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)

max_iters = 200
data_root = '../shared/data/coco_real/'
pretrained = 'work_dirs/pretrained/efficientnet-lite0_timm.pth'
metainfo = dict(classes=('balloon',), palette=[(220, 20, 60)])
img_scale = (384, 384)
rules = None  # the static backbone

model = dict(
    # the Lite0 weights were trained on inputs scaled to [-1, 1]
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='Dynamized',
        backbone=dict(type='mmpretrain.TIMMBackbone', model_name='tf_efficientnet_lite0', features_only=True,
                      pretrained=False, out_indices=(1, 2, 3, 4)),
        rules=rules,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[24, 40, 112, 320], out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        bbox_head=dict(in_channels=128, fc_out_channels=512, num_classes=1),
        mask_roi_extractor=dict(out_channels=128),
        mask_head=dict(num_convs=2, in_channels=128, conv_out_channels=128, num_classes=1)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(max_per_img=50)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=1, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None,
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=8), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=True,
    dataset=dict(type='CocoDataset', data_root=data_root, metainfo=metainfo, test_mode=True,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, T_max=max_iters - 30, eta_min=1e-6),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=2)
