"""Library side of ``tools/train.py`` and ``tools/test.py``: one code path for mmpretrain, mmdet and
mmseg configs (the scope is read from the config), so the tools themselves hold no logic."""
from __future__ import annotations

import os.path as osp
from typing import Any, Dict, Optional, Sequence

from mmengine.config import Config, ConfigDict

from .registry import TASK_SCOPES, registered_names

__all__ = ['load_config', 'detect_scope', 'replace_syncbn', 'ensure_custom_imports', 'build_runner',
           'enable_visualization', 'setup_cpu_distributed',
           'explain_registry_error', 'PLUGIN_IMPORT_HINT']

PLUGIN_IMPORT_HINT = "custom_imports = dict(imports=['dynconv_mm'], allow_failed_imports=False)"

_SCOPE_BY_PACKAGE = {'mmpretrain': 'mmpretrain', 'mmdet': 'mmdet', 'mmseg': 'mmseg'}


def load_config(path: str, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    cfg = Config.fromfile(path)
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


def explain_registry_error(err: BaseException) -> Optional[str]:
    """If ``err`` is mmengine's "X is not in the Y registry" for one of dynconv_mm's names, a hint."""
    msg = str(err)
    if 'registry' not in msg or 'not in the' not in msg:
        return None
    ours = set(registered_names('conv')) | set(registered_names('model')) | set(registered_names('hook'))
    hit = [n for n in ours if f'{n} is not in' in msg or f"'{n}'" in msg]
    if not hit:
        return None
    return (f'{hit[0]} is a dynconv_mm module. Add to the config:\n    {PLUGIN_IMPORT_HINT}\n'
            'and make sure dynconv_mm is installed in this environment (pip install -e . in its checkout).')


def build_runner(cfg: Config, work_dir: Optional[str] = None, device: Optional[str] = None,
                 launcher: str = 'none', resume: Optional[str] = None, load_from: Optional[str] = None,
                 amp: bool = False, extra_hooks: Sequence[dict] = ()):
    """Fill the runtime fields of ``cfg`` and build an mmengine ``Runner`` in the right scope."""
    import torch
    from mmengine.runner import Runner

    scope = detect_scope(cfg)
    cfg.default_scope = scope
    ensure_custom_imports(cfg)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(cfg.filename or 'config'))[0])
    use_cuda = torch.cuda.is_available() if device is None else device.startswith('cuda')
    if not use_cuda:
        replace_syncbn(cfg)
        if launcher != 'none':
            setup_cpu_distributed(cfg)
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
        hint = explain_registry_error(e)
        if hint:
            raise KeyError(f'{e}\n{hint}') from e
        raise


assert set(TASK_SCOPES) == set(_SCOPE_BY_PACKAGE)


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
