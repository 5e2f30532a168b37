"""Library side of ``tools/train.py`` and ``tools/test.py``: one code path for mmpretrain, mmdet and
mmseg configs (the scope is read from the config), so the tools themselves hold no logic."""
from __future__ import annotations

import copy
import os
import os.path as osp
import re
from typing import Any, Dict, Optional, Sequence, Union

from mmengine.config import Config, ConfigDict

from .registry import TASK_SCOPES, registered_names

__all__ = ['load_config', 'detect_scope', 'replace_syncbn', 'ensure_custom_imports', 'build_runner',
           'resolve_device', 'pin_device', 'prepare_device', 'enable_visualization', 'setup_cpu_distributed',
           'build_model', 'explain_registry_error', 'explain_import_error', 'RegistryError', 'PLUGIN_IMPORT_HINT']

PLUGIN_IMPORT_HINT = "custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)"

_SCOPE_BY_PACKAGE = {'mmpretrain': 'mmpretrain', 'mmdet': 'mmdet', 'mmseg': 'mmseg'}


def load_config(path: str, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """``Config.fromfile(path)`` (which imports the config's ``custom_imports``) plus ``cfg_options``; a
    ``custom_imports`` entry that names a module dynconv_mm does not have is explained
    (:func:`explain_import_error`)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    try:
        cfg = Config.fromfile(path)
    except ImportError as e:
        hint = explain_import_error(e)
        if hint:
            raise ImportError(f'{e}\n{hint}') from e
        raise
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def detect_scope(cfg: Config) -> str:
    """``'mmpretrain'``, ``'mmdet'`` or ``'mmseg'``: the library a config is written for."""
    scope = cfg.get('default_scope')
    if scope in _SCOPE_BY_PACKAGE:
        return scope
    model_type = str(cfg.get('model', {}).get('type', ''))
    if model_type in ('ImageClassifier',):
        return 'mmpretrain'
    if model_type in ('EncoderDecoder', 'CascadeEncoderDecoder'):
        return 'mmseg'
    if model_type:
        return 'mmdet'
    raise ValueError('cannot tell whether this config is for mmpretrain, mmdet or mmseg: set '
                     "default_scope = 'mmpretrain' | 'mmdet' | 'mmseg' in it")


def _walk(obj, fn):
    if isinstance(obj, dict):
        fn(obj)
        for v in obj.values():
            _walk(v, fn)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, fn)


def replace_syncbn(cfg: Config | ConfigDict | dict) -> int:
    """Replace every ``SyncBN`` norm config by ``BN`` in place (for CPU or single-process runs).

    Returns the number of replacements. This is the one-line switch for configs written with SyncBN:
    ``replace_syncbn(cfg)`` (the tools do it automatically when no GPU is used).
    """
    count = [0]

    def fn(d):
        if d.get('type') in ('SyncBN', 'MMSyncBN', 'TorchSyncBN'):
            d['type'] = 'BN'
            count[0] += 1

    _walk(cfg.get('model', cfg) if isinstance(cfg, Config) else cfg, fn)
    return count[0]


def ensure_custom_imports(cfg: Config) -> None:
    """Make sure a config imports dynconv_mm (so worker processes and ``mim`` see its modules)."""
    ci = cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    imports = list(ci.get('imports', []))
    if 'dynconv_mm' not in imports:
        imports.append('dynconv_mm')
    ci['imports'] = imports
    cfg.custom_imports = ci


class RegistryError(KeyError):
    """A registry ``KeyError`` with dynconv_mm's explanation appended (printed as text: ``KeyError`` would
    print the repr of its message, newlines escaped)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def _dynconv_mm_modules() -> list:
    """The dotted names of dynconv_mm's modules (found on disk, without importing them)."""
    import pkgutil

    import dynconv_mm
    return ['dynconv_mm'] + [m.name for m in pkgutil.walk_packages(dynconv_mm.__path__, 'dynconv_mm.',
                                                                   onerror=lambda name: None)
                             if not m.name.split('.')[-1].startswith('_')]


def explain_import_error(err: BaseException) -> Optional[str]:
    """If ``err`` (or an exception it was raised from) is a ``custom_imports`` entry naming a module dynconv_mm
    does not have, a hint naming the closest module and the one import that is enough. (mmengine's own
    message then says to set ``PYTHONPATH``, which does not help.)"""
    import difflib
    seen, e, name = set(), err, None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError) and str(e.name or '').split('.')[0] == 'dynconv_mm':
            name = e.name
            break
        e = e.__cause__ or e.__context__
    if name is None:
        return None
    if name == 'dynconv_mm':
        return ('dynconv_mm is not installed in this environment: run pip install -e . in its checkout '
                '(or add the checkout to PYTHONPATH).')
    modules = _dynconv_mm_modules()
    close = difflib.get_close_matches(name, modules, n=1, cutoff=0.6)
    return (f'custom_imports names {name!r}, which is not a dynconv_mm module'
            + (f' (did you mean {close[0]!r}?)' if close else '')
            + f'. Importing dynconv_mm registers every layer, backbone and hook:\n    {PLUGIN_IMPORT_HINT}')


