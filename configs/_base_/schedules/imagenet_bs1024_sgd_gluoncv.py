# GluonCV's ResNet-v1b ImageNet recipe (model-zoo training commands, e.g. resnet50_v1b.sh): 120 epochs,
# SGD momentum 0.9, lr 0.4 at total batch 1024, weight decay 1e-4 on every parameter (no --no-wd),
# per-iteration linear warm-up from 0 over 5 epochs, then a cosine to 0. "--last-gamma" (zero-initialised
# last BatchNorm of each residual block) is mmpretrain ResNet's zero_init_residual=True.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.4, momentum=0.9, weight_decay=1e-4),
)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=5, end=120, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=1024)
