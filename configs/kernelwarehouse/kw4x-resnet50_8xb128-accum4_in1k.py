# KernelWarehouse ResNet-50 (4x): official configs/resnet50/kw4x_resnet50.json.
_base_ = './kw1x-resnet50_8xb128-accum4_in1k.py'

model = dict(backbone=dict(cell_num_ratio=4))
