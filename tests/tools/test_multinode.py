"""Beyond one machine, the OpenMMLab way.

* Two "machines" on this one: ``NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 PORT=P tools/dist_train.sh CONFIG 1``
  (one process each, gloo) train the KernelWarehouse quick-start classifier, shrunk with ``--cfg-options`` to
  three iterations on a tiny toy set; both end with the same trained weights (the shared warehouses included),
  the checkpoint holds them, and ``tools/dist_test.sh`` evaluates it on both.
* ``tools/slurm_train.sh`` / ``tools/slurm_test.sh`` hand srun the command line of OpenMMLab's scripts (a
  stand-in srun records it).
"""
import os
import os.path as osp
import socket
import stat
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmpretrain')

from mmengine.config import Config  # noqa: E402

from dynconv_mm.datasets.toy import make_toy_datasets  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HERE = osp.dirname(osp.abspath(__file__))
CONFIG = osp.join(ROOT, 'configs', '_quickstart_', 'kw1x-r18_toy-in6.py')
ITERS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS='1', **extra,
                PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get('PYTHONPATH', '')]),
                PATH=osp.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))


def _two_nodes(cmd, port: int, cwd: str, timeout: int = 600):
    """Run ``cmd`` as node 0 and node 1 of two at once; returns both outputs (fails on any error)."""
    procs = [subprocess.Popen(cmd(rank), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1', PORT=str(port)))
             for rank in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f'node {rank} failed:\n{log[-4000:]}'
    return logs


def test_two_nodes_train_to_identical_weights_and_test(tmp_path):
    toy = str(tmp_path / 'toy')
    make_toy_datasets(toy, only=['imagenet'], num_train=2, num_val=1, log=lambda *a: None)
    data = osp.join(toy, 'imagenet') + '/'
    # the quick-start config as it is, plus the hook that saves each process's state
    cfg = Config.fromfile(CONFIG)
    cfg.custom_imports = dict(imports=list(cfg.custom_imports['imports']) + ['rank_state_hook'],
                              allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='RankStateHook')]
    cfg_path = str(tmp_path / 'kw_quickstart_rank_state.py')
    cfg.dump(cfg_path)
    shrink = [f'train_cfg.max_iters={ITERS}', 'train_cfg.val_interval=1000',
              f'default_hooks.checkpoint.interval={ITERS}', 'default_hooks.logger.interval=1',
              'train_dataloader.batch_size=4', 'val_dataloader.batch_size=2', 'test_dataloader.batch_size=2']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        shrink += [f'{loader}.dataset.data_root={data}', f'{loader}.num_workers=0',
                   f'{loader}.persistent_workers=False']
    work = [tmp_path / f'node{rank}' for rank in (0, 1)]

    _two_nodes(lambda rank: ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg_path, '1',
                             '--work-dir', str(work[rank]), '--cfg-options', *shrink], _free_port(), str(tmp_path))

    def load(rank, tag):
        return torch.load(work[rank] / f'{tag}_rank{rank}.pth', map_location='cpu', weights_only=False)

    before, after = [load(r, 'before') for r in (0, 1)], [load(r, 'after') for r in (0, 1)]
    for rank in (0, 1):  # one process per node: node R holds global rank R of 2
        assert after[rank]['__dist__'] == dict(rank=rank, world_size=2, wrapper='CPUDistributedDataParallel')
    params = after[0]['__params__']
    assert any('warehouse' in n for n in params)
    moved = 0
    for name in params:  # gradients are averaged over the nodes: the weights stay identical
        assert torch.equal(before[0][name], before[1][name]), f'{name} differs between the nodes before training'
        assert torch.equal(after[0][name], after[1][name]), f'{name} differs between the nodes after training'
        moved += not torch.equal(after[0][name], before[0][name])
    assert moved >= 0.9 * len(params), f'only {moved} of {len(params)} parameters were trained'
    # the checkpoint (written by global rank 0, on node 0) holds its state (BN statistics are each process's own)
    ckpt = torch.load(work[0] / f'iter_{ITERS}.pth', map_location='cpu', weights_only=False)['state_dict']
    assert set(ckpt) == {k for k in after[0] if not k.startswith('__')}
    for name, value in ckpt.items():
        assert torch.equal(value, after[0][name]), name
    assert not (work[1] / f'iter_{ITERS}.pth').exists()

    ckpt_path = str(work[0] / f'iter_{ITERS}.pth')
    logs = _two_nodes(lambda rank: ['bash', osp.join(ROOT, 'tools', 'dist_test.sh'), cfg_path, ckpt_path, '1',
                                    '--work-dir', str(tmp_path / f'test{rank}'), '--cfg-options', *shrink],
                      _free_port(), str(tmp_path))
    assert 'accuracy/top1' in logs[0], logs[0][-3000:]


def test_dist_scripts_say_how_to_call_them():
    for script, n in (('dist_train.sh', 1), ('dist_test.sh', 2), ('slurm_train.sh', 3), ('slurm_test.sh', 3)):
        out = subprocess.run(['bash', osp.join(ROOT, 'tools', script), *['x'] * n], capture_output=True, text=True)
        assert out.returncode == 2 and 'usage:' in out.stderr, (script, out.stderr)


@pytest.mark.parametrize('script, positional, entry', [
    ('slurm_train.sh', ['gpu', 'kw-r50', 'configs/x.py', 'work_dirs/kw'], ['tools/train.py', 'configs/x.py',
                                                                            '--work-dir=work_dirs/kw']),
    ('slurm_test.sh', ['gpu', 'kw-r50', 'configs/x.py', 'ckpt.pth'], ['tools/test.py', 'configs/x.py', 'ckpt.pth']),
])
def test_slurm_scripts_hand_srun_the_openmmlab_command(tmp_path, script, positional, entry):
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    record = tmp_path / 'srun_args'
    srun = bindir / 'srun'
    srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n'
                    f'printf "%s\\n" "$MASTER_PORT" "$PYTHONPATH" >> {record}\n')
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}', GPUS='16', GPUS_PER_NODE='8',
               SRUN_ARGS='--time=2:00:00 --exclusive', PORT='29555', PYTHON='python3')
    env.pop('CPUS_PER_TASK', None)
    out = subprocess.run(['bash', osp.join(ROOT, 'tools', script), *positional, '--cfg-options', 'a=1'],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = record.read_text().splitlines()
    *args, port, pythonpath = lines
    assert args == ['-p', 'gpu', '--job-name=kw-r50', '--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8',
                    '--cpus-per-task=5', '--kill-on-bad-exit=1', '--time=2:00:00', '--exclusive', 'python3', '-u',
                    osp.join(ROOT, entry[0]), *entry[1:], '--launcher=slurm', '--cfg-options', 'a=1']
    assert port == '29555' and pythonpath.split(os.pathsep)[0] == ROOT
