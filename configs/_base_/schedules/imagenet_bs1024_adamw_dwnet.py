# DWNet's ImageNet recipe (Swin Transformer code base, config.py defaults): 300 epochs, AdamW
# (lr 5e-4 x total batch / 512, weight decay 0.05, eps 1e-8), no weight decay on 1-D parameters and
# biases, gradient clipping at norm 5, per-iteration linear warm-up over 20 epochs from lr / 1000 and
# a cosine to lr / 100 computed over all 300 epochs (timm's CosineLRScheduler without warm-up prefix:
# the cosine factor also runs during the warm-up, hence the overlapping schedulers).
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=5e-4 * 1024 / 512, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6 * 1024 / 512, by_epoch=True, begin=0, end=300,
         convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=1024)
