# KernelWarehouse MobileNetV2-1.0 (1x): official configs/mobilenetv2_100/kw1x_mobilenetv2_100.json
# ("traditional" preprocessing, 150 epochs, SGD; the file sets no "smoothing", so main.py's 0.1 applies).
# 8 GPUs x 32 images = total batch 256 (the official example command).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs32_pil_resize.py',  # RandomResizedCrop + flip; resize 256 / crop 224
    '../_base_/schedules/imagenet_bs256_sgd_kw_mbv2.py',
    '../_base_/pretrain_runtime.py',
]

custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='KWMobileNetV2',
        widen_factor=1.0,
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',  # default init: normal(0, 0.01), zero bias, as the official classifier
        num_classes=1000,
        in_channels=1280,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, 5)),
)

train_dataloader = dict(batch_size=32)

# attention temperature: 1 -> 0 linearly over the first 15 epochs (per iteration), then 0
custom_hooks = [dict(type='TemperatureHook', preset='kernelwarehouse_mobilenetv2')]
