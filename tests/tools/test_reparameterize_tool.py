"""tools/reparameterize.py: round trips on an mmpretrain classifier and an mmdet detector, and refusals."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
from conftest import randomize_norms
from mmengine.config import Config

from dynconv_mm.apis import build_model

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CFGS = osp.join(ROOT, 'tests', 'data', 'configs')
TOOL = osp.join(ROOT, 'tools', 'reparameterize.py')


def _tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=900)


def _randomise(model):
    """Give every training-time branch non-trivial values (D of DO-Conv is zero at init) and BN stats."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('.D'):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    randomize_norms(model, seed=1)


def _make_ckpt(cfg_file, tmp_path, corrupt=False):
    cfg = Config.fromfile(osp.join(CFGS, cfg_file))
    model = build_model(cfg)
    _randomise(model)
    if corrupt:
        with torch.no_grad():
            d = next(p for n, p in model.named_parameters() if n.endswith('.D'))
            d.view(-1)[0] = float('inf')
    path = tmp_path / 'train.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    return cfg, path


def _predict(cfg_path, ckpt, data):
    model = build_model(Config.fromfile(cfg_path))
    model.load_state_dict(torch.load(ckpt)['state_dict'], strict=True)
    model.eval()
    with torch.no_grad():
        return model, model.test_step(data)


def test_mmpretrain_classifier_round_trip(tmp_path):
    from mmpretrain.structures import DataSample
    cfg_file = 'mmpretrain_tiny_folder.py'
    _, ckpt = _make_ckpt(cfg_file, tmp_path)
    out_ckpt, out_cfg = tmp_path / 'deploy.pth', tmp_path / 'deploy_cfg.py'
    r = _tool(osp.join(CFGS, cfg_file), ckpt, out_ckpt, '--out-config', out_cfg, '--input-size', 32, 32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'max rel diff' in r.stdout
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample() for _ in range(2)])
    train_model, ref = _predict(osp.join(CFGS, cfg_file), ckpt, data)
    dep_model, out = _predict(str(out_cfg), out_ckpt, data)
    assert not any(type(m).__name__ == 'DOConv2d' and not m.deploy for m in dep_model.modules())
    assert sum(p.numel() for p in dep_model.parameters()) < sum(p.numel() for p in train_model.parameters())
    for a, b in zip(ref, out):
        torch.testing.assert_close(b.pred_score, a.pred_score, rtol=1e-4, atol=1e-5)


def test_mmdet_detector_round_trip(tmp_path):
    from mmdet.structures import DetDataSample
    cfg_file = 'mmdet_maskrcnn_plugin_conv.py'
    _, ckpt = _make_ckpt(cfg_file, tmp_path)
    out_ckpt, out_cfg = tmp_path / 'deploy.pth', tmp_path / 'deploy_cfg.py'
    r = _tool(osp.join(CFGS, cfg_file), ckpt, out_ckpt, '--out-config', out_cfg, '--input-size', 64, 64)
    assert r.returncode == 0, r.stderr[-3000:]
    sample = DetDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(64, 64), pad_shape=(64, 64)))
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)], data_samples=[sample])
    _, ref = _predict(osp.join(CFGS, cfg_file), ckpt, data)
    _, out = _predict(str(out_cfg), out_ckpt, data)
    a, b = ref[0].pred_instances, out[0].pred_instances
    assert len(a) == len(b)
    torch.testing.assert_close(b.bboxes, a.bboxes, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-3, atol=1e-4)


def test_refuses_and_writes_nothing(tmp_path):
    # a model with nothing to fold
    plain = tmp_path / 'plain.py'
    plain.write_text("_base_ = ['mmpretrain::_base_/models/resnet18.py']\ndefault_scope = 'mmpretrain'\n")
    model = build_model(Config.fromfile(str(plain)))
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'plain.pth')
    r = _tool(plain, tmp_path / 'plain.pth', tmp_path / 'out1.pth')
    assert r.returncode == 1 and 'nothing to fold' in r.stderr and not (tmp_path / 'out1.pth').exists()
    # a checkpoint of another model
    cfg_file = osp.join(CFGS, 'mmpretrain_tiny_folder.py')
    r = _tool(cfg_file, tmp_path / 'plain.pth', tmp_path / 'out2.pth', '--input-size', 32, 32)
    assert r.returncode == 1 and 'does not match the config' in r.stderr and not (tmp_path / 'out2.pth').exists()
    # a corrupted training-time checkpoint: the check refuses it
    _, bad = _make_ckpt('mmpretrain_tiny_folder.py', tmp_path, corrupt=True)
    r = _tool(cfg_file, bad, tmp_path / 'out3.pth', '--input-size', 32, 32)
    assert r.returncode == 1 and 'disagrees' in r.stderr and not (tmp_path / 'out3.pth').exists()
    # an already-deployed checkpoint is recognised
    _, good = _make_ckpt('mmpretrain_tiny_folder.py', tmp_path)
    assert _tool(cfg_file, good, tmp_path / 'dep.pth', '--input-size', 32, 32).returncode == 0
    r = _tool(cfg_file, tmp_path / 'dep.pth', tmp_path / 'out4.pth', '--input-size', 32, 32)
    assert r.returncode == 1 and 'already a deploy checkpoint' in r.stderr and not (tmp_path / 'out4.pth').exists()


@pytest.mark.parametrize('missing', ['config', 'checkpoint'])
def test_missing_files(tmp_path, missing):
    cfg_file = osp.join(CFGS, 'mmpretrain_tiny_folder.py') if missing != 'config' else tmp_path / 'nope.py'
    r = _tool(cfg_file, tmp_path / 'nope.pth', tmp_path / 'o.pth')
    assert r.returncode == 1 and 'ERROR' in r.stderr and not (tmp_path / 'o.pth').exists()


def test_refused_deploys_leave_their_inputs_untouched(tmp_path):
    """Nothing a refused deploy does changes its inputs or leaves a file behind; an output path that would
    replace the training checkpoint or config is refused before anything is built."""
    import hashlib
    import shutil

    from dynconv_mm.deploy import ReparamError, reparameterize_checkpoint
    cfg_file = tmp_path / 'train_cfg.py'
    shutil.copy(osp.join(CFGS, 'mmpretrain_tiny_folder.py'), cfg_file)
    (tmp_path / 'good').mkdir()
    (tmp_path / 'bad').mkdir()
    _, ckpt = _make_ckpt('mmpretrain_tiny_folder.py', tmp_path / 'good')
    _, corrupt = _make_ckpt('mmpretrain_tiny_folder.py', tmp_path / 'bad', corrupt=True)

    def state():
        return {str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(tmp_path.rglob('*')) if p.is_file()}

    before = state()
    r = _tool(cfg_file, ckpt, ckpt, '--input-size', 32, 32)   # "in place"
    assert r.returncode == 1 and 'must not replace it' in r.stderr, r.stderr[-2000:]
    with pytest.raises(ReparamError, match='must not replace it'):
        reparameterize_checkpoint(str(cfg_file), str(ckpt), str(tmp_path / 'out.pth'), out_config=str(cfg_file),
                                  input_size=(32, 32))
    with pytest.raises(ReparamError, match='must not replace it'):
        reparameterize_checkpoint(str(cfg_file), str(corrupt), str(corrupt), input_size=(32, 32))
    with pytest.raises(ReparamError, match='disagrees'):
        reparameterize_checkpoint(str(cfg_file), str(corrupt), str(tmp_path / 'out.pth'),
                                  out_config=str(tmp_path / 'out_cfg.py'), input_size=(32, 32))
    assert state() == before
