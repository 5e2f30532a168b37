"""Parts ``native_spy`` and ``parity``: the layers on the device against the CPU.

``native_spy``: the C kernels of :mod:`dynconv_mm.layers.native` are for float32 CPU tensors; on CUDA
every layer must take its PyTorch path. A spy records every call of the native entry points (with the
devices of their tensors and whether they computed) and of the compiled library's functions, while
every registered layer's host and two backbones run on the device in training, evaluation, ``no_grad``
and ``inference_mode``. The same run on the CPU is the control: there the spy must see the kernels.

``parity``: every registered conv type (its host, :mod:`.hosts`) computes the same forward and
gradients on the device as on the CPU, at batch 1 and 3, in float32 with TF32 off (relative 1e-5)
and on (1e-2). Outputs are compared by their largest entry; gradients by norm, per tensor in float32
(:func:`.precision.grad_diffs`) and as one vector with TF32 (:func:`.precision.total_grad_diff`: its
10-bit products may flip a ReLU inside a layer, which throws a small tensor but not the whole).
And every ``batched_conv`` form agrees with a float64 per-sample loop on the device.
In the dry run the "device" is the CPU with the native kernels off, so the CPU's two paths are
compared with each other (what CUDA's PyTorch path is compared with on a GPU).
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

from .core import PartContext
from .hosts import build_host, disable_training_noise, host_input, host_objective, layer_hosts
from .precision import grad_diffs, rel_diff, tf32, total_grad_diff

ENTRY_POINTS = ('kw_assemble_into', 'kw_assemble_backward', 'dynamic_dw_forward', 'odconv_kernels')
TOL = {'fp32': 1e-5, 'tf32': 1e-2}
MODES = ('train', 'eval', 'no_grad', 'inference_mode')


# ------------------------------------------------------------------------------------------ the spy
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _computed(out: Any) -> bool:
    if isinstance(out, tuple):  # kw_assemble_backward: (done, attention gradient)
        return bool(out[0])
    if isinstance(out, bool):
        return out
    return out is not None


def _patch_everywhere(original: Any, replacement: Any) -> List[Tuple[Any, str]]:
    """Replace ``original`` by ``replacement`` in every loaded dynconv_mm module that refers to it."""
    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == 'dynconv_mm' or name.startswith('dynconv_mm.')):
            continue
        for key, value in list(vars(module).items()):
            if value is original:
                setattr(module, key, replacement)
                patched.append((module, key))
    return patched


class _LibrarySpy:
    """Stands for the compiled library: records every kernel call, then makes it."""

    def __init__(self, lib, calls: List[str]) -> None:
        self._lib, self._calls = lib, calls

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not name.startswith('dcmm_') or name == 'dcmm_has_openmp':
            return fn

        def call(*args):
            self._calls.append(name)
            return fn(*args)
        return call


@contextlib.contextmanager
def spy_native() -> Iterator[Dict[str, list]]:
    """Record native entry-point calls (``entries``: ``(name, device types, computed)``) and compiled
    kernel calls (``kernels``: function names) while the context is open."""
    from ..layers import native

    record: Dict[str, list] = dict(entries=[], kernels=[])
    undo: List[Tuple[Any, str, Any]] = []
    for name in ENTRY_POINTS:
        original = getattr(native, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            devices = sorted({t.device.type for t in _tensors((args, kwargs))})
            record['entries'].append((_name, devices, _computed(out)))
            return out
        undo += [(m, k, original) for m, k in _patch_everywhere(original, wrapped)]
    original_library = native.native_library

    def library():
        lib = original_library()
        return None if lib is None else _LibrarySpy(lib, record['kernels'])
    undo += [(m, k, original_library) for m, k in _patch_everywhere(original_library, library)]
    try:
        yield record
    finally:
        for module, key, value in reversed(undo):
            setattr(module, key, value)


def _spy_models(dry_run: bool) -> List[Tuple[str, nn.Module, torch.Tensor]]:
    """(name, model on the CPU, input) for two backbones and every registered layer's host. The backbones
    come first: their warehouses are large enough for the native KW assembly (a host's are not)."""
    from ..backbones.dwnet import DWNet
    from ..backbones.kw_resnet import KWResNet
    size = 32 if dry_run else 64
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    kw_resnet = KWResNet(depth=18, base_channels=16)
    dwnet = DWNet(embed_dims=16, depths=[1, 1, 1, 1], dynamic=True, drop_path_rate=0.0)
    models = [('KWResNet-18 (base 16)', kw_resnet, torch.randn(3, 3, size, size, generator=g)),
              ('dynamic DWNet (16, depths 1-1-1-1)', dwnet, torch.randn(3, 3, size, size, generator=g))]
    for host in layer_hosts():
        model = build_host(host)
        disable_training_noise(model)
        models.append((host.name, model, host_input(host, 3)))
    return models


def _last(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[-1]
    return out


def _run_mode(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    for p in model.parameters():
        p.grad = None
    if mode in ('train', 'eval'):
        model.train(mode == 'train')
        out = _last(model(x))
        host_objective(model, out).backward()
        return
    model.eval()
    ctx = torch.no_grad() if mode == 'no_grad' else torch.inference_mode()
    with ctx:
        model(x)


def run_spy(ctx: PartContext) -> None:
    from ..layers.native import native_library, native_status
    models = _spy_models(ctx.dry_run)
    devices = ['cpu'] + ([ctx.device] if ctx.cuda else [])
    if not ctx.cuda:
        ctx.cuda_only('the run on CUDA tensors (the CPU control run below shows the spy sees the kernels)')
    native_on = native_library() is not None
    ctx.note(f'native kernels: {native_status()}')
    control_kernels = 0
    for device in devices:
        for name, model, x in models:
            if not ctx.enough_time(5, f'{name} on {device}'):
                break
            model = copy.deepcopy(model).to(device)
            xd = x.to(device)
            for mode in MODES:
                with spy_native() as record:
                    _run_mode(model, xd, mode)
                entries = record['entries']
                kernels = len(record['kernels'])
                on_cuda = [e for e in entries if any(d != 'cpu' for d in e[1])]
                computed_cuda = sum(e[2] for e in on_cuda)
                row = dict(model=name, device=device, mode=mode, entry_calls=len(entries),
                           entry_calls_with_cuda_tensors=len(on_cuda), computed=sum(e[2] for e in entries),
                           kernel_calls=kernels)
                if device != 'cpu':
                    row['ok'] = kernels == 0 and computed_cuda == 0
                else:
                    control_kernels += kernels
                ctx.row('calls', **row)
    if native_on:
        ctx.row('control', check='the spy sees the native kernels in the CPU run', kernel_calls=control_kernels,
                ok=control_kernels > 0)
    else:
        ctx.note('the native kernels are not built here: the CPU control cannot see kernel calls')
    cuda_rows = [r for r in ctx.tables.get('calls', []) if r['device'] != 'cpu']
    if ctx.cuda:
        bad = [r for r in cuda_rows if not r.get('ok')]
        ctx.summary = (f'{len(cuda_rows)} model x mode runs on {ctx.device}: ' +
                       ('no native kernel entered' if not bad else f'{len(bad)} entered a native kernel'))
    else:
        ctx.summary = (f'CPU control: {control_kernels} native kernel calls seen over {len(models)} models x '
                       f'{len(MODES)} modes')


# ------------------------------------------------------------------------------------------ parity
@contextlib.contextmanager
def _native_off() -> Iterator[None]:
    saved = os.environ.get('DYNCONV_MM_NATIVE')
    os.environ['DYNCONV_MM_NATIVE'] = '0'
    try:
        yield
    finally:
        if saved is None:
            del os.environ['DYNCONV_MM_NATIVE']
        else:
            os.environ['DYNCONV_MM_NATIVE'] = saved


def _train_step(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Training forward and backward; returns the output and the gradients (input as ``'input'``)."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    model.train()
    out = _last(model(x))
    host_objective(model, out).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads['input'] = x.grad
    return out.detach(), grads


def _eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return _last(model(x))


def _worst(grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Tuple[str, float]:
    worst, name = 0.0, ''
    for key, r in grad_diffs(grads, ref).items():
        if not r <= worst:  # also catches NaN
            worst, name = r, key
    return name, worst


def _layer_parity(ctx: PartContext) -> None:
    precisions = ('fp32', 'tf32') if ctx.cuda else ('fp32',)
    if not ctx.cuda:
        ctx.cuda_only('TF32 rows (TF32 is a CUDA setting)')
    device_ctx = contextlib.nullcontext if ctx.cuda else _native_off
    for host in layer_hosts():
        if not ctx.enough_time(5, f'parity of {host.name}'):
            break
        cpu = build_host(host)
        disable_training_noise(cpu)
        dev = copy.deepcopy(cpu).to(ctx.device)
        ref64 = copy.deepcopy(cpu).double()
        for batch in (1, 3):
            x = host_input(host, batch)
            for precision in precisions:
                # every round starts from the CPU model's state (running statistics included)
                dev.load_state_dict(cpu.state_dict())
                ref64.load_state_dict(cpu.state_dict())
                y64, g64 = _train_step(ref64, x.double())
                e64 = _eval_forward(ref64, x.double())
                y_cpu, g_cpu = _train_step(cpu, x)
                e_cpu = _eval_forward(cpu, x)
                with tf32(precision == 'tf32'), device_ctx():
                    y_dev, g_dev = _train_step(dev, x.to(ctx.device))
                    e_dev = _eval_forward(dev, x.to(ctx.device))
                grad_name, grad_rel = _worst(g_dev, g_cpu)
                grad_total = total_grad_diff(g_dev, g_cpu)
                fwd_rel, eval_rel = rel_diff(y_dev, y_cpu), rel_diff(e_dev, e_cpu)
                tol = TOL[precision]
                # float32: every gradient tensor within the tolerance; TF32: the gradient as a whole
                grad_checked = grad_rel if precision == 'fp32' else grad_total
                ctx.row('layers', layer=host.name, batch=batch, precision=precision,
                        train_fwd=fwd_rel, eval_fwd=eval_rel, grad=grad_total, worst_grad=grad_rel,
                        worst_grad_of=grad_name,
                        device_vs_f64=max(rel_diff(y_dev, y64), _worst(g_dev, g64)[1], rel_diff(e_dev, e64)),
                        cpu_vs_f64=max(rel_diff(y_cpu, y64), _worst(g_cpu, g64)[1], rel_diff(e_cpu, e64)),
                        tol=tol, ok=max(fwd_rel, eval_rel, grad_checked) <= tol)


#: (name, input shape, per-sample kernel shape, conv keyword arguments)
BATCHED_SHAPES = [
    ('3x3', (3, 16, 12, 12), (32, 16, 3, 3), dict(padding=1)),
    ('3x3 stride 2 groups 2', (3, 16, 12, 12), (32, 8, 3, 3), dict(stride=2, padding=1, groups=2)),
    ('3x3 dilation 2', (3, 16, 12, 12), (16, 16, 3, 3), dict(padding=2, dilation=2)),
    ('1x1', (3, 32, 10, 10), (64, 32, 1, 1), {}),
    ('1x1 stride 2', (3, 32, 10, 10), (16, 32, 1, 1), dict(stride=2)),
    ('7x7 depth-wise', (3, 24, 14, 14), (24, 1, 7, 7), dict(padding=3, groups=24)),
    ('1-D k3', (3, 16, 20), (16, 16, 3), dict(padding=1)),
    ('3-D k3', (3, 8, 5, 6, 6), (8, 8, 3, 3, 3), dict(padding=1)),
]


def _impls_for(kernel: Tuple[int, ...], kwargs: dict, ndim: int) -> List[str]:
    impls = ['auto', 'grouped', 'loop']
    if ndim in (1, 2):
        impls.append('unfold')
    if all(k == 1 for k in kernel) and not kwargs.get('padding'):
        impls.append('matmul')
    return impls


def _batched_parity(ctx: PartContext) -> None:
    from ..layers.batched import batched_conv, reference_batched_conv, resolve_impl
    g = torch.Generator().manual_seed(3)
    for name, xs, ws, kwargs in BATCHED_SHAPES:
        if not ctx.enough_time(2, f'batched_conv {name}'):
            break
        B = xs[0]
        fan_in = 1
        for v in ws[1:]:
            fan_in *= v
        x = torch.randn(xs, generator=g, dtype=torch.float64)
        w = torch.randn((B,) + ws, generator=g, dtype=torch.float64) / fan_in ** 0.5
        bias = torch.randn(B, ws[0], generator=g, dtype=torch.float64)
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, bias))
        ref = reference_batched_conv(xr, wr, br, **kwargs)
        cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ref.backward(cot)
        ndim = len(xs) - 2
        for impl in _impls_for(ws[2:], kwargs, ndim):
            xd, wd, bd = (t.to(ctx.device, torch.float32).requires_grad_(True) for t in (x, w, bias))
            with tf32(False):
                out = batched_conv(xd, wd, bd, impl=impl, **kwargs)
                out.backward(cot.to(ctx.device, torch.float32))
            resolved = impl if impl != 'auto' else resolve_impl(
                'auto', xd, B, ndim, ws[2:], _pad(kwargs.get('padding', 0), ndim), ws, _positions(ref),
                kwargs.get('groups', 1))
            grads = grad_diffs(dict(x=xd.grad, w=wd.grad, bias=bd.grad), dict(x=xr.grad, w=wr.grad, bias=br.grad))
            rels = dict(fwd=rel_diff(out, ref), grad_x=grads['x'], grad_w=grads['w'], grad_bias=grads['bias'])
            ctx.row('batched_conv', shape=name, impl=impl if impl != 'auto' else f'auto ({resolved})', **rels,
                    tol=TOL['fp32'], ok=max(rels.values()) <= TOL['fp32'])


def _pad(p, ndim: int):
    return (p,) * ndim if isinstance(p, int) else tuple(p)


def _positions(out: torch.Tensor) -> int:
    n = 1
    for v in out.shape[2:]:
        n *= int(v)
    return n


def run_parity(ctx: PartContext) -> None:
    if not ctx.cuda:
        ctx.note('dry run: the device side is the CPU with the native kernels off (DYNCONV_MM_NATIVE=0), '
                 'so each row compares the CPU native path with the PyTorch path CUDA takes')
    _batched_parity(ctx)
    _layer_parity(ctx)
    layers = ctx.tables.get('layers', [])
    batched = ctx.tables.get('batched_conv', [])
    bad = [r for r in layers + batched if not r['ok']]
    worst = {p: max((max(r['train_fwd'], r['eval_fwd'], r['worst_grad'] if p == 'fp32' else r['grad'])
                     for r in layers if r['precision'] == p), default=None) for p in TOL}
    ctx.finding('worst_rel_diff', worst)
    ctx.summary = (f'{len({r["layer"] for r in layers})} layer types x batch 1/3, {len(batched)} batched_conv rows; '
                   f'worst fp32 {_g(worst["fp32"])}, tf32 {_g(worst["tf32"])}; {len(bad)} outside tolerance')


def _g(v) -> str:
    return '-' if v is None else f'{v:.1e}'
