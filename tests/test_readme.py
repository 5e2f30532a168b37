"""The README stays true: its model zoo is the one generated from the metafiles, every shipped config is
in it, the commands it names exist, and its troubleshooting section quotes what each failure prints."""
import contextlib
import glob
import io
import os
import os.path as osp
import re
import subprocess
import sys
import traceback

import pytest

from dynconv_mm.utils.model_zoo import load_models, model_zoo_markdown

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _readme():
    with open(osp.join(ROOT, 'README.md')) as f:
        return f.read()


def test_readme_model_zoo_matches_metafiles():
    assert model_zoo_markdown(ROOT) in _readme(), \
        'README model zoo is stale: regenerate it with python tools/analysis/model_zoo.py'


def test_every_config_is_in_a_metafile():
    listed = {m['Config'] for m in load_models(ROOT)}
    shipped = {osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
               if '/_base_/' not in p and '/_quickstart_/' not in p
               and '_deploy_' not in p}  # deploy forms of a listed model (tools/reparameterize.py writes them too)
    assert shipped == listed, f'not in metafiles: {sorted(shipped - listed)}; missing files: {sorted(listed - shipped)}'


def test_readme_paths_exist():
    for path in set(re.findall(r'`(?:bash |python )?((?:tools|configs|docs)/[\w./-]+\.(?:py|sh|md))', _readme())):
        assert osp.exists(osp.join(ROOT, path)), path


# ------------------------------------------------------------------------------------------------
# Troubleshooting: every quoted message is what the failure prints
_LIBRARY_SCRIPTS = r'''
"""Run mmdet's, mmpretrain's and mmseg's own tools/train.py on configs without custom_imports, load a Runner
checkpoint and run SyncBN on CPUs, all without dynconv_mm; print what each ends with."""
import importlib, os, runpy, sys, traceback

def report(name, fn):
    try:
        fn()
        print(f'{name}: no error')
    except BaseException as e:
        print(f'{name}: ' + ''.join(traceback.format_exception_only(type(e), e)).strip().replace('\n', ' '))

def train(lib, cfg):
    script = os.path.join(os.path.dirname(importlib.import_module(lib).__file__), '.mim', 'tools', 'train.py')
    sys.argv = [script, cfg, '--work-dir', f'work_{lib}']
    runpy.run_path(script, run_name='__main__')

for lib, cfg in (('mmdet', 'det.py'), ('mmpretrain', 'cls.py'), ('mmseg', 'seg.py')):
    report(lib, lambda: train(lib, cfg))

import torch
from mmengine.logging import MessageHub
hub = MessageHub.get_instance('readme')
hub.update_scalar('train/loss', 1.0)
torch.save({'state_dict': {}, 'message_hub': hub.state_dict()}, 'runner.pth')
report('weights_only', lambda: torch.load('runner.pth'))

import torch.distributed as dist
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])
dist.init_process_group('gloo', rank=0, world_size=1)
report('syncbn', lambda: torch.nn.SyncBatchNorm(4).train()(torch.randn(2, 4, 3, 3)))
print('dynconv_mm imported:', 'dynconv_mm' in sys.modules)
'''


def _troubleshooting() -> str:
    text = _readme()
    return text[text.index('## Troubleshooting'):text.index('## License')]


@pytest.fixture(scope='module')
def library_failures(tmp_path_factory):
    """What the OpenMMLab libraries' own scripts and torch print (one process, dynconv_mm never imported)."""
    import socket
    work = tmp_path_factory.mktemp('library_failures')
    readme_config = re.search(r'```python\n(# my_mask-rcnn_r50_fpn_1x_coco\.py\n.*?)```', _readme(), re.S)[1]
    assert 'custom_imports' in readme_config
    (work / 'det.py').write_text(''.join(line for line in readme_config.splitlines(True)
                                         if not line.startswith(('custom_imports', 'custom_hooks'))))
    for name, config in (('cls.py', 'kw1x-r18_toy-in6.py'), ('seg.py', 'upernet_dynamic-dwnet_toy-ade.py')):
        (work / name).write_text(f"_base_ = [{osp.join(ROOT, 'configs', '_quickstart_', config)!r}]\n"
                                 "custom_imports = dict(imports=[], allow_failed_imports=False)\n")
    (work / 'drive.py').write_text(_LIBRARY_SCRIPTS)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, 'drive.py'], cwd=work, env=dict(env, PORT=str(port)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(': ', 1) for line in proc.stdout.splitlines() if ': ' in line)
    assert lines.pop('dynconv_mm imported') == 'False'
    return lines


def _printed(excinfo) -> str:
    """The last line(s) of the traceback Python prints for the exception."""
    return ''.join(traceback.format_exception_only(excinfo.type, excinfo.value))


def _our_tools_misspelled_conv_type(tmp_path, _):
    from dynconv_mm.apis import build_runner, load_config
    cfg = load_config(osp.join(ROOT, 'tests', 'data', 'configs', 'mmpretrain_tiny_folder.py'),
                      {'model.backbone.conv_cfg.type': 'ODConv'})
    with pytest.raises(KeyError) as e:
        build_runner(cfg, work_dir=str(tmp_path / 'work'))
    return _printed(e)


