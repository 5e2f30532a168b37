# OREPA's ImageNet recipe (train.py defaults): 120 epochs, SGD momentum 0.9, lr 0.1 at total batch 256,
# weight decay 1e-4 except on parameters whose name contains "bias", "bn" or "prior", twice the lr on
# "bias" parameters (BatchNorm biases included); per-iteration cosine to 0. The official warm-up is
# `epochs / 24` compared with the iteration counter, i.e. 5 iterations from 0, kept as such.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={
        'bias': dict(lr_mult=2.0, decay_mult=0.0),
        'bn': dict(decay_mult=0.0),
        'prior': dict(decay_mult=0.0),
    }),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=5),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=0, end=120, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=256)
