# The pretrained EfficientNet-Lite0 re-parameterized: every k x k convolution (Lite0's are depth-wise, but the
# stem) becomes a Diverse Branch Block, started from the pretrained kernel (the other branches silenced: the same
# function), fine-tuned on the balloon photos, then folded back into plain convolutions for testing
# (docs/dynamize.md). The stem and the four stride-2 depth-wise convs pad TF-style (asymmetrically) and stay plain.
#
#   python tools/train.py configs/dynamize/mask-rcnn_lite0-dbb_fpn_balloon.py
#   python tools/reparameterize.py configs/dynamize/mask-rcnn_lite0-dbb_fpn_balloon.py \
#       work_dirs/mask-rcnn_lite0-dbb_fpn_balloon/iter_200.pth work_dirs/lite0-dbb_deploy/deploy.pth \
#       --out-config work_dirs/lite0-dbb_deploy/deploy.py
#   python tools/test.py work_dirs/lite0-dbb_deploy/deploy.py work_dirs/lite0-dbb_deploy/deploy.pth
_base_ = './mask-rcnn_lite0-static_fpn_balloon.py'
model = dict(backbone=dict(rules=dict(_delete_=True, type='DBB', kind=('kxk', 'depthwise'))))
