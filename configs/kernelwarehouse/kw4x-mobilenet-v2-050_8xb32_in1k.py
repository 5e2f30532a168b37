# KernelWarehouse MobileNetV2-0.5 (4x): official configs/mobilenetv2_050/kw4x_mobilenetv2_050.json
# (no "smoothing" key: label smoothing 0.1).
_base_ = './kw4x-mobilenet-v2_8xb32_in1k.py'

model = dict(backbone=dict(widen_factor=0.5))
