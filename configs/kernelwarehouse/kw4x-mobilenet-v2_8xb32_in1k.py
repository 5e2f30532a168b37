# KernelWarehouse MobileNetV2-1.0 (4x): official configs/mobilenetv2_100/kw4x_mobilenetv2_100.json
# (warehouses shared per 'layer' only; label smoothing 0.1).
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'

model = dict(backbone=dict(cell_num_ratio=4, sharing_range=('layer', )))
