"""The contract every registered conv type honours, checked on every type the registry holds.

The types are taken from the registry itself (``registered_names('conv')``), so a layer is tested by
being registered; test ids are the registered names. Each type runs in its natural host: a stock
mmpretrain ResNet (through ``conv_cfg``) where the type takes every convolution of one, otherwise a
small network of convolutions of a geometry the type says it takes (``accepts``): depth-wise, 1x1,
large kernels, 1-D / 3-D, or a linear layer.

Checks: forward and a training step at batch 1 and 2; eval batch independence; state-dict round
trip; ``deepcopy`` and pickling; static initialisation (the same function where the layer says so);
the protocol's MAC counts against a count of the operations the forward runs; the official-style
forward; deploy folding (re-parameterized types); ONNX export with a dynamic batch axis and
onnxruntime parity. ``test_throwaway_layer_is_picked_up`` registers a new layer and runs them all.
"""
from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from conftest import randomize_norms
from mmengine.registry import MODELS
from torch import nn
from torch.overrides import TorchFunctionMode

import dynconv_mm  # noqa: F401  (registers every type)
from dynconv_mm.analysis.dynamic_flops import count_dynamic_flops, protocol_layers
from dynconv_mm.benchmark.macs import count_macs as benchmark_macs
from dynconv_mm.converters.static import convert_static_to_dynamic
from dynconv_mm.layers import allocate_warehouses, set_temperature
from dynconv_mm.layers.aux_loss import collect_aux_losses
from dynconv_mm.layers.base import ConvSpec, ExtraMacs, LayerProtocol, StaticInit, copy_static_bias, set_param
from dynconv_mm.layers.reparam.fuse import reparameterize_model
from dynconv_mm.layers.torch_internals import onnx_export_kwargs
from dynconv_mm.registry import register, registered_names


def contract_types() -> List[str]:
    """Every conv type dynconv_mm registers."""
    return registered_names('conv')


TYPES = contract_types()
C = 8  # channels of the hosts


# ------------------------------------------------------------------------------------------------
# hosts
_RESNET_CONVS = [ConvSpec(3, C, (7, 7), (2, 2), (3, 3)), ConvSpec(C, C, (3, 3), (1, 1), (1, 1)),
                 ConvSpec(C, 2 * C, (3, 3), (2, 2), (1, 1)), ConvSpec(C, 2 * C, (1, 1), (2, 2), (0, 0))]
_CANDIDATES = [dict(k=3, p=1, g=1), dict(k=1, p=0, g=1), dict(k=3, p=1, g=C), dict(k=5, p=2, g=1),
               dict(k=7, p=3, g=1)]


class ConvHost(nn.Module):
    """Two convolutions of one geometry (``build_conv_layer`` with ``conv_cfg``), each with a norm and
    a ReLU, then a global pool: the host of the types a ResNet does not suit."""

    def __init__(self, conv_cfg: Optional[dict], dims: int, k: int, p: int, g: int) -> None:
        super().__init__()
        from mmcv.cnn import build_conv_layer
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.stem = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, C, 1)
        self.conv1 = build_conv_layer(conv_cfg, C, C, k, stride=1, padding=p, groups=g, bias=False)
        self.bn1 = norm(C)
        self.conv2 = build_conv_layer(conv_cfg, C, C, k, stride=1, padding=p, groups=g, bias=False)
        self.bn2 = norm(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(x)))


class LinearHost(nn.Module):
    """Token features ``(B, L, C)`` through two linear layers of the type."""

    def __init__(self, name: Optional[str]) -> None:
        super().__init__()
        self.stem = nn.Linear(3, C)
        self.fc1 = MODELS.build(dict(type=name, in_features=C, out_features=C)) if name else nn.Linear(C, C)
        self.fc2 = MODELS.build(dict(type=name, in_features=C, out_features=C)) if name else nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.stem(x))))


def _geometry(cls) -> Tuple[str, dict]:
    """``('resnet', {})``, ``('conv', dict(dims, k, p, g))`` or ``('linear', {})`` for a type."""
    dims = cls.spatial_dims
    if 0 in dims:
        return 'linear', {}
    if 2 in dims and all(cls.accepts(s) is None for s in _RESNET_CONVS):
        return 'resnet', {}
    d = dims[0]
    for c in _CANDIDATES:
        spec = ConvSpec(C, C, (c['k'],) * d, (1,) * d, (c['p'],) * d, (1,) * d, c['g'], False, d)
        if cls.accepts(spec) is None:
            return 'conv', dict(dims=d, **c)
    raise AssertionError(f'{cls.__name__} accepts none of the contract geometries')


