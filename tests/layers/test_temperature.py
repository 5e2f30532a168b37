"""The temperature travels with the model: wherever a checkpoint is loaded, the model computes what it
computed when saved (mid-schedule and at its end), for every temperature-bearing layer; checkpoints
without it load at the end of the schedule, saying so; training without a schedule says so once."""
import io
import warnings

import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmengine.model import BaseModule
from torch import nn

import dynconv_mm  # noqa: F401  (registers the layers)
from dynconv_mm.layers import allocate_warehouses, get_temperature, set_temperature
from dynconv_mm.layers import temperature as temperature_module
from dynconv_mm.layers.torch_internals import onnx_export_kwargs

# (conv_cfg, end-of-schedule value, a mid-schedule value)
TYPES = {
    'DyConv2d': (dict(type='DyConv2d'), 1.0, 27.19),
    'ODConv2d': (dict(type='ODConv2d'), 1.0, 27.19),
    'KWConv2d': (dict(type='KWConv2d'), 0.0, 0.37),
}


class Net(BaseModule):
    def __init__(self, conv_cfg, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.conv1 = build_conv_layer(conv_cfg, 3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = build_conv_layer(conv_cfg, 8, 8, 3, padding=1)
        allocate_warehouses(self)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _net(name, seed=0, **kw):
    torch.manual_seed(seed)
    return Net(TYPES[name][0], **kw).eval()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    temperature_module._WARNED.update(unscheduled=False, missing=False)
    yield
    temperature_module._WARNED.update(unscheduled=False, missing=False)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('when', ['mid', 'end'])
@pytest.mark.parametrize('name', list(TYPES))
def test_state_dict_carries_the_temperature(name, when, tmp_path):
    _, end, mid = TYPES[name]
    value = mid if when == 'mid' else end
    a = _net(name)
    set_temperature(a, value)
    with torch.no_grad():
        expected = a(X)
    assert any(k.endswith('temperature') for k in a.state_dict())

    b = _net(name, seed=3)
    set_temperature(b, 5.0 if value != 5.0 else 6.0)
    b.load_state_dict(a.state_dict())  # torch.save/load_state_dict
    assert get_temperature(b) == pytest.approx(value)
    with torch.no_grad():
        torch.testing.assert_close(b(X), expected)

    from mmengine.runner import load_checkpoint, save_checkpoint
    path = str(tmp_path / 'ckpt.pth')
    save_checkpoint(a.state_dict(), path)
    c = _net(name, seed=4)
    load_checkpoint(c, path, map_location='cpu')  # mmengine's loader
    assert get_temperature(c) == pytest.approx(value)

    d = _net(name, seed=5, init_cfg=dict(type='Pretrained', checkpoint=path))  # init_cfg Pretrained
    d.init_weights()
    assert get_temperature(d) == pytest.approx(value)
    with torch.no_grad():
        torch.testing.assert_close(d(X), expected)


@pytest.mark.parametrize('name', list(TYPES))
def test_checkpoint_without_temperature_loads_at_the_end(name):
    _, end, mid = TYPES[name]
    a = _net(name)
    sd = {k: v for k, v in a.state_dict().items() if not k.endswith('temperature')}
    b = _net(name, seed=2)
    set_temperature(b, mid)
    with pytest.warns(UserWarning, match='no temperature'):
        missing, unexpected = b.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    assert get_temperature(b) == pytest.approx(end)


@pytest.mark.parametrize('name', list(TYPES))
def test_constructor_starts_at_the_end_of_the_schedule(name):
    assert get_temperature(_net(name)) == pytest.approx(TYPES[name][1])


@pytest.mark.parametrize('name', list(TYPES))
def test_training_without_a_schedule_warns_once(name):
    net = _net(name).train()
    with pytest.warns(UserWarning, match="TemperatureHook") as record:
        net(X)
        net(X)
    assert sum('TemperatureHook' in str(w.message) for w in record) == 1
    temperature_module._WARNED['unscheduled'] = False
    scheduled = _net(name).train()
    set_temperature(scheduled, TYPES[name][2])  # what the hook does every iteration
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        scheduled(X)
        with torch.no_grad():
            _net(name)(X)  # inference never warns


@pytest.mark.parametrize('name', list(TYPES))
def test_onnx_export_uses_the_loaded_temperature(name):
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')
    _, end, mid = TYPES[name]
    a = _net(name)
    set_temperature(a, mid)
    b = _net(name, seed=2)
    b.load_state_dict(a.state_dict())
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(b, (X,), buf, input_names=['x'], output_names=['y'], opset_version=17, **onnx_export_kwargs())
        expected = a(X)
    got = ort.InferenceSession(buf.getvalue(), providers=['CPUExecutionProvider']).run(None, {'x': X.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)
