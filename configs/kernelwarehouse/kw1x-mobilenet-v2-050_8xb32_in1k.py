# KernelWarehouse MobileNetV2-0.5 (1x): official configs/mobilenetv2_050/kw1x_mobilenetv2_050.json
# (this file sets smoothing 0).
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'

model = dict(
    backbone=dict(widen_factor=0.5),
    head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