def build_host(name: Optional[str], cls, seed: int = 0) -> nn.Module:
    """The host of type ``name`` (``None``: the same network with plain convolutions, the twin)."""
    torch.manual_seed(seed)
    kind, geo = _geometry(cls)
    cfg = None if name is None else dict(type=name)
    if kind == 'resnet':
        host = MODELS.build(dict(type='mmpretrain.ResNet', depth=18, stem_channels=C, base_channels=C,
                                 num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(1,), conv_cfg=cfg))
    elif kind == 'linear':
        host = LinearHost(name)
    else:
        host = ConvHost(cfg or dict(type=f'Conv{geo["dims"]}d'), **geo)
    allocate_warehouses(host)  # KW layers of hosts built without a registry
    # non-trivial norms, so that folding and static starts are really tested
    return randomize_norms(host, seed=seed + 1)


def host_input(cls, batch: int, seed: int = 1) -> torch.Tensor:
    kind, geo = _geometry(cls)
    g = torch.Generator().manual_seed(seed)
    if kind == 'linear':
        return torch.randn(batch, 5, 3, generator=g)
    if kind == 'resnet':
        return torch.randn(batch, 3, 32, 32, generator=g)
    return torch.randn(batch, 3, *([9] * geo['dims']), generator=g)


def _mode(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)``, returning the module (mmpretrain's ``ResNet.train()`` returns None)."""
    module.train(training)
    return module


def _out(y):
    return y[-1] if isinstance(y, (tuple, list)) else y


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=rel * max(b.abs().max().item(), 1e-6))


def _cls(name: str):
    return MODELS.get(name)


# ------------------------------------------------------------------------------------------------
# the checks (plain functions, so that the throw-away layer test runs them too)
def check_protocol(name: str) -> None:
    cls = _cls(name)
    assert isinstance(cls, type) and issubclass(cls, LayerProtocol), f'{name} does not answer the layer protocol'
    assert cls.layer_kind in ('dynamic', 'reparam')
    host = build_host(name, cls)
    assert protocol_layers(host), f'no {name} layer in its host'


def check_train_step(name: str, batch: int) -> None:
    cls = _cls(name)
    host = _mode(build_host(name, cls), True)
    before = {k: v.detach().clone() for k, v in host.named_parameters()}
    opt = torch.optim.SGD(host.parameters(), lr=0.1)
    out = _out(host(host_input(cls, batch)))
    assert torch.isfinite(out).all()
    (out.square().mean() + collect_aux_losses(host)).backward()
    layers = [m for _, m in protocol_layers(host)]
    grads = [p.grad for m in layers for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f'{name}: no gradient reached the layers'
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in host.named_parameters()), 'the step changed nothing'


def check_batch_independence(name: str) -> None:
    cls = _cls(name)
    host = _mode(build_host(name, cls), False)
    x = host_input(cls, 3)
    with torch.no_grad():
        y = _out(host(x))
        for i in range(3):
            _close(_out(host(x[i:i + 1])), y[i:i + 1], 1e-5)


def check_state_dict_round_trip(name: str) -> None:
    cls = _cls(name)
    a, b = _mode(build_host(name, cls, seed=0), False), _mode(build_host(name, cls, seed=5), False)
    b.load_state_dict(a.state_dict(), strict=True)
    x = host_input(cls, 2)
    with torch.no_grad():
        _close(_out(b(x)), _out(a(x)), 1e-6)


def check_copies(name: str) -> None:
    cls = _cls(name)
    host = _mode(build_host(name, cls), False)
    x = host_input(cls, 2)
    with torch.no_grad():
        y = _out(host(x))
        _close(_out(copy.deepcopy(host)(x)), y, 1e-6)
        _close(_out(pickle.loads(pickle.dumps(host))(x)), y, 1e-6)


