# DO-Conv ResNet-50 (GluonCV ResNet-v1b layout), GluonCV's resnet50_v1b.sh recipe: 8 GPUs x 128
# (total batch 1024, lr 0.4), 120 epochs, cosine, 5 warm-up epochs, --last-gamma.
_base_ = './doconv-resnet18_4xb256_in1k.py'

model = dict(backbone=dict(depth=50), head=dict(in_channels=2048))

train_dataloader = dict(batch_size=128)
