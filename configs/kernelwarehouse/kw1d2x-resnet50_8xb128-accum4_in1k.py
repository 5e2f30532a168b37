# KernelWarehouse ResNet-50 (1/2x): official configs/resnet50/kw1d2x_resnet50.json
# (half-size cells, half the cells, non-local basis ratio 0.0625 in the attentions).
_base_ = './kw1x-resnet50_8xb128-accum4_in1k.py'

model = dict(backbone=dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                           nonlocal_basis_ratio=0.0625))
