# DWNet-B: official configs/dwnet_base_patch4_window7_224.yaml (drop path 0.5) and
# scripts/run_dwnet_base_patch4_window7_224.sh: 16 GPUs x 64 images x 2 accumulation steps; the Swin
# trainer scales the lr linearly with the accumulation steps too, so lr = 5e-4 x 2048 / 512 = 2e-3
# (warm-up start and cosine floor scale alike). The official README says base models were trained
# without AMP.
_base_ = './dwnet-tiny_8xb128_in1k.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=1024))

train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=5e-4 * 2048 / 512), accumulative_counts=2)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6 * 2048 / 512, by_epoch=True, begin=0, end=300,
         convert_to_iter_based=True),
]
auto_scale_lr = dict(base_batch_size=2048)
