"""Distributed training on the CPU: ``tools/dist_train.sh CONFIG 2`` (torchrun, gloo) trains the classifier
quick-start (KernelWarehouse ResNet-18, warehouses shared across layers) and both ranks end with the same
weights."""
import os
import os.path as osp
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip('mmpretrain')

from dynconv_mm import quickstart as qs  # noqa: E402
from dynconv_mm.apis import load_config  # noqa: E402
from dynconv_mm.datasets.toy import make_toy_datasets  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(ROOT, qs.QUICKSTART_CONFIGS['mmpretrain'])

# Saves every rank's model state before and after training (runs inside the torchrun workers).
DUMP_HOOK = '''
import os.path as osp
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankStateHook(Hook):
    priority = 'LOWEST'

    def _dump(self, runner, tag):
        model = getattr(runner.model, 'module', runner.model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state['__wrapper__'] = type(runner.model).__name__
        state['__temperature__'] = [float(m.temperature) for m in model.modules() if hasattr(m, 'temperature')]
        torch.save(state, osp.join(runner.work_dir, f'{tag}_rank{runner.rank}.pth'))

    def before_train(self, runner):
        self._dump(runner, 'before')

    def after_train(self, runner):
        self._dump(runner, 'after')
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_replicas_identical(tmp_path):
    toy = str(tmp_path / 'toy')
    make_toy_datasets(toy, only=['imagenet'], num_train=4, num_val=1, log=lambda *a: None)
    (tmp_path / 'rank_dump_hook.py').write_text(textwrap.dedent(DUMP_HOOK))
    cfg = load_config(CONFIG)
    qs.set_data_root(cfg, osp.join(toy, 'imagenet'))
    qs.set_max_iters(cfg, 3)
    cfg.train_cfg.val_interval = 100  # training only
    cfg.train_dataloader.batch_size = 4
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].num_workers = 0
        cfg[key].persistent_workers = False
    cfg.custom_imports['imports'] = list(cfg.custom_imports['imports']) + ['rank_dump_hook']
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='DumpRankStateHook')]
    path = str(tmp_path / 'dist_cfg.py')
    cfg.dump(path)

    work = tmp_path / 'work'
    env = dict(os.environ, PORT=str(_free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get('PYTHONPATH', '')]),
               PATH=osp.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    # --device cpu: gloo and the CPU wrapper also where a GPU is (two NCCL ranks cannot share one GPU)
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), path, '2', '--work-dir', str(work),
                           '--device', 'cpu'],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    def load(name):
        return torch.load(work / name, map_location='cpu', weights_only=False)

    before = [load(f'before_rank{r}.pth') for r in (0, 1)]
    after = [load(f'after_rank{r}.pth') for r in (0, 1)]
    assert after[0]['__wrapper__'] == 'CPUDistributedDataParallel'
    # the temperature reached the same annealed value on both ranks
    assert after[0]['__temperature__'] and after[0]['__temperature__'] == after[1]['__temperature__']
    assert len(set(after[0]['__temperature__'])) == 1 and after[0]['__temperature__'][0] < 1

    model = qs.set_data_root(load_config(CONFIG), '/unused')  # parameter names, to tell them from buffers
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    param_names = {n for n, _ in MODELS.build(model.model).named_parameters()}
    assert any('warehouse' in n for n in param_names)
    checked = moved = 0
    for name in param_names:
        # DDP broadcasts rank 0's initial weights; identical gradients (all-reduced) keep them identical
        assert torch.equal(before[0][name], before[1][name]), name
        assert torch.equal(after[0][name], after[1][name]), f'{name} differs between the ranks after training'
        checked += 1
        moved += not torch.equal(after[0][name], before[0][name])
    assert checked == len(param_names)
    assert moved >= 0.9 * checked, f'only {moved} of {checked} parameters were trained'
    # the checkpoint (written by rank 0) holds the same weights
    ckpt = torch.load(work / 'iter_3.pth', map_location='cpu', weights_only=False)
    for name in param_names:
        assert torch.equal(ckpt['state_dict'][name], after[0][name]), name
