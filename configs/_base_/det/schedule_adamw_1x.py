# Official KernelWarehouse detection schedule: AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 0.05,
# no decay on parameters whose name contains "norm"), 12 epochs, x0.1 at epochs 8 and 11, linear
# warm-up over the first 500 iterations (mmdet's schedule_1x). Total batch 16 (8 GPUs x 2 images).
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    # as the official configs: the key "norm" matches the attention norms of KW layers, LayerNorms and
    # output norms, not ResNet's bn1/bn2/bn3 (mmengine matches substrings of the parameter names)
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
