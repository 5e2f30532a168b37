# KernelWarehouse's ImageNet recipe for MobileNetV2 (configs/mobilenetv2_*/*.json): 150 epochs, SGD
# with Nesterov momentum 0.9 (timm's "sgd"), lr 0.05 at total batch 256, weight decay 4e-5 except on
# 1-D parameters and biases, no warm-up, cosine to 1e-6 per iteration.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, nesterov=True, weight_decay=4e-5),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0),
)

param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=0, end=150, convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=150, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=256)
