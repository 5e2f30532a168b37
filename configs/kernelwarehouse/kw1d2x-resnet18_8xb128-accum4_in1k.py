# KernelWarehouse ResNet-18 (1/2x): official configs/resnet18/kw1d2x_resnet18.json (no drop path).
_base_ = './kw1x-resnet18_8xb128-accum4_in1k.py'

model = dict(backbone=dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, drop_path_rate=0.0))
