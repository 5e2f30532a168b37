"""The auxiliary-loss path: PEDConv's info-max term must reach the optimizer (or fail loudly)."""
import copy
import warnings

import pytest
import torch
from mmengine.model import BaseModel
from torch import nn
from torch.utils.data import Dataset

from dynconv_mm.engine.aux_loss import (
    AuxLossHook,
    UncollectedAuxLossError,
    collect_aux_losses,
    get_aux_loss_guard,
    set_aux_loss_guard,
)
from dynconv_mm.layers import PEDConv2d


class ToyNet(BaseModel):
    """conv -> PEDConv -> PEDConv -> GAP -> linear; ``loss()`` knows nothing of auxiliary losses."""

    def __init__(self, noise_std=0.1, aux_loss_weight=0.001):
        super().__init__()
        kw = dict(noise_std=noise_std, aux_loss_weight=aux_loss_weight)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.ped1 = PEDConv2d(16, 16, 3, padding=1, **kw)
        self.ped2 = PEDConv2d(16, 32, 3, stride=2, padding=1, **kw)
        self.fc = nn.Linear(32, 3)

    def features(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.ped1(x))
        return torch.relu(self.ped2(x)).mean((2, 3))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        logits = self.fc(self.features(inputs))
        if mode == 'loss':
            return {'loss_cls': nn.functional.cross_entropy(logits, data_samples)}
        return logits


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), data_samples=torch.tensor(i % 3))


def make_runner(tmp_path, model, hooks):
    from mmengine.runner import Runner
    return Runner(
        model=model,
        work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=2),
        custom_hooks=hooks,
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        log_level='WARNING',
        experiment_name=f'aux{id(model)}',
    )


@pytest.fixture(autouse=True)
def _guard_default():
    yield
    set_aux_loss_guard('raise')


def test_runner_with_hook_logs_and_optimises_aux_loss(tmp_path, cpu_on_any_host):
    model = ToyNet()
    dec0 = copy.deepcopy(model.ped1.attn.decoder.state_dict())
    dec0_2 = copy.deepcopy(model.ped2.attn.decoder.state_dict())
    runner = make_runner(tmp_path, model, [dict(type='AuxLossHook')])
    runner.train()
    hist = runner.message_hub.get_scalar('train/loss_aux_infomax')
    values = hist.data[0]
    assert len(values) == 2 and all(v > 0 for v in values)
    # the total loss logged includes the auxiliary term
    total = runner.message_hub.get_scalar('train/loss').data[0]
    cls = runner.message_hub.get_scalar('train/loss_cls').data[0]
    assert abs(total[-1] - cls[-1] - values[-1]) < 1e-6
    # the decoder is used only by the info-max loss: it moved, so the loss was optimised (its output
    # bias always gets a gradient; the hidden ReLU units may be inactive for the first layer)
    assert not torch.equal(model.ped1.attn.decoder[2].bias.detach(), dec0['2.bias'])
    assert not torch.equal(model.ped2.attn.decoder[2].bias.detach(), dec0_2['2.bias'])
    assert not model.ped1._aux_pending and not model.ped2._aux_pending


def test_runner_without_hook_fails_on_first_iteration(tmp_path, cpu_only):
    runner = make_runner(tmp_path, ToyNet(), [])
    with pytest.raises(UncollectedAuxLossError, match=r"custom_hooks=\[dict\(type='AuxLossHook'\)\]"):
        runner.train()


def test_hook_value_weight_override_and_name():
    model = ToyNet(noise_std=0.0).train()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    # the expected term: weight * sum over layers of MSE(decoder(z), pooled input)
    pooled = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: pooled.__setitem__(n, a[0].mean((2, 3))))
             for n, m in (('ped1', model.ped1), ('ped2', model.ped2))]
    hook = AuxLossHook()
    hook.attach(model)
    losses = model(x, y, mode='loss')
    for h in hooks:
        h.remove()
    expected = 0
    for n in ('ped1', 'ped2'):
        attn = getattr(model, n).attn
        z = attn(pooled[n])[3]
        expected = expected + attn.infomax_loss(z, pooled[n])
    torch.testing.assert_close(losses['loss_aux_infomax'], 0.001 * expected)
    assert set(losses) == {'loss_cls', 'loss_aux_infomax'}
    # a non-loss forward is left alone (and nothing is recorded under no_grad / in eval)
    with torch.no_grad():
        assert isinstance(model(x, mode='tensor'), torch.Tensor)
    hook.detach()

    over = AuxLossHook(loss_weight=1.0, loss_name='recon')
    over.attach(model)
    losses2 = model(x, y, mode='loss')
    torch.testing.assert_close(losses2['loss_aux_recon'], expected, rtol=1e-5, atol=1e-7)
    assert 'loss_aux_infomax' not in losses2
    over.detach()
    model(x, y, mode='loss')  # detached: the loss stays pending
    assert model.ped1._aux_pending
    collect_aux_losses(model)


def test_hook_unwraps_data_parallel(cpu_on_any_host):
    model = ToyNet()
    wrapped = nn.DataParallel(model)  # CUDA hidden: DataParallel just calls the module on the CPU
    hook = AuxLossHook()
    assert hook.attach(wrapped) == 2
    losses = wrapped(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), mode='loss')
    assert 'loss_aux_infomax' in losses
    sum(losses.values()).backward()  # collected: the guard stays quiet
    assert model.ped1.attn.decoder[2].bias.grad.abs().sum() > 0
    hook.detach()


