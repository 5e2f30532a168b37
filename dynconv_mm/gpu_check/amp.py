"""Part ``amp``: one fp16 step with a gradient scaler and one bf16 step for each published backbone.

Each backbone is built from its classification config (the backbone part, through the mmpretrain
``MODELS`` registry, so post-build steps such as KernelWarehouse's warehouse allocation run) at
reduced width and without stochastic depth or attention noise, so that the float32 and autocast
forwards of the same weights can be compared. A step: training forward under autocast, global
average pooling and a linear head, cross-entropy on fixed labels plus the auxiliary losses (PEDConv),
backward, optimizer step, at the temperature the config's training starts with. Checked: the loss and
every gradient are finite (fp16: after unscaling, at the first of :data:`FP16_SCALES` whose step the
scaler takes), and the output of every dynconv_mm layer in the backbone is within 2e-2 (relative to
its largest magnitude) of float32 given the same input (:func:`layer_errors`). The whole backbone's
output against float32 is reported too (``model_out_rel_diff``), but not checked: at random
initialisation a deep network amplifies rounding differences from layer to layer.
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .core import PartContext
from .hosts import disable_training_noise
from .precision import autocast, rel_diff, tf32

TOL = 2e-2
#: loss scales of the fp16 attempts: a gradient scaler skips a step whose gradients overflow and lowers
#: its scale (normal in the first steps of fp16 training); these jump through the range such a scaler
#: walks in halvings, and the report gives the scale of the step taken (below 1: gradients beyond the
#: float16 range even unscaled)
FP16_SCALES = (2.0 ** 16, 2.0 ** 8, 1.0, 2.0 ** -8, 2.0 ** -16)

#: (config, backbone overrides): every published backbone family, at a quarter of its width (or the
#: published half-width variant), stochastic depth off
BACKBONES: List[Tuple[str, Dict[str, Any]]] = [
    ('kernelwarehouse/kw1x-resnet50_8xb128-accum4_in1k.py', dict(base_channels=16, drop_path_rate=0.0)),
    ('kernelwarehouse/kw4x-resnet50_8xb128-accum4_in1k.py', dict(base_channels=16, drop_path_rate=0.0)),
    ('kernelwarehouse/kw1x-mobilenet-v2-050_8xb32_in1k.py', dict(drop_path_rate=0.0)),
    ('kernelwarehouse/kw1x-convnext-tiny_8xb128-accum4_in1k.py',
     dict(arch=dict(depths=[3, 3, 9, 3], channels=[24, 48, 96, 192]), drop_path_rate=0.0)),
    ('dwnet/dwnet-tiny_8xb128_in1k.py', dict(embed_dims=24, drop_path_rate=0.0)),
    ('dwnet/dynamic-dwnet-tiny_8xb128_in1k.py', dict(embed_dims=24, drop_path_rate=0.0)),
    ('pedconv/pedconv-resnet50_8xb64_in1k.py', dict(widen_factor=0.25)),
    ('orepa/orepa-resnet50_4xb64_in1k.py', dict(width_multiplier=0.25)),
    ('doconv/doconv-resnet50_8xb128_in1k.py', dict(base_channels=16, drop_path_rate=0.0)),
]


#: the dry run's backbones (KernelWarehouse, the dynamic depth-wise conv, a re-parameterized block)
DRY_BACKBONES = ('kw1x-resnet50_8xb128-accum4_in1k', 'dynamic-dwnet-tiny_8xb128_in1k', 'orepa-resnet50_4xb64_in1k')


def configs_dir() -> str:
    return osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs')


def build_backbone(config: str, overrides: Dict[str, Any]) -> Tuple[nn.Module, float]:
    """The backbone of ``configs/<config>`` with ``overrides``, built in the mmpretrain scope, at the
    temperature its training starts with (the config's ``TemperatureHook``; 1 without one), and that
    temperature. (Built, the layers are at the temperature of inference, where KernelWarehouse's
    attention normalisation has far larger gradients than at the start of training.)"""
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401  (registers the backbones)
    cfg = Config.fromfile(osp.join(configs_dir(), config))
    backbone = copy.deepcopy(cfg.model.backbone)
    for key, value in overrides.items():
        if key == 'drop_path_rate' and 'drop_path_rate' not in backbone and value == 0.0:
            continue  # absent means none (mmpretrain's ResNet default)
        backbone[key] = value
    backbone.pop('init_cfg', None)
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(backbone)
    if hasattr(model, 'init_weights'):
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel('WARNING')  # init_weights logs every parameter
        try:
            model.init_weights()  # as the Runner does before training (zero-initialised residual norms, ...)
        finally:
            logger.setLevel(level)
    from ..engine.hooks import TemperatureHook
    from ..layers import set_temperature
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') == 'TemperatureHook']
    start = TemperatureHook(**{k: v for k, v in hooks[0].items() if k != 'type'}).start if hooks else 1.0
    set_temperature(model, start)
    return model, start


def _features(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[-1]
    return out


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, channels: int, classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = _features(self.backbone(x))
        pooled = feats.float().mean(tuple(range(2, feats.dim()))) if feats.dim() > 2 else feats.float()
        return feats, self.head(pooled)


def _loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from ..engine import collect_aux_losses
    return nn.functional.cross_entropy(logits.float(), labels) + collect_aux_losses(model).float()


def _finite_grads(model: nn.Module) -> Tuple[bool, int]:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads), len(grads)


def _step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, device: str, precision: str) -> Dict[str, Any]:
    """One training step under ``precision``; the backbone output of its forward and what was checked."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    info: Dict[str, Any] = {}
    scales = FP16_SCALES if precision == 'fp16' else (None,)
    for attempt, scale in enumerate(scales):
        scaler = None if scale is None else torch.amp.GradScaler(
            'cuda' if device.startswith('cuda') else 'cpu', init_scale=scale)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            feats, logits = model(x)
            loss = _loss(model, logits, labels)
        if attempt == 0:
            info['feats'] = feats.detach()
            info['out_dtype'] = str(feats.dtype).replace('torch.', '')
        info['loss'] = float(loss.detach())
        if scaler is None:
            loss.backward()
            info['grads_finite'], info['grads'] = _finite_grads(model)
            opt.step()
            info['steps_skipped'] = 0
            return info
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        finite, info['grads'] = _finite_grads(model)
        scaler.step(opt)
        if finite:
            info.update(grads_finite=True, steps_skipped=attempt, scale=scale)
            return info
    info.update(grads_finite=False, steps_skipped=len(scales), scale=None)
    return info


def layer_errors(model: nn.Module, x: torch.Tensor, device: str, precision: str) -> Tuple[float, str, int]:
    """The largest relative difference between a dynconv_mm layer's output under ``precision`` autocast
    and in float32, each layer given the same float32 input (the one it sees in a float32 training-mode
    forward of ``model``); ``(difference, layer name, layers compared)``.

    Layer by layer, because a deep network at random initialisation (ResNet-50 without zero-initialised
    residual norms, stock convolutions included) amplifies any rounding difference from layer to layer:
    its end-to-end float16 output then differs from float32 by 10-50 %, whatever its layers do.
    """
    from ..registry import registered_names
    ours = set(registered_names('conv'))
    model = copy.deepcopy(model).train()
    captured: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ in ours}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, (inp[0], out)))
             for n, m in layers.items()]
    try:
        with torch.no_grad(), tf32(False):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    worst, where = 0.0, ''
    for name, (inp, out) in captured.items():
        layer = copy.deepcopy(layers[name])
        with torch.no_grad(), autocast(device, precision):
            rel = rel_diff(_features(layer(inp)), _features(out))
        if not rel <= worst:
            worst, where = rel, name
    return worst, where, len(captured)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Image-like inputs: smooth structure, a brightness and contrast of each sample's own, some noise.

    Unlike i.i.d. noise (whose every sample has the same statistics), such samples differ in their
    pooled features, as photographs do; layers that normalise pooled features over the batch (the
    dynamic depth-wise conv's kernel generator) see a realistic spread instead of rounding noise."""
    g = torch.Generator().manual_seed(seed)
    low = nn.functional.interpolate(torch.randn(batch, 3, max(size // 8, 1), max(size // 8, 1), generator=g),
                                    size=(size, size), mode='bilinear', align_corners=False)
    return (low * (0.5 + torch.rand(batch, 1, 1, 1, generator=g)) + 0.5 * torch.randn(batch, 3, 1, 1, generator=g)
            + 0.2 * torch.randn(batch, 3, size, size, generator=g))


def run(ctx: PartContext) -> None:
    # dry run: batch 8, so that batch norms over pooled features see a spread of samples
    batch, size = (8, 32) if ctx.dry_run else (32, 224)
    if ctx.dry_run:
        ctx.note(f'dry run: batch {batch}, {size} px on the CPU (CPU autocast: fp16 and bf16)')
    x_cpu = images(batch, size)
    labels_cpu = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    for config, overrides in BACKBONES:
        name = osp.splitext(osp.basename(config))[0]
        if ctx.dry_run and name not in DRY_BACKBONES:
            ctx.skip(name, 'dry run: three backbones of the nine')
            continue
        if not ctx.enough_time(10 if not ctx.dry_run else 3, name):
            break
        backbone, temperature = build_backbone(config, overrides)
        disable_training_noise(backbone)
        backbone.eval()  # (mmpretrain's ResNet.train() returns None: no chaining)
        with torch.no_grad():
            channels = _features(backbone(x_cpu[:1, :, :64, :64] if size > 64 else x_cpu[:1])).shape[1]
        torch.manual_seed(1)
        model = _Classifier(backbone, channels).to(ctx.device).train()
        x, labels = x_cpu.to(ctx.device), labels_cpu.to(ctx.device)
        with tf32(False):
            ref = _step(copy.deepcopy(model), x, labels, ctx.device, 'fp32')
        params = sum(p.numel() for p in model.parameters())
        for precision in ('fp16', 'bf16'):
            try:
                info = _step(copy.deepcopy(model), x, labels, ctx.device, precision)
            except Exception as err:
                ctx.row('steps', backbone=name, precision=precision, ok=False,
                        error=f'{type(err).__name__}: {err}'[:300])
                continue
            rel = rel_diff(info['feats'], ref['feats'])
            layer_rel, layer, n_layers = layer_errors(model, x, ctx.device, precision)
            finite_loss = bool(torch.isfinite(torch.tensor(info['loss'])))
            ok = finite_loss and info['grads_finite'] and layer_rel <= TOL
            ctx.row('steps', backbone=name, params_m=params / 1e6, temperature=temperature, precision=precision,
                    out_dtype=info['out_dtype'], loss=info['loss'], loss_fp32=ref['loss'],
                    grads_finite=info['grads_finite'], loss_scale=info.get('scale') if precision == 'fp16' else None,
                    layers=n_layers, worst_layer_rel_diff=layer_rel, worst_layer=layer, model_out_rel_diff=rel,
                    tol=TOL, ok=ok)
        del model
        if ctx.cuda:
            torch.cuda.empty_cache()
    rows = ctx.tables.get('steps', [])
    bad = [r for r in rows if not r['ok']]
    worst = max((r['worst_layer_rel_diff'] for r in rows if r.get('worst_layer_rel_diff') is not None), default=None)
    ctx.summary = (f'{len({r["backbone"] for r in rows})} backbones x fp16/bf16 at batch {batch}, {size} px: '
                   f'{len(bad)} failed; worst layer output rel diff {worst:.1e}' if worst is not None
                   else 'nothing ran')
