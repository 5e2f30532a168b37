# KernelWarehouse MobileNetV2-1.0 (1/2x): official configs/mobilenetv2_100/kw1d2x_mobilenetv2_100.json.
# The KW options are fixed by the model (reduction 1/32, ten warehouses, point-wise convolutions KW only
# in the last stage, KW classifier with a warehouse of its own); label smoothing 0 as in the json.
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='KWMobileNetV2',
        widen_factor=1.0,
        variant='kw1d2x'),
    head=dict(
        type='KWLinearClsHead',
        dropout=0.0,
        loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)),
)
