"""``with_cp`` on every backbone: the same outputs and gradients as without it, the blocks really
recomputed, warehouses shared across checkpointed blocks, PEDConv's auxiliary loss counted once,
frozen stages / ``norm_eval`` / ``out_indices`` unchanged, and DDP with two gloo processes. Also the
error for an unknown constructor argument."""
import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from mmpretrain.registry import MODELS
from torch import nn

import dynconv_mm  # noqa: F401  (registers the backbones)
from dynconv_mm.backbones import DWNet, KWConvNeXt, KWMobileNetV2, KWResNet, OREPAResNet, PEDResNet
from dynconv_mm.engine import collect_aux_losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKBONES = {
    'KWResNet': lambda **kw: KWResNet(18, stage_blocks=(2, 1, 1, 1), base_channels=16, **kw),
    'KWResNet-bottleneck': lambda **kw: KWResNet(50, stage_blocks=(2, 1, 1, 1), base_channels=8, **kw),
    'KWMobileNetV2': lambda **kw: KWMobileNetV2(0.25, **kw),
    'KWConvNeXt': lambda **kw: KWConvNeXt(dict(depths=[2, 1, 1, 1], channels=[16, 32, 64, 128]),
                                          gap_before_final_norm=False, layer_scale_init_value=1.0, **kw),
    'PEDResNet': lambda **kw: PEDResNet(depth=18, widen_factor=0.25, **kw),
    'OREPAResNet': lambda **kw: OREPAResNet(depth=18, width_multiplier=0.25, **kw),
    'DWNet': lambda **kw: DWNet(embed_dims=8, depths=[2, 1, 1, 1], drop_path_rate=0., dynamic=True, **kw),
}
SIZE = {'DWNet': 56}


def _pair(name, **kw):
    torch.manual_seed(0)
    plain = BACKBONES[name](**kw)
    if hasattr(plain, 'init_weights'):
        plain.init_weights()
    checkpointed = BACKBONES[name](with_cp=True, **kw)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.with_cp and not plain.with_cp
    return plain.train(), checkpointed.train()


def _step(model, x, seed=1):
    """Outputs and parameter gradients of one training step (auxiliary losses included)."""
    torch.manual_seed(seed)  # PEDConv samples its attention in training: the same draws for both models
    model.zero_grad(set_to_none=True)
    outs = model(x)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
    loss = loss + collect_aux_losses(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        torch.testing.assert_close(oa, ob, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=rtol, atol=atol, msg=lambda m: f'{n}: {m}')


def _count_conv_calls(model):
    """Module path -> how many times each convolution (plain or dynconv_mm layer) was called."""
    from dynconv_mm.layers import LayerProtocol
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, LayerProtocol)):
            m.register_forward_pre_hook(lambda mod, inp, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    return calls


@pytest.mark.parametrize('name', list(BACKBONES))
def test_with_cp_gives_the_gradients_of_the_plain_backbone(name):
    plain, checkpointed = _pair(name, out_indices=(0, 1, 2, 3) if name != 'KWMobileNetV2' else (1, 2, 4, 7))
    x = torch.randn(2, 3, SIZE.get(name, 32), SIZE.get(name, 32))
    plain_calls, cp_calls = _count_conv_calls(plain), _count_conv_calls(checkpointed)
    for step in range(2):  # the second step sees no auxiliary loss left over from the recomputation
        _assert_same(_step(plain, x, seed=step), _step(checkpointed, x, seed=step))
    assert plain_calls.keys() == cp_calls.keys()
    recomputed = [n for n in plain_calls if cp_calls[n] == 2 * plain_calls[n]]
    assert all(cp_calls[n] in (plain_calls[n], 2 * plain_calls[n]) for n in plain_calls)
    assert len(recomputed) >= len(plain_calls) / 2, f'recomputed in the backward pass: {recomputed}'
    before = dict(cp_calls)
    with torch.no_grad():  # no recomputation without gradients, nor in eval mode
        checkpointed(x)
    checkpointed.eval()(x)
    assert all(cp_calls[n] - before[n] == plain_calls[n] for n in plain_calls)  # two plain forwards


def test_shared_warehouses_under_checkpointing():
    """KW-ResNet's warehouses are shared by the convs of several checkpointed blocks; their gradient
    gathers every user's share, recomputed or not, also through the plain path of the KW assembly."""
    from dynconv_mm.layers import torch_internals
    plain, checkpointed = _pair('KWResNet')
    users = {}
    for m in checkpointed.modules():
        if hasattr(m, 'warehouse_id'):
            users.setdefault(m.warehouse_id, []).append(m)
    assert max(len(v) for v in users.values()) >= 3
    x = torch.randn(2, 3, 32, 32)
    _assert_same(_step(plain, x), _step(checkpointed, x))
    with torch_internals.force_fallback():
        _assert_same(_step(plain, x), _step(checkpointed, x))


def test_pedconv_auxiliary_loss_counted_once():
    plain, checkpointed = _pair('PEDResNet')
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, checkpointed):
        model(x)
        first = collect_aux_losses(model)
        assert first.requires_grad and first.item() > 0
        first.backward()
        layers = [m for m in model.modules() if hasattr(m, '_aux_pending')]
        assert layers and not any(m._aux_pending for m in layers), 'the recomputation recorded a loss'
    _assert_same(_step(plain, x), _step(checkpointed, x))