def check_static_init(name: str) -> None:
    cls = _cls(name)
    if not cls.supports_static_init():
        pytest.skip(f'{name} does not start from a static convolution (it says so)')
    twin = _mode(build_host(None, cls, seed=3), False)
    host = _mode(build_host(name, cls, seed=0), False)
    _, report = convert_static_to_dynamic(twin.state_dict(), host)
    assert not report.unplaced, report.unplaced
    layers = protocol_layers(host)
    assert set(report.layers) == {p for p, _ in layers}, report.layers
    x = host_input(cls, 2)
    if all(report.exact.values()):
        for path, t in report.temperatures.items():  # exact at the temperature the layer names
            set_temperature(host.get_submodule(path), t)
        with torch.no_grad():
            _close(_out(host(x)), _out(twin(x)), 1e-5)
    else:  # the layer says why it is not the same function
        assert all(report.layers[p] for p, exact in report.exact.items() if not exact)


def check_macs(name: str) -> None:
    """The protocol's counts against the operations one forward runs (counted by a torch function mode:
    convolutions, linear layers and matrix products as MACs, tensor-tensor multiplies by output size,
    means and average pools by input size), for every protocol layer of the host."""
    cls = _cls(name)
    host = _mode(build_host(name, cls), False)
    if cls.layer_kind == 'reparam':
        reparameterize_model(host)
    x = host_input(cls, 1)
    for path, layer in protocol_layers(host):
        counted, shapes = _count_ops(host, layer, x)
        in_shape, out_shape = shapes
        conv, extra = layer.conv_macs(in_shape, out_shape), layer.extra_macs(in_shape, out_shape)
        if cls.layer_kind == 'reparam':
            assert counted['layer'] + counted['attention'] == conv + extra.total - extra.pooling, path
            continue
        assert counted['pooling'] == extra.pooling, (path, counted, extra)
        assert counted['attention'] == extra.attention, (path, counted, extra)
        assert counted['layer'] == conv + extra.assembly, (path, counted, conv, extra)
    # get_flops.py's counter and the benchmark's give the same numbers
    flops = count_dynamic_flops(host, tuple(x.shape[1:]))
    bench = benchmark_macs(_mode(host, False), x)
    assert (flops.conv_flops, flops.attention_flops, flops.assembly_flops) == (
        bench['conv'], bench['attention'], bench['assembly'])


class _OpCounter(TorchFunctionMode):
    """MACs of the torch functions a forward calls, split by where they run: in a protocol layer's
    own code (``layer``), inside its other sub-modules (``attention``: convolutions, linear layers and
    products only), and the poolings anywhere."""

    _CONVS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
              torch.conv1d, torch.conv2d, torch.conv3d}
    _PRODUCTS = {torch.mm, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.addmm}
    _MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
    _POOLS = {torch.mean, torch.Tensor.mean, torch.nn.functional.adaptive_avg_pool2d}

    def __init__(self, stack: List[nn.Module]) -> None:
        super().__init__()
        self.stack = stack
        self.counts = dict(layer=0, attention=0, pooling=0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.stack:
            return out
        level = 'layer' if isinstance(self.stack[-1], LayerProtocol) else 'attention'
        macs = 0
        if func in self._CONVS:
            w = args[1] if len(args) > 1 else kwargs['weight']
            macs = out.numel() * w.shape[1] * math.prod(w.shape[2:])
        elif func is torch.nn.functional.linear:
            macs = out.numel() * args[1].shape[-1]
        elif func in self._PRODUCTS:
            a = args[1] if func is torch.addmm else args[0]
            macs = out.numel() * a.shape[-1]
        elif func in self._MULS and level == 'layer' and all(isinstance(t, torch.Tensor) for t in args[:2]):
            macs = out.numel()
        elif func in self._POOLS and isinstance(args[0], torch.Tensor) and out.numel() < args[0].numel():
            self.counts['pooling'] += args[0].numel()
        self.counts[level] += macs
        return out


def _count_ops(host: nn.Module, layer: nn.Module, x: torch.Tensor):
    stack: List[nn.Module] = []
    shapes: list = []
    handles = []
    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, out):
        stack.pop()

    def record(mod, args, out):
        shapes.extend([tuple(args[0].shape[1:]), tuple(_out(out).shape[1:])])

    for m in layer.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    handles.append(layer.register_forward_hook(record))
    counter = _OpCounter(stack)
    try:
        with counter, torch.enable_grad():  # grad mode: the PyTorch paths (native ones are for no_grad)
            host(x)
    finally:
        for h in handles:
            h.remove()
    return counter.counts, shapes[:2]