def explain_registry_error(err: BaseException, cfg: Optional[Config] = None) -> Optional[str]:
    """A hint for a registry ``KeyError``, or ``None``: for mmengine's "X is not in the Y registry" when X is
    one of dynconv_mm's names (the plugin is not imported), and for mmcv's "Cannot find None in registry",
    which ``build_conv_layer`` raises for an unknown ``conv_cfg`` type without naming it (``cfg``: the config
    whose ``conv_cfg`` types are then checked, naming the unknown one and the closest registered type)."""
    msg = str(err)
    if 'Cannot find None in registry' in msg:
        return _explain_unknown_conv_type(cfg)
    if 'registry' not in msg or 'not in the' not in msg:
        return None
    ours = set(registered_names('conv')) | set(registered_names('model')) | set(registered_names('hook'))
    hit = [n for n in ours if f'{n} is not in' in msg or f"'{n}'" in msg]
    if not hit:
        return None
    return (f'{hit[0]} is a dynconv_mm module. Add to the config:\n    {PLUGIN_IMPORT_HINT}\n'
            'and make sure dynconv_mm is installed in this environment (pip install -e . in its checkout).')


def _explain_unknown_conv_type(cfg: Optional[Config]) -> str:
    import difflib

    from mmengine.registry import MODELS
    ours = registered_names('conv')
    unknown = []

    def fn(d):
        conv = d.get('conv_cfg')
        if isinstance(conv, dict) and isinstance(conv.get('type'), str) and MODELS.get(conv['type']) is None:
            unknown.append(conv['type'])

    if cfg is not None:
        _walk(cfg.get('model', {}), fn)
    if not unknown:
        return ("mmcv's build_conv_layer could not find a conv_cfg type (its message prints None for the name). "
                f"dynconv_mm's conv types: {', '.join(ours)}; mmcv's own: Conv1d, Conv2d, Conv3d, Conv, deconv, ...")
    close = difflib.get_close_matches(unknown[0], ours, n=1, cutoff=0.5)
    return (f'conv_cfg type {unknown[0]!r} is not registered' + (f' (did you mean {close[0]!r}?)' if close else '')
            + f". mmcv's build_conv_layer prints None for the name. dynconv_mm's conv types: {', '.join(ours)}.")


def build_runner(cfg: Config, work_dir: Optional[str] = None, device: Optional[str] = None,
                 launcher: str = 'none', resume: Optional[str] = None, load_from: Optional[str] = None,
                 amp: bool = False, extra_hooks: Sequence[dict] = ()):
    """Fill the runtime fields of ``cfg`` and build an mmengine ``Runner`` in the right scope.

    ``device``: ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (default: CUDA where available; see
    :func:`prepare_device`).
    """
    from mmengine.runner import Runner

    scope = detect_scope(cfg)
    cfg.default_scope = scope
    ensure_custom_imports(cfg)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(cfg.filename or 'config'))[0])
    prepare_device(cfg, device, launcher)
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume:
        cfg.resume, cfg.load_from = True, resume
    if load_from:
        cfg.load_from = load_from
    if amp:
        cfg.optim_wrapper = dict(cfg.get('optim_wrapper', {}), type='AmpOptimWrapper', loss_scale='dynamic')
    if extra_hooks:
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + list(extra_hooks)
    try:
        return Runner.from_cfg(cfg)
    except KeyError as e:
        hint = explain_registry_error(e, cfg)
        if hint:
            raise RegistryError(f'{e.args[0] if e.args else e}\n{hint}') from e
        raise


assert set(TASK_SCOPES) == set(_SCOPE_BY_PACKAGE)

#: device types mmengine may have detected at import (``pin_device`` restores any of them)
_MMENGINE_DEVICES = ('cpu', 'cuda', 'npu', 'mlu', 'mps', 'dipu', 'musa')


def resolve_device(device: Optional[str] = None) -> str:
    """The device a run uses: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``; ``None``: ``'cuda'`` where CUDA is
    available, else ``'cpu'``. A CUDA device that this machine lacks is an error, not a silent CPU run."""
    import torch

    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    name = str(device).strip().lower()
    match = re.fullmatch(r'cuda(?::(\d+))?', name)
    if name != 'cpu' and match is None:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if match is not None:
        if not torch.cuda.is_available():
            raise RuntimeError(f'device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, '
                               f'CUDA build {torch.version.cuda}); use the CPU (device cpu)')
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise ValueError(f'device {device!r}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})')
    return name