def test_pedconv_auxiliary_loss_once_under_plain_torch_checkpointing():
    """The same with the user's own torch.utils.checkpoint(use_reentrant=False) around the stages
    (no dynconv_mm mark): a forward inside a backward pass is recognised as the recomputation."""
    from dynconv_mm.layers import torch_internals
    if not torch_internals.gradient_sink_supported():
        pytest.skip('the backward-call id is not available on this torch: only with_cp marks recomputation')
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model = PEDResNet(depth=18, widen_factor=0.25).train()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        y = checkpoint(model.layer1, y, use_reentrant=False)
        (y.sum() + collect_aux_losses(model)).backward()
        assert not any(m._aux_pending for m in model.modules() if hasattr(m, '_aux_pending'))


@pytest.mark.parametrize('name', ['KWResNet', 'PEDResNet', 'OREPAResNet', 'KWMobileNetV2', 'KWConvNeXt'])
def test_with_cp_keeps_frozen_stages_and_norm_eval(name):
    plain, checkpointed = _pair(name, frozen_stages=1, norm_eval=True)
    x = torch.randn(2, 3, 32, 32)
    a, b = _step(plain, x), _step(checkpointed, x)
    _assert_same(a, b)
    frozen = [n for n, p in checkpointed.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(b[1]), 'frozen parameters got gradients'
    bns = [m for m in checkpointed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bool(bns) == (name != 'KWConvNeXt') and not any(m.training for m in bns)  # ConvNeXt: LayerNorm only


@pytest.mark.parametrize('name', list(BACKBONES))
def test_unknown_argument_names_the_valid_ones(name):
    expected = r"unknown argument\(s\) 'with_cpp' \(did you mean 'with_cp'\?\).*takes: .*with_cp"
    with pytest.raises(TypeError, match=expected):
        BACKBONES[name](with_cpp=True)
    cls = BACKBONES[name]().__class__.__name__
    with pytest.raises(TypeError, match=r"'frozen_stage' \(did you mean 'frozen_stages'\?\)"):
        MODELS.build(dict(type=cls, frozen_stage=1))


# ------------------------------------------------------------------------------------------------
# DDP, two gloo processes, a KW backbone with with_cp
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, {root!r})
    import dynconv_mm  # noqa
    from dynconv_mm.backbones import KWResNet
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = KWResNet(18, stage_blocks=(2, 1, 1, 1), base_channels=16, with_cp=True)
    model.load_state_dict(torch.load({state!r}))
    ddp = DDP(model.train())
    x = torch.load({data!r})[rank]
    for step in range(2):
        ddp.zero_grad(set_to_none=True)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in ddp(x))
        loss.backward()
    grads = {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    torch.save(grads, os.path.join({out!r}, f'grads{{rank}}.pt'))
    dist.destroy_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_with_cp(tmp_path):
    torch.manual_seed(0)
    model = KWResNet(18, stage_blocks=(2, 1, 1, 1), base_channels=16).train()
    torch.save(model.state_dict(), tmp_path / 'state.pt')
    data = torch.randn(2, 2, 3, 32, 32)
    torch.save(data, tmp_path / 'data.pt')
    script = tmp_path / 'worker.py'
    script.write_text(WORKER.format(root=ROOT, state=str(tmp_path / 'state.pt'), data=str(tmp_path / 'data.pt'),
                                    out=str(tmp_path)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    g0, g1 = (torch.load(tmp_path / f'grads{r}.pt') for r in range(2))
    # reference: each shard's gradient without checkpointing, averaged as DDP does (train-mode BatchNorm
    # normalises with the batch's statistics, so the workers' running statistics do not matter), on one thread
    # as in the workers: the summation order of the CPU kernels follows the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shards = [_step(copy.deepcopy(model), data[r])[1] for r in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert g0.keys() == g1.keys() == shards[0].keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0)
        torch.testing.assert_close(g0[n], (shards[0][n] + shards[1][n]) / 2, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f'{n}: {m}')