def check_reference(name: str) -> None:
    cls = _cls(name)
    host = _mode(build_host(name, cls), False)
    layers = [m for m in host.modules() if isinstance(m, LayerProtocol) and m.has_reference]
    if not layers:
        pytest.skip(f'{name} has no official-style forward')
    inputs = {}
    def keep(mod, args, out):
        inputs.setdefault(id(mod), (args[0], out))

    hooks = [m.register_forward_hook(keep) for m in layers]
    with torch.no_grad():
        host(host_input(cls, 2))
        for h in hooks:
            h.remove()
        for m in layers:
            xin, out = inputs[id(m)]
            _close(m.reference_forward(xin), out, 1e-5)


def check_deploy(name: str) -> None:
    cls = _cls(name)
    if cls.layer_kind != 'reparam':
        pytest.skip(f'{name} is not a re-parameterized type')
    host = _mode(build_host(name, cls), False)
    x = host_input(cls, 2)
    with torch.no_grad():
        y = _out(host(x))
        reparameterize_model(host)
        assert all(getattr(m, 'deploy', True) for _, m in protocol_layers(host))
        _close(_out(host(x)), y, 1e-5)


def check_onnx(name: str) -> None:
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')
    cls = _cls(name)
    host = _mode(build_host(name, cls), False)
    if cls.layer_kind == 'reparam':  # what is exported of a re-parameterized layer: its deploy form
        reparameterize_model(host)
    x = host_input(cls, 2)
    buf = io.BytesIO()
    axes = {'x': {0: 'batch'}, 'y': {0: 'batch'}}

    class Last(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return _out(self.m(x))

    with torch.no_grad():
        torch.onnx.export(_mode(Last(host), False), (x,), buf, input_names=['x'], output_names=['y'], dynamic_axes=axes,
                          opset_version=17, **onnx_export_kwargs())
    sess = ort.InferenceSession(buf.getvalue(), providers=['CPUExecutionProvider'])
    for b in (1, 3):
        xb = host_input(cls, b, seed=7)
        with torch.no_grad():
            ref = _out(host(xb))
        got = torch.from_numpy(sess.run(None, {'x': xb.numpy()})[0])
        _close(got, ref, 1e-4)


CHECKS: Dict[str, Callable[[str], None]] = dict(
    protocol=check_protocol, train_batch1=lambda n: check_train_step(n, 1),
    train_batch2=lambda n: check_train_step(n, 2),
    batch_independence=check_batch_independence, state_dict=check_state_dict_round_trip, copies=check_copies,
    static_init=check_static_init, macs=check_macs, reference=check_reference, deploy=check_deploy, onnx=check_onnx)


@pytest.mark.parametrize('check', list(CHECKS))
@pytest.mark.parametrize('name', TYPES)
def test_contract(name: str, check: str) -> None:
    CHECKS[check](name)


def test_every_type_is_in_the_suite():
    """The suite holds every registered type (17 in this release), and nothing else."""
    assert len(TYPES) >= 17 and {'KWConv2d', 'ODConv2d', 'RepVGGBlock', 'DynamicDWConv2d'} <= set(TYPES)


# ------------------------------------------------------------------------------------------------
# a throw-away layer: registering it is all it takes to be in the suite
class _ThrowawayConv2d(LayerProtocol, nn.Conv2d):
    """A plain convolution that answers the protocol (the smallest possible layer)."""

    has_reference = True

    def init_from_static(self, weight, bias=None, **options) -> StaticInit:
        rec = StaticInit(True, 'exact: the kernel itself')
        set_param(self, 'weight', weight)
        rec.from_static.append('weight')
        copy_static_bias(self, bias, rec)
        return rec

    def extra_macs(self, in_shape, out_shape) -> ExtraMacs:
        return ExtraMacs()

    def reference_forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)


def test_throwaway_layer_is_picked_up():
    from dynconv_mm import registry
    name = '_ThrowawayConv2d'
    register('conv')(_ThrowawayConv2d)
    try:
        assert name in contract_types()
        for check, fn in CHECKS.items():
            if check == 'deploy':
                continue  # not a re-parameterized type
            fn(name)
    finally:
        MODELS._module_dict.pop(name, None)
        registry._NAMES['conv'].discard(name)
    assert name not in contract_types()