def _our_tools_missing_module(tmp_path, _):
    from dynconv_mm.apis import load_config
    path = tmp_path / 'cfg.py'
    path.write_text("custom_imports = dict(imports=['dynconv_mm.kernelwarehouse'], allow_failed_imports=False)\n")
    with pytest.raises(ImportError) as e:
        load_config(str(path))
    return _printed(e)


def _batch_of_one(tmp_path, _):
    import torch
    with pytest.raises(ValueError) as e:
        torch.nn.BatchNorm1d(4).train()(torch.randn(1, 4))
    return _printed(e)


def _native_unavailable(tmp_path, monkeypatch):
    from dynconv_mm.layers import native
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
    monkeypatch.setenv('DYNCONV_MM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('DYNCONV_MM_NATIVE', raising=False)
    monkeypatch.setattr(native, '_state', {})
    with pytest.warns(RuntimeWarning) as caught:
        assert native.native_library() is None
    return f'RuntimeWarning: {caught[0].message}'


def _converter_refusal(tmp_path, _):
    import importlib.util

    import torch
    tv = pytest.importorskip('torchvision', reason='torchvision is not installed')
    src = tmp_path / 'resnet18.pth'
    torch.save(tv.models.resnet18(weights=None).state_dict(), src)
    spec = importlib.util.spec_from_file_location(
        'kw_to_mm', osp.join(ROOT, 'tools', 'model_converters', 'kernelwarehouse_to_mm.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert tool.main([str(src), str(tmp_path / 'out.pth')]) == 2
    return err.getvalue()


_COMPILE_TWO_SIZES = r'''
"""A DY-Conv layer compiled by inductor, one training step at each of two input sizes, then the same with
dynamic=False; prints what each ends with."""
import torch
from torch import nn
from dynconv_mm.layers import DyConv2d

for dynamic in (None, False):
    torch._dynamo.reset()
    model = torch.compile(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DyConv2d(8, 8, 3, padding=1)),
                          dynamic=dynamic)
    try:
        for size in (12, 16):
            model(torch.randn(2, 3, size, size)).sum().backward()
        print(f'dynamic={dynamic}: ok')
    except Exception as e:
        print(f'dynamic={dynamic}: {type(e).__name__}: {e}'.splitlines()[0])
'''


def _compile_at_two_sizes(tmp_path, _):
    import torch
    if not torch.__version__.startswith('2.14.'):
        pytest.skip(f'the inductor failure is one of torch 2.14 (this is torch {torch.__version__})')
    (tmp_path / 'compile.py').write_text(_COMPILE_TWO_SIZES)
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, 'compile.py'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'dynamic=False: ok' in proc.stdout, f'the documented workaround does not work:\n{proc.stdout}'
    return proc.stdout


# quote in the README -> what prints it: a line of the library-scripts run, or a function of ours
QUOTES = {
    "KeyError: 'Cannot find None in registry under scope name mmdet'": 'mmdet',
    "KeyError: 'KWResNet is not in the mmpretrain::model registry": 'mmpretrain',
    "KeyError: 'DWNet is not in the mmseg::model registry": 'mmseg',
    "conv_cfg type 'ODConv' is not registered (did you mean 'ODConv2d'?)": _our_tools_misspelled_conv_type,
    "ImportError: Failed to import custom modules from {'imports': ['dynconv_mm.kernelwarehouse']":
        _our_tools_missing_module,
    "custom_imports names 'dynconv_mm.kernelwarehouse', which is not a dynconv_mm module (did you mean "
    "'dynconv_mm.layers.kernel_warehouse'?)": _our_tools_missing_module,
    'Weights only load failed': 'weights_only',
    'Unsupported global: GLOBAL mmengine.logging.history_buffer.HistoryBuffer': 'weights_only',
    'ValueError: Expected more than 1 value per channel when training': _batch_of_one,
    'ValueError: SyncBatchNorm expected input tensor to be on GPU': 'syncbn',
    'RuntimeWarning: dynconv_mm: native CPU kernels unavailable': _native_unavailable,
    'was expected; this looks like a plain (static) ResNet (torchvision / timm keys) with no dynamic or '
    're-parameterized layer': _converter_refusal,
    'InductorError: TypeError: cannot determine truth value of Relational': _compile_at_two_sizes,
}


def test_troubleshooting_quotes_each_message_verbatim():
    section = _troubleshooting()
    for quote in QUOTES:
        assert f'`{quote}' in section, f'the troubleshooting section does not quote {quote!r}'


@pytest.mark.parametrize('quote', list(QUOTES), ids=[q[:48] for q in QUOTES])
def test_quoted_message_is_what_the_failure_prints(quote, request, tmp_path, monkeypatch):
    source = QUOTES[quote]
    if isinstance(source, str):
        printed = request.getfixturevalue('library_failures')[source]
    else:
        printed = source(tmp_path, monkeypatch)
    assert quote in printed, f'{quote!r} is not in what the failure prints:\n{printed}'