def test_plain_pytorch_collect_and_guard_modes():
    model = ToyNet().train()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    assert float(collect_aux_losses(model)) == 0.0  # nothing recorded yet
    loss = model(x, y, mode='loss')['loss_cls'] + collect_aux_losses(model)
    loss.backward()
    assert model.ped2.attn.decoder[2].bias.grad.abs().sum() > 0
    by_name = collect_aux_losses(model, by_name=True)
    assert by_name == {}

    # forgotten collection: raise (default) during backward, naming the fix
    assert get_aux_loss_guard() == 'raise'
    with pytest.raises(UncollectedAuxLossError, match='collect_aux_losses'):
        model(x, y, mode='loss')['loss_cls'].backward()
    assert not model.ped1._aux_pending  # cleared, so the next step starts clean

    set_aux_loss_guard('warn')
    with pytest.warns(RuntimeWarning, match='AuxLossHook'):
        model(x, y, mode='loss')['loss_cls'].backward()
    set_aux_loss_guard('ignore')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model(x, y, mode='loss')['loss_cls'].backward()
    collect_aux_losses(model)
    with pytest.raises(ValueError, match='mode must be one of'):
        set_aux_loss_guard('sometimes')


def test_eval_and_weight_zero_never_trip_the_guard():
    model = ToyNet(aux_loss_weight=0.0).train()
    model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), mode='loss')['loss_cls'].backward()
    model = ToyNet().eval()
    out = model(torch.randn(2, 3, 8, 8), mode='tensor')
    out.sum().backward()
    assert not model.ped1._aux_pending


def test_hook_argument_errors():
    with pytest.raises(ValueError, match='loss_weight must be >= 0'):
        AuxLossHook(loss_weight=-1)
    with pytest.raises(ValueError, match='loss_name must be a non-empty string'):
        AuxLossHook(loss_name='')


def test_mmpretrain_image_classifier_with_stock_resnet():
    pytest.importorskip('mmpretrain', reason='mmpretrain is not installed')
    from mmpretrain.registry import MODELS

    import dynconv_mm  # noqa: F401  (registers the layers and the hook)
    model = MODELS.build(dict(
        type='ImageClassifier', _scope_='mmpretrain',
        backbone=dict(type='ResNet', depth=18, base_channels=16, conv_cfg=dict(type='PEDConv2d'), out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=4, in_channels=128, loss=dict(type='CrossEntropyLoss')),
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=4, mean=[127.5] * 3, std=[64.0] * 3)))
    model.init_weights()
    model.train()
    n = sum(isinstance(m, PEDConv2d) for m in model.modules())
    assert n > 16  # stem, block convs and downsample shortcuts all became PEDConv2d
    hook = AuxLossHook()
    assert hook.attach(model) == n
    from mmengine.optim import OptimWrapper
    from mmpretrain.structures import DataSample
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    # the objective mmengine optimises (parse_losses) contains the term; ClsHead's own key is 'loss'
    losses = model(**model.data_preprocessor(data, True), mode='loss')
    total, _ = model.parse_losses(losses)
    assert set(losses) == {'loss', 'loss_aux_infomax'}
    torch.testing.assert_close(total, losses['loss'] + losses['loss_aux_infomax'])
    total.backward()  # collected by the hook: the guard stays quiet
    optim.zero_grad()
    log_vars = model.train_step(data, optim)
    assert 'loss_aux_infomax' in log_vars and log_vars['loss_aux_infomax'].item() > 0
    hook.detach()


def test_gradient_checkpointing():
    """Non-reentrant checkpointing keeps the term (its graph is recomputed); reentrant checkpointing runs
    the forward without autograd, so the term would be lost: the guard reports it."""
    from torch.utils.checkpoint import checkpoint
    layer = PEDConv2d(16, 16, 3, padding=1).train()
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    for _ in range(2):
        loss = checkpoint(layer, x, use_reentrant=False).sum() + collect_aux_losses(layer)
        loss.backward()
        assert not layer._aux_pending
    assert layer.attn.decoder[2].bias.grad.abs().sum() > 0
    loss = checkpoint(layer, x, use_reentrant=True).sum() + collect_aux_losses(layer)
    with pytest.raises(UncollectedAuxLossError, match='use_reentrant=False'):
        loss.backward()


def test_copies_do_not_carry_pending_losses():
    model = ToyNet().train()
    model(torch.randn(2, 3, 8, 8), mode='tensor')
    assert model.ped1._aux_pending
    ema = copy.deepcopy(model)  # e.g. an EMA copy taken mid-step
    assert not ema.ped1._aux_pending and model.ped1._aux_pending
    assert ema.ped1.aux_loss_weight == 0.001
    collect_aux_losses(model)


def test_pile_up_without_backward_is_reported():
    from dynconv_mm.engine.aux_loss import MAX_PENDING
    layer = PEDConv2d(16, 16, 1).train()
    x = torch.randn(2, 16, 3, 3)
    for _ in range(MAX_PENDING):
        layer(x)
    with pytest.raises(UncollectedAuxLossError):
        layer(x)
    assert not layer._aux_pending
    set_aux_loss_guard('ignore')
    for _ in range(2 * MAX_PENDING + 1):
        layer(x)
    assert 0 < len(layer._aux_pending) <= MAX_PENDING  # bounded: no graphs pile up
