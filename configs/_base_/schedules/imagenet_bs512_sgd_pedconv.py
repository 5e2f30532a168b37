# PEDConv's ImageNet recipe (NVIDIA DeepLearningExamples trainer, README command): 250 epochs, SGD
# momentum 0.875 (no Nesterov), lr 0.512 at total batch 512, weight decay 3.0517578125e-05 except on
# parameters whose name contains "bn" (the trainer's default without --bn-weight-decay), per-epoch
# schedule: lr x (epoch + 1) / 8 for the first 8 epochs, then a cosine to 0 over the remaining 242.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.512, momentum=0.875, weight_decay=3.0517578125e-05),
    paramwise_cfg=dict(custom_keys={'bn': dict(decay_mult=0.0)}),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=1 / 8, by_epoch=True, begin=0, end=8),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=8, end=250),
]

train_cfg = dict(by_epoch=True, max_epochs=250, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=512)
