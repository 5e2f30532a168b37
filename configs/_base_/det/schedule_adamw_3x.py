# Official DWNet detection schedule ("3x"): AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 0.05, no
# decay on parameters whose name contains "norm"), 36 epochs, x0.1 at epochs 27 and 33, linear warm-up
# over the first 500 iterations. Total batch 16 (8 GPUs x 2 images). The official runs used apex mixed
# precision: add ``--amp`` to tools/train.py for the same.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
