"""The mmpretrain ImageNet configs, their metafiles and the model index.

* every classification config loads, builds through mmpretrain's ``MODELS``, runs one training step
  (with the optimizer its ``optim_wrapper`` describes, its custom hooks wired as a Runner would) and a
  test step on two tiny images;
* the built model's parameter count equals the metafile's ``Parameters``, and those round to the
  numbers the official code builds (the README anchors);
* weight-decay / lr-multiplier rules and lr schedules reproduce the official trainers' rules;
* ``model-index.yml`` imports every metafile; every metafile entry points to an existing config.
"""
from __future__ import annotations

import copy
import functools
import glob
import math
import os.path as osp
import re
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
import yaml
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_DIR = osp.join(ROOT, 'configs')


def _classification_configs() -> List[str]:
    """ImageNet configs of the method folders (``*_in1k.py``; detection / segmentation configs share the
    folders, ``_base_`` and other ``_*_`` folders hold no published models)."""
    paths = sorted(glob.glob(osp.join(CONFIG_DIR, '*', '*_in1k.py')))
    return [osp.relpath(p, ROOT) for p in paths if not osp.basename(osp.dirname(p)).startswith('_')]


CONFIGS = _classification_configs()


@functools.lru_cache(maxsize=None)
def _load_cached(path: str) -> Config:
    return Config.fromfile(osp.join(ROOT, path))


def _load(path: str) -> Config:
    """The config (parsed once per session; a copy, free to modify)."""
    return copy.deepcopy(_load_cached(path))


def test_classification_configs_turn_cudnn_benchmark_on():
    """Fixed 224 px crops: cuDNN times its algorithms once per shape and keeps the fastest on GPUs; the
    rest of mmpretrain's ``env_cfg`` (NCCL, multiprocessing) is inherited unchanged."""
    for path in CONFIGS:
        env = _load_cached(path).env_cfg
        assert env.cudnn_benchmark is True, path
        assert env.dist_cfg.backend == 'nccl' and 'mp_cfg' in env, path


def _metafiles() -> Dict[str, dict]:
    return {osp.relpath(p, ROOT): yaml.safe_load(open(p)) for p in sorted(glob.glob(osp.join(CONFIG_DIR, '*',
                                                                                            'metafile.yml')))}


def _metafile_models() -> Dict[str, dict]:
    """Config path -> metafile model entry."""
    out = {}
    for meta in _metafiles().values():
        for m in meta['Models']:
            if _is_classification(m):
                out[m['Config']] = m
    return out


def _is_classification(model: dict) -> bool:
    return any(r.get('Task') == 'Image Classification' for r in model.get('Results', []))


# Parameter counts of the official implementations, in millions (README tables; KernelWarehouse and
# DWNet as built by the official code, see OFFICIAL_NOTES: the KW README's 4.08M for ResNet-18 1/4x is
# 4.03M in the official code). OREPA / PEDConv / DO-Conv: official models built on the CPU (training
# forms; PEDConv includes its info-max decoders).
PUBLISHED_PARAMS_M = {
    'kw1d4x-resnet18_3rdparty_8xb128-accum4_in1k': 4.03,
    'kw1d2x-resnet18_3rdparty_8xb128-accum4_in1k': 7.43,
    'kw1x-resnet18_3rdparty_8xb128-accum4_in1k': 11.93,
    'kw2x-resnet18_3rdparty_8xb128-accum4_in1k': 23.24,
    'kw4x-resnet18_3rdparty_8xb128-accum4_in1k': 45.86,
    'kw1d2x-resnet50_3rdparty_8xb128-accum4_in1k': 17.64,
    'kw1x-resnet50_3rdparty_8xb128-accum4_in1k': 28.05,
    'kw4x-resnet50_3rdparty_8xb128-accum4_in1k': 102.02,
    'kw1x-convnext-tiny_3rdparty_8xb128-accum4_in1k': 39.37,
    'kw1d2x-mobilenet-v2_3rdparty_8xb32_in1k': 2.65,
    'kw1x-mobilenet-v2_3rdparty_8xb32_in1k': 5.17,
    'kw4x-mobilenet-v2_3rdparty_8xb32_in1k': 11.38,
    'kw1d2x-mobilenet-v2-050_3rdparty_8xb32_in1k': 1.47,
    'kw1x-mobilenet-v2-050_3rdparty_8xb32_in1k': 2.85,
    'kw4x-mobilenet-v2-050_3rdparty_8xb32_in1k': 4.65,
    'dwnet-tiny_3rdparty_8xb128_in1k': 24.17,
    'dynamic-dwnet-tiny_3rdparty_8xb128_in1k': 51.13,
    'dwnet-base_3rdparty_16xb64-accum2_in1k': 74.35,
    'dynamic-dwnet-base_3rdparty_16xb64-accum2_in1k': 161.60,
    'pedconv-resnet18_3rdparty_8xb64_in1k': 12.14,
    'pedconv-resnet50_8xb64_in1k': 31.57,
    'orepa-resnet18_3rdparty_4xb64_in1k': 37.76,
    'orepa-resnet50_3rdparty_4xb64_in1k': 68.58,
    # DO-Conv training form: the plain ResNet plus D (C_in x 9 x 9 per 3x3 conv, 7x7 stem C_in x 49 x 49)
    'doconv-resnet18_4xb256_in1k': 11.97,
    'doconv-resnet50_8xb128_in1k': 25.87,
}
# configs that are not models of their own in a metafile: the re-parameterized inference forms
DEPLOY_PARAMS_M = {
    'configs/orepa/orepa-resnet18_deploy_in1k.py': 11.68,
    'configs/orepa/orepa-resnet50_deploy_in1k.py': 25.53,
}


