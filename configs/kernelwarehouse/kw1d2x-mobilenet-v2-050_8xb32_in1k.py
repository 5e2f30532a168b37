# KernelWarehouse MobileNetV2-0.5 (1/2x): official configs/mobilenetv2_050/kw1d2x_mobilenetv2_050.json
# (label smoothing 0).
_base_ = './kw1d2x-mobilenet-v2_8xb32_in1k.py'

model = dict(backbone=dict(widen_factor=0.5))
