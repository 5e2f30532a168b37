"""Loading a training-time re-param checkpoint into a deploy-built model, or the reverse, fails with a
message that says which one it is and which tool to run: with ``load_state_dict`` (strict or not) and
with mmengine's ``load_checkpoint`` (non-strict by default, which would otherwise leave layers random)."""
import copy

import pytest
import torch

import dynconv_mm
from dynconv_mm.backbones.orepa_resnet import OREPAResNet
from dynconv_mm.layers.reparam import DOConv2d
from dynconv_mm.utils.load_errors import ReparamFormError


def _pair():
    train = OREPAResNet(18, width_multiplier=0.25).eval()
    deployed = dynconv_mm.reparameterize_model(copy.deepcopy(train))
    return train, deployed


@pytest.mark.parametrize('strict', [True, False])
def test_training_checkpoint_into_deploy_model(strict):
    train, _ = _pair()
    target = OREPAResNet(18, width_multiplier=0.25, deploy=True)
    with pytest.raises(ReparamFormError, match=r"deploy form .* training-time .*tools/reparameterize\.py"):
        target.load_state_dict(train.state_dict(), strict=strict)


@pytest.mark.parametrize('strict', [True, False])
def test_deploy_checkpoint_into_training_model(strict):
    _, deployed = _pair()
    target = OREPAResNet(18, width_multiplier=0.25)
    with pytest.raises(ReparamFormError, match=r"training form .* deployed \(folded\).*tools/reparameterize\.py"):
        target.load_state_dict(deployed.state_dict(), strict=strict)


def test_mmengine_load_checkpoint_fails_clearly(tmp_path):
    from mmengine.runner import load_checkpoint
    train, deployed = _pair()
    p_train, p_dep = str(tmp_path / 'train.pth'), str(tmp_path / 'deploy.pth')
    torch.save({'state_dict': train.state_dict()}, p_train)
    torch.save({'state_dict': deployed.state_dict()}, p_dep)
    with pytest.raises(ReparamFormError, match='training-time'):
        load_checkpoint(OREPAResNet(18, width_multiplier=0.25, deploy=True), p_train, map_location='cpu')
    with pytest.raises(ReparamFormError, match='deploy checkpoint'):
        load_checkpoint(OREPAResNet(18, width_multiplier=0.25), p_dep, map_location='cpu')
    # matching forms load, and give the same outputs
    a, b = OREPAResNet(18, width_multiplier=0.25).eval(), OREPAResNet(18, width_multiplier=0.25, deploy=True).eval()
    load_checkpoint(a, p_train, map_location='cpu', strict=True)
    load_checkpoint(b, p_dep, map_location='cpu', strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for u, v in zip(a(x), b(x)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())


def test_layer_through_conv_cfg_and_partial_checkpoints():
    train = DOConv2d(4, 8, 3, padding=1)
    dep = DOConv2d(4, 8, 3, padding=1, deploy=True)
    with pytest.raises(ReparamFormError, match="DOConv2d at 'conv'"):
        torch.nn.ModuleDict({'conv': dep}).load_state_dict({f'conv.{k}': v for k, v in train.state_dict().items()},
                                                          strict=False)
    # a checkpoint without this layer's keys (e.g. a head only) is not a form mismatch
    res = torch.nn.ModuleDict({'conv': dep}).load_state_dict({}, strict=False)
    assert res.missing_keys == ['conv.reparam.weight', 'conv.reparam.bias']