def pin_device(device: str) -> str:
    """Make mmengine put models on ``device`` (``'cpu'``, ``'cuda'``, ``'cuda:N'``) for the rest of the process.

    mmengine picks its device once, when it is imported (CUDA wherever CUDA is available), and its
    Runner moves the model there (``wrap_model``), maps resumed checkpoints there and runs AMP there,
    whatever the run was asked to use. This sets that choice; ``'cuda:N'`` also makes ``N`` the
    current CUDA device. Returns the previous choice (pass it back to restore it).
    """
    from mmengine.device import utils as device_utils

    name = str(device).strip().lower()
    if name not in _MMENGINE_DEVICES:
        name = resolve_device(name)
        if ':' in name:
            import torch
            torch.cuda.set_device(int(name.split(':')[1]))
            name = 'cuda'
    previous = device_utils.DEVICE
    device_utils.DEVICE = name
    return previous


def prepare_device(cfg: Config, device: Optional[str] = None, launcher: str = 'none') -> str:
    """Set ``cfg`` and the process up for ``device`` (:func:`resolve_device`); returns the device.

    The model goes there (:func:`pin_device`). On the CPU, SyncBN becomes BN and a distributed
    launcher uses gloo (:func:`setup_cpu_distributed`; on a GPU machine too). On CUDA,
    ``randomness.deterministic`` also configures cuBLAS's workspace (``CUBLAS_WORKSPACE_CONFIG``),
    without which deterministic mode refuses every matrix product.
    """
    device = resolve_device(device)
    pin_device(device)
    if device == 'cpu':
        replace_syncbn(cfg)
        if launcher != 'none':
            setup_cpu_distributed(cfg)
    elif _deterministic(cfg):
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    return device


def _deterministic(cfg: Config) -> bool:
    randomness = cfg.get('randomness') or {}
    return bool(randomness.get('deterministic', False))


def setup_cpu_distributed(cfg: Config) -> None:
    """Distributed training on CPUs (gloo): what mmengine's GPU-only set-up cannot do.

    mmengine's ``init_dist`` selects a CUDA device and its DDP wrapper passes ``device_ids``, both of
    which fail without a GPU. This joins the process group with gloo (``torchrun`` sets the
    environment) and wraps the model with :class:`CPUDistributedDataParallel` instead.
    """
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend='gloo', **kwargs)
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper['type'] = 'CPUDistributedDataParallel'
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper


def _register_cpu_ddp() -> None:
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    if 'CPUDistributedDataParallel' in MODEL_WRAPPERS.module_dict:
        return

    @MODEL_WRAPPERS.register_module()
    class CPUDistributedDataParallel(MMDistributedDataParallel):
        """mmengine's DDP wrapper for models on the CPU: no ``device_ids`` (mmengine passes the local rank)."""

        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module=module, device_ids=None, **kwargs)


_register_cpu_ddp()


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Turn on the scope's visualization hook so that test predictions are drawn into ``show_dir``."""
    scope = detect_scope(cfg)
    hooks = cfg.setdefault('default_hooks', ConfigDict())
    if scope == 'mmdet':
        hooks['visualization'] = dict(type='DetVisualizationHook', draw=True, test_out_dir=show_dir)
    elif scope == 'mmseg':
        hooks['visualization'] = dict(type='SegVisualizationHook', draw=True, interval=1)
        cfg.setdefault('visualizer', ConfigDict(type='SegLocalVisualizer', name='visualizer'))
        cfg.visualizer['save_dir'] = show_dir
        cfg.visualizer['vis_backends'] = [dict(type='LocalVisBackend')]
    else:
        hooks['visualization'] = dict(type='VisualizationHook', enable=True, out_dir=show_dir)


def build_model(config: Union[str, Config], cfg_options: Optional[Dict[str, Any]] = None,
                replace_sync_bn: bool = True):
    """Build the ``model`` of a config (a path or a loaded :class:`~mmengine.config.Config`, which is
    left unchanged) in the config's scope (``mmpretrain`` / ``mmdet`` / ``mmseg``), as mmengine's Runner
    does: with the config's ``data_preprocessor``, ``SyncBN`` replaced by ``BN`` unless
    ``replace_sync_bn=False`` (single-process use on any machine), and no ``init_weights()`` (no
    pretrained download). The one config-to-model builder of the tools."""
    import importlib

    from mmengine.registry import init_default_scope

    import dynconv_mm  # noqa: F401  (registers the layers and backbones in every scope)

    cfg = load_config(config, cfg_options) if isinstance(config, str) else config
    if cfg_options and not isinstance(config, str):
        cfg = copy.deepcopy(cfg)
        cfg.merge_from_dict(cfg_options)
    scope = detect_scope(cfg)
    init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    if replace_sync_bn:
        replace_syncbn(model_cfg)
    return importlib.import_module(TASK_SCOPES[scope]).MODELS.build(model_cfg)