@pytest.fixture(scope='module')
def mmpretrain_scope():
    pytest.importorskip('mmpretrain')
    from mmengine.registry import init_default_scope

    import dynconv_mm  # noqa: F401
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS


def _fake_batch(num_classes: int = 1000, size: int = 64):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample().set_gt_label(i * 7 % num_classes) for i in range(2)]
    return dict(inputs=inputs, data_samples=samples)


def _param_groups_by_name(model, optim_wrapper) -> Dict[str, dict]:
    by_id = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            by_id[id(p)] = group
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def _check_optimizer_rules(cfg: Config, model, optim_wrapper) -> None:
    """The official trainers' weight-decay and lr-multiplier rules, checked on the built model."""
    opt = cfg.optim_wrapper.optimizer
    base_lr, base_wd = opt.lr, opt.weight_decay
    groups = _param_groups_by_name(model, optim_wrapper)
    assert len(groups) == len(list(model.named_parameters()))
    paramwise = cfg.optim_wrapper.get('paramwise_cfg', {})
    custom = paramwise.get('custom_keys', {})
    for name, group in groups.items():
        p = model.get_parameter(name)
        if paramwise.get('flat_decay_mult') == 0.0:
            # timm / Swin: no decay on 1-D parameters and biases, full decay elsewhere
            no_decay = p.ndim == 1 or name.endswith('.bias')
            assert group['weight_decay'] == (0.0 if no_decay else base_wd), name
            assert group['lr'] == base_lr, name
        elif set(custom) == {'bias', 'bn', 'prior'}:
            # OREPA train.py: no decay on "bias"/"bn"/"prior" keys, 2x lr on "bias" keys
            no_decay = any(k in name for k in ('bias', 'bn', 'prior'))
            assert group['weight_decay'] == (0.0 if no_decay else base_wd), name
            assert group['lr'] == (2 * base_lr if 'bias' in name else base_lr), name
        elif set(custom) == {'bn'}:
            # NVIDIA trainer (PEDConv): no decay on parameters whose name contains "bn"
            assert group['weight_decay'] == (0.0 if 'bn' in name else base_wd), name
        else:
            # GluonCV without --no-wd: every parameter decays
            assert not paramwise, 'a config with an unrecognised decay rule'
            assert group['weight_decay'] == base_wd and group['lr'] == base_lr, name


def _expected_temperature_epochs(path: str) -> int:
    return 15 if 'mobilenet-v2' in path else 20


def _build(cfg: Config, registry):
    model_cfg = cfg.model.copy()
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))  # as the Runner does
    return registry.build(model_cfg)


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p)[:-3] for p in CONFIGS])
def test_config_builds_the_published_model(path, mmpretrain_scope):
    """The full-size model: its parameter count is the metafile's (and so the official one)."""
    cfg = _load(path)
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.custom_imports == dict(imports=['dynconv_mm'], allow_failed_imports=False)
    model = _build(cfg, mmpretrain_scope)
    n_params = sum(p.numel() for p in model.parameters())
    meta = _metafile_models().get(path)
    if meta is not None:
        assert n_params == meta['Metadata']['Parameters']
    else:
        assert path in DEPLOY_PARAMS_M, f'{path} is in no metafile'
        assert round(n_params / 1e6, 2) == DEPLOY_PARAMS_M[path]


