"""Real mmengine Runner round trips: checkpoints load under weights_only=True, and the temperature
schedule follows the official formula and survives ``resume=True`` mid-annealing."""
import copy
import subprocess
import sys

import pytest
import torch
from mmengine.dataset import BaseDataset
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

import dynconv_mm  # noqa: F401
from dynconv_mm.engine.hooks import TemperatureHook, linear_temperature
from dynconv_mm.layers.temperature import TemperatureMixin


class _TempScale(TemperatureMixin, nn.Module):
    """A minimal temperature-bearing layer that records the temperature of each training forward."""

    temperature_divides = False  # its schedule runs to 0, as KernelWarehouse's

    def __init__(self):
        super().__init__()
        self.init_temperature(123.0)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(float(self.temperature))
        return x * (1 + 0.01 * self.temperature)


class _ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.temp = _TempScale()

    def forward(self, inputs, labels=None, mode='tensor', **kwargs):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        out = self.temp(self.fc(x))
        if mode == 'loss':
            y = torch.stack(labels) if isinstance(labels, list) else labels
            return {'loss': nn.functional.cross_entropy(out, y)}
        if mode == 'predict':
            return [dict(pred=o) for o in out]
        return out


class _ToyDataset(BaseDataset):
    def __init__(self, n=8, **kwargs):
        self.n = n
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.n, 4, generator=g)
        y = (x[:, 0] > 0).long()
        return [dict(inputs=x[i], labels=y[i]) for i in range(self.n)]




@pytest.fixture(autouse=True)
def _restore_determinism():
    """``randomness=dict(deterministic=True)`` switches PyTorch's deterministic mode on for the whole
    process (and cuDNN's flags); later tests must not inherit it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def _runner(work_dir, max_epochs, resume=False, load_from=None, hooks=(), seed=0):
    from mmengine.evaluator import BaseMetric

    class AccMetric(BaseMetric):
        def process(self, data_batch, data_samples):
            self.results.append(len(data_samples))

        def compute_metrics(self, results):
            return dict(n=sum(results))

    loader = dict(dataset=_ToyDataset(), sampler=dict(type='DefaultSampler', shuffle=False),
                  batch_size=2, num_workers=0, collate_fn=dict(type='default_collate'))
    torch.manual_seed(seed)
    return Runner(
        model=_ToyModel(), work_dir=str(work_dir), train_dataloader=loader,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=100),
        test_dataloader=copy.deepcopy(loader), test_cfg=dict(), test_evaluator=AccMetric(),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks), resume=resume, load_from=load_from,
        randomness=dict(seed=seed, deterministic=True), default_scope='mmengine')


def test_runner_checkpoint_resume_and_test_with_weights_only(tmp_path, cpu_on_any_host):
    r = _runner(tmp_path, max_epochs=2)
    r.train()
    ckpt = tmp_path / 'epoch_2.pth'
    assert ckpt.exists()
    # the file really holds what weights_only refuses without dynconv_mm's allow-list ...
    code = ('import torch, sys\n'
            f'try:\n    torch.load({str(ckpt)!r}, weights_only=True)\n'
            'except Exception as e:\n    print("REFUSED", type(e).__name__); sys.exit(0)\n'
            'print("LOADED")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert 'REFUSED' in out.stdout, out.stdout + out.stderr
    # ... and loads with it, through torch.load's default
    sd = torch.load(ckpt)
    assert 'message_hub' in sd and 'state_dict' in sd
    # resume continues, test loads the checkpoint
    r2 = _runner(tmp_path, max_epochs=3, resume=True)
    r2.train()
    assert r2.epoch == 3 and r2.iter == 12
    r3 = _runner(tmp_path / 'test', max_epochs=3, load_from=str(tmp_path / 'epoch_3.pth'))
    metrics = r3.test()
    assert metrics['n'] == 8


def test_temperature_hook_follows_official_schedule(tmp_path, cpu_only):
    hook = dict(type='TemperatureHook', start=1.0, end=0.0, num_epochs=1)
    r = _runner(tmp_path, max_epochs=2, hooks=[hook])
    r.train()
    seen = r.model.temp.seen
    assert len(seen) == 8
    expected = [linear_temperature(i + 1, 4, 1.0, 0.0) for i in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[:4] == pytest.approx([0.75, 0.5, 0.25, 0.0]) and seen[4:] == [0.0] * 4
    ck = torch.load(tmp_path / 'epoch_1.pth')
    assert ck['meta']['temperature'] == pytest.approx(0.0)


def test_temperature_hook_presets_and_errors():
    h = TemperatureHook(preset='dyconv')
    assert (h.start, h.end, h.num_epochs) == (30.0, 1.0, 10)
    assert TemperatureHook(preset='kernelwarehouse', num_iters=5).num_iters == 5
    with pytest.raises(ValueError, match='unknown preset'):
        TemperatureHook(preset='nope')
    with pytest.raises(ValueError, match='not both'):
        TemperatureHook(num_epochs=1, num_iters=3)


def test_resume_mid_annealing_matches_uninterrupted_run(tmp_path, cpu_only):
    hook = dict(type='TemperatureHook', start=30.0, end=1.0, num_iters=10)
    full = _runner(tmp_path / 'full', max_epochs=4, hooks=[hook])
    full.train()
    part = _runner(tmp_path / 'part', max_epochs=2, hooks=[hook])
    part.train()
    resumed = _runner(tmp_path / 'part', max_epochs=4, hooks=[hook], resume=True)
    resumed.train()
    assert resumed.model.temp.seen == pytest.approx(full.model.temp.seen[8:])
    assert resumed.model.temp.seen[0] == pytest.approx(linear_temperature(9, 10, 30.0, 1.0))
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
