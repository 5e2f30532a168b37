# OREPA ResNet-18 in its inference form: every block one Conv2d with bias. For weights folded from a
# training checkpoint (dynconv_mm.reparameterize_model) or official deploy checkpoints
# (dynconv_mm.converters.orepa.convert_orepa_resnet).
_base_ = './orepa-resnet18_4xb64_in1k.py'

model = dict(backbone=dict(deploy=True))
