"""Library side of the tools: scope detection, SyncBN switch, registry-error hints, device selection."""
import os.path as osp

import pytest
from mmengine.config import Config

from dynconv_mm.apis import (
    PLUGIN_IMPORT_HINT,
    build_runner,
    detect_scope,
    ensure_custom_imports,
    explain_registry_error,
    load_config,
    pin_device,
    prepare_device,
    replace_syncbn,
    resolve_device,
)


def test_detect_scope():
    assert detect_scope(Config(dict(default_scope='mmseg'))) == 'mmseg'
    assert detect_scope(Config(dict(model=dict(type='ImageClassifier')))) == 'mmpretrain'
    assert detect_scope(Config(dict(model=dict(type='EncoderDecoder')))) == 'mmseg'
    assert detect_scope(Config(dict(model=dict(type='MaskRCNN')))) == 'mmdet'
    with pytest.raises(ValueError, match='default_scope'):
        detect_scope(Config(dict()))


def test_replace_syncbn_and_custom_imports():
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                                 heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True)), dict(norm_cfg=None)])))
    assert replace_syncbn(cfg) == 2
    assert cfg.model.backbone.norm_cfg.type == 'BN' and cfg.model.heads[0].norm_cfg.type == 'BN'
    ensure_custom_imports(cfg)
    ensure_custom_imports(cfg)
    assert cfg.custom_imports['imports'] == ['dynconv_mm']


def test_registry_error_hint_names_the_import():
    err = KeyError('KWResNet is not in the mmdet::model registry. Please check whether the value of '
                   '`KWResNet` is correct or it was registered as expected.')
    hint = explain_registry_error(err)
    assert hint is not None and PLUGIN_IMPORT_HINT in hint and 'KWResNet' in hint
    assert explain_registry_error(KeyError('ResNeXtFoo is not in the mmdet::model registry')) is None
    assert explain_registry_error(ValueError('something else')) is None


# ------------------------------------------------------------------------------------- device selection
TINY = osp.join(osp.dirname(osp.abspath(__file__)), 'data', 'configs', 'mmpretrain_tiny_folder.py')


def test_resolve_device_checks_names_and_availability(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device(None) == 'cpu' and resolve_device(' CPU ') == 'cpu'
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        resolve_device('gpu')
    with pytest.raises(RuntimeError, match='CUDA is not available'):
        resolve_device('cuda')


def test_resolve_device_on_a_gpu_host(mocked_gpu_host):
    assert resolve_device(None) == 'cuda' and resolve_device('cuda:0') == 'cuda:0'
    with pytest.raises(ValueError, match=r'1 CUDA device\(s\)'):
        resolve_device('cuda:1')


def _tiny_cfg(tmp_path, **extra):
    pytest.importorskip('mmpretrain')
    cfg = load_config(TINY)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.merge_from_dict(extra)
    return cfg


def test_device_cpu_on_a_gpu_host_keeps_the_model_on_the_cpu(mocked_gpu_host, tmp_path):
    """mmengine chose CUDA when it was imported; ``--device cpu`` must still train on the CPU."""
    from mmengine.device import get_device
    runner = build_runner(_tiny_cfg(tmp_path), device='cpu')
    assert get_device() == 'cpu'
    assert {p.device.type for p in runner.model.parameters()} == {'cpu'}


def test_device_cpu_with_a_launcher_on_a_gpu_host_uses_gloo(mocked_gpu_host, tmp_path, monkeypatch):
    """``--device cpu --launcher pytorch`` (torchrun) where a GPU is: gloo and the CPU DDP wrapper, model on the CPU."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    try:
        runner = build_runner(_tiny_cfg(tmp_path), device='cpu', launcher='pytorch')
        assert dist.get_backend() == 'gloo'
        assert type(runner.model).__name__ == 'CPUDistributedDataParallel'
        assert {p.device.type for p in runner.model.parameters()} == {'cpu'}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_deterministic_runs_on_cuda_configure_cublas(mocked_gpu_host, monkeypatch):
    """Deterministic mode on CUDA refuses cuBLAS products unless ``CUBLAS_WORKSPACE_CONFIG`` is set."""
    import os
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    plain = Config(dict(randomness=dict(seed=0)))
    assert prepare_device(plain, 'cuda') == 'cuda'
    assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ
    prepare_device(Config(dict(randomness=dict(seed=0, deterministic=True))), 'cpu')
    assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ  # the CPU needs nothing
    prepare_device(Config(dict(randomness=dict(seed=0, deterministic=True))), 'cuda')
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'


def test_pin_device_restores(cpu_only):
    from mmengine.device import get_device
    assert get_device() == 'cpu'
    previous = pin_device('cuda')
    assert previous == 'cpu' and get_device() == 'cuda'
    pin_device(previous)
    assert get_device() == 'cpu'
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        pin_device('tpu')