def _slim(cfg: Config) -> None:
    """Quarter the widths (and keep one block per stage where the type allows) of the config's model, in
    place: everything else of the config (blocks, dynamic layers, head, loss, augments, optimizer, hooks)
    is kept. A full-size KernelWarehouse step assembles every kernel per image whatever the input size
    (tens of GFLOPs for the 4x models), too slow for a unit test on two CPU cores."""
    bb, head = cfg.model.backbone, cfg.model.head
    t = bb.type
    if t == 'KWResNet':
        bb.update(base_channels=16, stage_blocks=(1, 1, 1, 1))
        head.in_channels //= 4
    elif t == 'KWMobileNetV2':
        bb.widen_factor = bb.widen_factor / 2
    elif t == 'KWConvNeXt':
        bb.arch = dict(depths=[1, 1, 2, 1], channels=[24, 48, 96, 192])
        head.in_channels = 192
    elif t == 'DWNet':
        bb.update(embed_dims=32, depths=[1, 1, 2, 1])
        head.in_channels = 256
    elif t == 'PEDResNet':
        bb.widen_factor = 0.25
        head.in_channels //= 4
    elif t == 'ResNet':
        bb.update(stem_channels=16, base_channels=16)
        head.in_channels //= 4
    elif t == 'OREPAResNet':
        bb.width_multiplier = 0.25
        head.in_channels //= 4
    else:
        raise AssertionError(f'no slimming rule for backbone {t}')


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p)[:-3] for p in CONFIGS])
def test_config_trains_and_tests(path, mmpretrain_scope):
    """One training step with the config's optimizer, hooks and augments, then a test step (slimmed widths)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import HOOKS

    from dynconv_mm.engine import AuxLossHook, TemperatureHook, linear_temperature
    from dynconv_mm.layers import get_temperature

    cfg = _load(path)
    _slim(cfg)
    model = _build(cfg, mmpretrain_scope)
    model.init_weights()

    # the hooks a Runner would run around the training step
    hooks = [HOOKS.build(h) for h in cfg.get('custom_hooks', [])]
    temp_hooks = [h for h in hooks if isinstance(h, TemperatureHook)]
    aux_hooks = [h for h in hooks if isinstance(h, AuxLossHook)]
    if 'kernelwarehouse' in path:
        assert len(temp_hooks) == 1, 'KernelWarehouse configs anneal the temperature'
        runner = SimpleNamespace(model=model, iter=0, train_dataloader=[None] * 10)
        temp_hooks[0].before_train_iter(runner, 0)
        total = 10 * _expected_temperature_epochs(path)
        assert get_temperature(model) == pytest.approx(linear_temperature(1, total, 1.0, 0.0))
    else:
        assert not temp_hooks
    if 'pedconv' in path:
        assert len(aux_hooks) == 1 and aux_hooks[0].loss_weight == 0.001
    for h in aux_hooks:
        assert h.attach(model) > 0

    wrapper_cfg = cfg.optim_wrapper.copy()
    wrapper_cfg.pop('accumulative_counts', None)  # one optimizer step per train_step here
    optim_wrapper = build_optim_wrapper(model, wrapper_cfg)
    _check_optimizer_rules(cfg, model, optim_wrapper)

    before = [p.detach().clone() for p in model.backbone.parameters()]
    model.train()
    try:
        log_vars = model.train_step(_fake_batch(), optim_wrapper)
    finally:
        for h in aux_hooks:
            h.detach()
    assert torch.isfinite(log_vars['loss'])
    if aux_hooks:
        assert 'loss_aux_infomax' in log_vars and log_vars['loss_aux_infomax'] > 0
    after = list(model.backbone.parameters())
    changed = sum(not torch.equal(b, a) for b, a in zip(before, after))
    assert changed > len(after) // 2, f'the training step changed only {changed} of {len(after)} tensors'

    model.eval()
    out = model.test_step(_fake_batch())
    assert len(out) == 2
    assert out[0].pred_score.shape == (1000, ) and torch.isfinite(out[0].pred_score).all()


def test_model_index_imports_every_metafile():
    index = yaml.safe_load(open(osp.join(ROOT, 'model-index.yml')))
    imports = set(index['Import'])
    metafiles = {osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', 'metafile*.yml'))}
    assert set(_metafiles()) <= imports
    assert imports == metafiles
    for p in imports:
        assert osp.isfile(osp.join(ROOT, p)), p


def test_metafiles_are_complete_and_consistent():
    names, all_names = set(), set()
    in_metafile = set()
    for mpath, meta in _metafiles().items():
        collections = {c['Name']: c for c in meta['Collections']}
        for c in collections.values():
            assert c['Paper']['Title'] and c['Paper']['URL'].startswith('https://')
            assert c['Code']['URL'].startswith('https://github.com/')
            assert osp.isfile(osp.join(ROOT, c['README']))
        for m in meta['Models']:
            assert m['Name'] not in all_names, f'duplicate model name {m["Name"]}'
            all_names.add(m['Name'])
            assert m['In Collection'] in collections
            assert osp.isfile(osp.join(ROOT, m['Config'])), m['Config']
            if not _is_classification(m):
                continue  # detection / segmentation entries are checked by their own tests
            names.add(m['Name'])
            cfg_path = m['Config']
            assert osp.isfile(osp.join(ROOT, cfg_path)), cfg_path
            assert osp.dirname(cfg_path) == osp.dirname(mpath)
            in_metafile.add(cfg_path)
            md = m['Metadata']
            assert md['Training Data'] == 'ImageNet-1k'
            assert isinstance(md['Parameters'], int) and isinstance(md['FLOPs'], int) and md['FLOPs'] > 0
            # the parameter count is the official models' (README / official code)
            assert round(md['Parameters'] / 1e6, 2) == PUBLISHED_PARAMS_M[m['Name']], m['Name']
            res = m['Results'][0]
            assert res['Task'] == 'Image Classification' and res['Dataset'] == 'ImageNet-1k'
            assert 0 < res['Metrics']['Top 1 Accuracy'] < 100
            # no hosted weights: converted-from information for every released checkpoint
            assert 'Weights' not in m
            if '_3rdparty_' in m['Name']:
                assert m['Converted From']['Weights'].startswith('https://')
                assert m['Converted From']['Code'] == collections[m['In Collection']]['Code']['URL']
            else:
                assert 'Converted From' not in m
            # total batch of the name: GPUs x batch per GPU x accumulation steps
            cfg = _load(cfg_path)
            gpus, per_gpu, accum = _batch_from_name(cfg_path)
            assert cfg.train_dataloader.batch_size == per_gpu
            assert cfg.optim_wrapper.get('accumulative_counts', 1) == accum
            assert md['Batch Size'] == gpus * per_gpu * accum
            assert md['Epochs'] == cfg.train_cfg.max_epochs
    assert set(CONFIGS) - in_metafile == set(DEPLOY_PARAMS_M)
    assert set(PUBLISHED_PARAMS_M) == names


def _batch_from_name(path: str):
    m = re.search(r'_(\d+)xb(\d+)(?:-accum(\d+))?_in1k\.py$', path)
    assert m, f'{path} does not follow {{model}}_{{gpus}}xb{{batch}}[-accum{{k}}]_in1k.py'
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)


# ----------------------------------------------------------------------------------------- lr schedules
def _simulate_lr(cfg: Config, epochs: int, iters_per_epoch: int) -> List[float]:
    """The lr of every iteration under the config's param_scheduler (mmengine's own schedulers)."""
    import mmengine.optim  # noqa: F401  (registers the schedulers)
    from mmengine.registry import PARAM_SCHEDULERS as REG

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.optim_wrapper.optimizer.lr)
    scheds = []
    for s in cfg.param_scheduler:
        s = dict(s)
        cls = REG.get(s.pop('type'))
        if s.pop('convert_to_iter_based', False):
            scheds.append(cls.build_iter_from_epoch(opt, epoch_length=iters_per_epoch, **s))
        else:
            scheds.append(cls(opt, **s))
    lrs = []
    for _ in range(epochs):
        for _ in range(iters_per_epoch):
            lrs.append(opt.param_groups[0]['lr'])
            opt.step()
            for s in scheds:
                if not s.by_epoch:
                    s.step()
        for s in scheds:
            if s.by_epoch:
                s.step()
    return lrs


def _convnext_cosine(t, total, warmup, base, final):  # KernelWarehouse (ConvNeXt utils.cosine_scheduler)
    if t < warmup:
        return base * t / (warmup - 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def _swin_cosine(t, total, warmup, base, warmup_lr, final):  # DWNet (timm CosineLRScheduler, no prefix)
    if t < warmup:
        return warmup_lr + (base - warmup_lr) * t / warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / total))


IPE = 12  # iterations per epoch of the simulation


@pytest.mark.parametrize('path, official, warmup_iters, tol', [
    # KernelWarehouse: ConvNeXt's cosine_scheduler (linspace warm-up from 0, cosine to min_lr), per iteration
    ('configs/kernelwarehouse/kw1x-resnet18_8xb128-accum4_in1k.py',
     lambda t: _convnext_cosine(t, 300 * IPE, 20 * IPE, 4e-3, 1e-6), 0, 1e-4),
    ('configs/kernelwarehouse/kw1x-convnext-tiny_8xb128-accum4_in1k.py',
     lambda t: _convnext_cosine(t, 300 * IPE, 20 * IPE, 4e-3, 1e-6), 0, 1e-4),
    ('configs/kernelwarehouse/kw1x-mobilenet-v2_8xb32_in1k.py',
     lambda t: _convnext_cosine(t, 150 * IPE, 0, 0.05, 1e-6), 0, 1e-6),
    # DWNet: the cosine factor already runs in the warm-up (chained schedulers: within 0.3 permil after it)
    ('configs/dwnet/dwnet-tiny_8xb128_in1k.py',
     lambda t: _swin_cosine(t, 300 * IPE, 20 * IPE, 1e-3, 1e-6, 1e-5), 20 * IPE, 3e-4),
    ('configs/dwnet/dwnet-base_16xb64-accum2_in1k.py',
     lambda t: _swin_cosine(t, 300 * IPE, 20 * IPE, 2e-3, 2e-6, 2e-5), 20 * IPE, 3e-4),
    ('configs/pedconv/pedconv-resnet18_8xb64_in1k.py',  # per epoch: (e + 1) / 8 warm-up, then cosine to 0
     lambda t: 0.512 * ((t // IPE + 1) / 8 if t // IPE < 8 else 0.5 * (1 + math.cos(math.pi * (t // IPE - 8) / 242))),
     0, 1e-6),
    ('configs/doconv/doconv-resnet50_8xb128_in1k.py',  # GluonCV LRSequential: linear 0 -> lr, cosine -> 0
     lambda t: 0.4 * t / (5 * IPE) if t < 5 * IPE else 0.2 * (1 + math.cos(math.pi * (t - 5 * IPE) / (115 * IPE))),
     5 * IPE, 1e-6),
    # OREPA: WarmupCosineAnnealingLR stepped per iteration with a 5-iteration warm-up; here the cosine spans
    # all iterations, a 5-iteration shift: at most 5 * pi / (2 * iterations) of the peak (1e-5 for ImageNet)
    ('configs/orepa/orepa-resnet18_4xb64_in1k.py',
     lambda t: 0.1 * t / 5 if t < 5 else 0.05 * (1 + math.cos(math.pi * (t - 5) / (120 * IPE - 5))),
     5, 5 * math.pi / (2 * 120 * IPE) + 1e-4),
])
def test_lr_schedule_matches_official(path, official, warmup_iters, tol):
    """After the warm-up (where mmengine reaches the peak one step apart), the lr of every iteration is
    the official trainer's to ``tol`` (relative to the peak lr); during the warm-up to 2 steps' worth."""
    cfg = _load(path)
    epochs = cfg.train_cfg.max_epochs
    lrs = _simulate_lr(cfg, epochs, IPE)
    peak = cfg.optim_wrapper.optimizer.lr
    assert max(lrs) == pytest.approx(max(official(t) for t in range(len(lrs))), rel=1.5e-2)
    for t, lr in enumerate(lrs):
        ref = official(t)
        if t < warmup_iters:
            assert abs(lr - ref) <= 2 * peak / max(warmup_iters, 1) + 0.012 * peak, (t, lr, ref)
        else:
            assert abs(lr - ref) <= tol * peak, (t, lr, ref)


# ------------------------------------------------------------------------------------------ get_flops
def test_get_complexity_counts_a_plain_network_exactly():
    from dynconv_mm.analysis import format_count, get_complexity
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 10))
    info = get_complexity(net, (3, 16, 16))
    assert info.params == 3 * 8 * 9 + 8 * 4 + 4 + 4 * 256 * 10 + 10
    # multiply-accumulates of the two convolutions and the linear layer
    assert info.flops == 16 * 16 * 8 * 3 * 9 + 16 * 16 * 4 * 8 + 4 * 256 * 10
    assert format_count(11932148) == '11.93M' and format_count(2204209344) == '2.20G'
    with pytest.raises(ValueError, match='input_shape'):
        get_complexity(net, (16, 16))


def test_get_flops_cli_on_a_config(capsys, mmpretrain_scope):
    import importlib.util
    spec = importlib.util.spec_from_file_location('get_flops', osp.join(ROOT, 'tools', 'analysis', 'get_flops.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # the training config, folded to its inference form (= orepa-resnet18_deploy_in1k.py)
    path = 'configs/orepa/orepa-resnet18_4xb64_in1k.py'
    assert tool.main([osp.join(ROOT, path), '--shape', '32', '--exact', '--deploy']) == 0
    out = capsys.readouterr().out
    params = int(re.search(r'Params: (\d+)', out).group(1))
    flops = int(re.search(r'FLOPs: (\d+)', out).group(1))
    assert params == 11684712
    # a ResNet-18 at 32x32 is (32 / 224)^2 of its 224x224 convolution cost, plus the resolution-free fc
    fc = 512 * 1000
    full = _metafile_models()[path]['Metadata']['FLOPs']
    assert flops - fc == pytest.approx((full - fc) * (32 / 224) ** 2, rel=0.02)
    assert tool.main([osp.join(ROOT, path), '--shape', '1', '2', '3']) == 2


# ------------------------------------------------------------------------------------------ pipelines
def _pipeline_groups():
    """One config per distinct (train, test) pipeline."""
    seen, out = set(), []
    for path in CONFIGS:
        cfg = _load(path)
        key = repr((cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def test_data_pipelines_run():
    """The train / test pipelines of every recipe build and turn an image into a 224x224 sample."""
    pytest.importorskip('mmpretrain')
    import numpy as np
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    init_default_scope('mmpretrain')
    rng = np.random.default_rng(0)
    groups = _pipeline_groups()
    assert len(groups) == 4  # KW/DWNet (timm RandAugment), traditional (KW MobileNetV2, OREPA), PEDConv, GluonCV
    for path in groups:
        cfg = _load(path)
        for name in ('train_dataloader', 'test_dataloader'):
            steps = [t for t in cfg[name].dataset.pipeline if t['type'] != 'LoadImageFromFile']
            pipeline = Compose(steps)
            for _ in range(3):
                img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
                out = pipeline(dict(img=img, img_shape=img.shape[:2], ori_shape=img.shape[:2], gt_label=3))
                assert tuple(out['inputs'].shape) == (3, 224, 224), (path, name)
                assert out['inputs'].dtype == torch.uint8


# ------------------------------------------------------------------------------------------ Runner
@pytest.mark.parametrize('path', [
    # AdamW + 4 accumulation steps + EMA every optimizer step + temperature annealing + timm RandAugment
    'configs/kernelwarehouse/kw1x-convnext-tiny_8xb128-accum4_in1k.py',
])
def test_config_runs_in_a_runner(path, tmp_path, mmpretrain_scope, cpu_only):
    """The whole config (hooks, schedulers, accumulation, pipelines, evaluator) in mmengine's Runner: one
    epoch of 8 real ImageNet photographs (``../shared/data/imagenet_real``) and a validation, slimmed."""
    from conftest import shared_path
    from mmengine.runner import Runner

    from dynconv_mm.layers import get_temperature

    root = shared_path('data', 'imagenet_real')
    cfg = _load(path)
    _slim(cfg)
    for name, n in (('train_dataloader', 8), ('val_dataloader', 4), ('test_dataloader', 4)):
        cfg[name].update(batch_size=2, num_workers=0, persistent_workers=False)
        cfg[name].dataset.update(data_root=root, split='val', indices=n)
    cfg.train_cfg.max_epochs = 1
    cfg.work_dir = str(tmp_path)
    cfg.default_hooks.logger.interval = 1
    cfg.env_cfg.dist_cfg = dict(backend='gloo')
    runner = Runner.from_cfg(cfg)
    runner.train()
    logs = runner.message_hub.log_scalars
    assert runner.iter == 4
    assert math.isfinite(logs['train/loss'].current())
    assert 'val/accuracy/top1' in logs or any(k.endswith('accuracy/top1') for k in logs)
    model = runner.model
    if 'kernelwarehouse' in path:
        # 4 iterations out of 20 epochs x 4 iterations of annealing: 1 - 4 / 80
        assert get_temperature(model) == pytest.approx(1 - 4 / 80)
        assert 'train/temperature' in logs
        ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
        assert ema.ema_model.steps.item() == 4 and ema.ema_model.interval == 4


# ------------------------------------------------------------------------------- official-model parity
def _convert(method: str, sd: dict):
    from dynconv_mm.converters import dwnet, kernelwarehouse, orepa, pedconv
    if method == 'kw-resnet':
        return kernelwarehouse.convert_kernelwarehouse(sd, 'resnet')
    if method == 'kw-mobilenetv2':
        return kernelwarehouse.convert_kernelwarehouse(sd, 'mobilenetv2')
    if method == 'kw-convnext':
        return kernelwarehouse.convert_kernelwarehouse(sd, 'convnext')
    if method == 'pedconv':
        return pedconv.convert_pedconv_resnet(sd)
    if method == 'orepa':
        return orepa.convert_orepa_resnet(sd)
    if method == 'dwnet':
        return dwnet.convert_dwnet(sd, target='classifier')
    raise AssertionError(method)


@pytest.mark.parametrize('path, fixture, method, overrides', [
    # the fixtures of these two are the full-size ImageNet models of the configs, unchanged
    ('configs/kernelwarehouse/kw1d4x-resnet18_8xb128-accum4_in1k.py', 'kw_resnet18_kw1d4x.pt', 'kw-resnet', {}),
    ('configs/kernelwarehouse/kw1x-mobilenet-v2-050_8xb32_in1k.py', 'kw_mobilenetv2_050_kw1x.pt', 'kw-mobilenetv2', {}),
    # smaller official models: the config with the fixture's size
    ('configs/kernelwarehouse/kw1x-convnext-tiny_8xb128-accum4_in1k.py', 'kw_convnext_1121_d32_kw1x.pt', 'kw-convnext',
     {'model.backbone.arch': dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256]), 'model.head.in_channels': 256,
      'model.head.num_classes': 10}),
    ('configs/pedconv/pedconv-resnet18_8xb64_in1k.py', 'pedconv_resnet18_w025.pt', 'pedconv',
     {'model.backbone.widen_factor': 0.25, 'model.head.in_channels': 128}),
    ('configs/orepa/orepa-resnet18_4xb64_in1k.py', 'orepa_resnet18_w025.pt', 'orepa',
     {'model.backbone.width_multiplier': 0.25, 'model.head.in_channels': 128, 'model.head.num_classes': 10}),
    ('configs/dwnet/dynamic-dwnet-tiny_8xb128_in1k.py', 'dwnet_dynamic_d32_1121.pt', 'dwnet',
     {'model.backbone.embed_dims': 32, 'model.backbone.depths': [1, 1, 2, 1], 'model.head.in_channels': 256,
      'model.head.num_classes': 10}),
])
def test_config_model_reproduces_the_official_logits(path, fixture, method, overrides, golden, mmpretrain_scope):
    """The config's classifier (backbone, neck and head), given official weights through the converter,
    computes the official model's logits (``../shared/golden`` fixtures, eval mode)."""
    from dynconv_mm.layers import set_temperature

    ref = golden(fixture)
    cfg = _load(path)
    for key, value in overrides.items():  # plain assignment (a dict may replace a string)
        *parents, leaf = key.split('.')
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = value
    model = _build(cfg, mmpretrain_scope)
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    converted, report = _convert(method, ref['state_dict'])
    report.check()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected
    # only derived buffers may be missing (e.g. DO-Conv's d_diag, OREPA's fixed kernels are not saved)
    assert all(k not in dict(model.named_parameters()) for k in missing), missing
    model.eval()
    outputs = ref['outputs'] if isinstance(ref['outputs'], dict) else {0.0: ref['outputs']}
    for temperature, logits in outputs.items():
        set_temperature(model, temperature)
        with torch.no_grad():
            ours = model(ref['input'], mode='tensor')
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
