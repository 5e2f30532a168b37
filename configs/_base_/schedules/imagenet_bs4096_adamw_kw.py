# KernelWarehouse's ImageNet recipe for ResNet / ConvNeXt (ConvNeXt code base, main.py defaults):
# 300 epochs, AdamW (lr 4e-3 at total batch 4096, weight decay 0.05, eps 1e-8), no weight decay on
# 1-D parameters and biases, linear warm-up from 0 over 20 epochs then cosine to 1e-6, both per
# iteration; no gradient clipping.
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=4e-3, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    # timm's rule "len(shape) == 1 or name.endswith('.bias')": norms, biases and other flat parameters
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=20, end=300, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=4096)
