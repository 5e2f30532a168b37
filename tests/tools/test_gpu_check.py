"""tools/gpu_check.py: the dry run (every part on the CPU at tiny sizes) passes and writes both reports,
and the machinery reports failing, raising and overrunning parts as such."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from dynconv_mm.gpu_check import PARTS, STATUSES, Part, validate_report
from dynconv_mm.gpu_check.core import run_parts

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'gpu_check.py')
#: parts with something that only a GPU can run: the dry run must say what it skipped
CUDA_SKIPS = {'environment', 'native_spy', 'parity', 'microbench'}


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]),
               CUDA_VISIBLE_DEVICES='')
    # the dry-run budgets guard against a hang, not a slow machine: a busy CI core gets three times
    # as long, so that every item of every part runs and the test below sees all of them
    proc = subprocess.run([sys.executable, TOOL, '--dry-run', '--budget-scale', '3', '--out', str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    return proc, out


def test_dry_run_passes_and_writes_both_reports(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / 'report.json') as f:
        data = json.load(f)
    validate_report(data, [p.name for p in PARTS])
    assert data['dry_run'] is True and data['device'] == 'cpu' and data['ok'] is True
    cut = [s for p in data['parts'] for s in p['skipped'] if 'not started' in s]
    assert not cut, f'parts cut short by their budgets: {cut}'
    failed = {p['name']: (p['status'], p['error'], p['skipped']) for p in data['parts'] if p['status'] != 'pass'}
    assert not failed, failed
    md = (out / 'report.md').read_text()
    for part in data['parts']:
        assert f'## {part["name"]}' in md
        assert part['tables'], f'{part["name"]} measured nothing'
        assert part['summary'], part['name']
        needs_cuda = [s for s in part['skipped'] if 'needs CUDA' in s]
        assert bool(needs_cuda) == (part['name'] in CUDA_SKIPS), (part['name'], part['skipped'])
        assert osp.isfile(out / part['log'])


def test_dry_run_checks_what_the_gpu_run_checks(dry_run):
    _, out = dry_run
    with open(out / 'report.json') as f:
        parts = {p['name']: p for p in json.load(f)['parts']}
    from dynconv_mm.registry import registered_names
    layers = {r['layer'] for r in parts['parity']['tables']['layers']}
    assert layers == set(registered_names('conv'))
    spied = {r['model'] for r in parts['native_spy']['tables']['calls']}
    assert set(registered_names('conv')) <= spied
    assert parts['native_spy']['tables']['control'][0]['kernel_calls'] > 0  # the spy sees the kernels
    amp = parts['amp']['tables']['steps']
    assert {r['precision'] for r in amp} == {'fp16', 'bf16'} and len(amp) == 2 * 3
    assert parts['microbench']['findings']['fastest_train_impl_by_kernel']
    assert {r['backend'] for r in parts['ddp']['tables']['runs']} == {'gloo'}
    assert len(parts['ddp']['tables']['runs']) == 2
    compiled = parts['compile']['tables']['compile']
    assert {r['mode'] for r in compiled} == {'train step', 'eval forward'}
    for i, r in enumerate(compiled):  # a known torch failure is followed by its workaround, which passes
        if r.get('known_issue'):
            assert r['ok'] is None and compiled[i + 1]['model'] == r['model'] and compiled[i + 1]['ok'] is True, r
    assert len(parts['benchmark']['tables']['cases']) == 2


FAKE_PARTS = '''
import time

def fails(ctx):
    ctx.row('checks', what='something', ok=False)

def raises(ctx):
    ctx.row('checks', what='before the error', ok=True)
    raise ValueError('broken on purpose')

def overruns(ctx):
    ctx.row('checks', what='measured before the budget ran out', ok=True)
    time.sleep(120)
'''


def test_statuses_of_failing_raising_and_overrunning_parts(tmp_path, monkeypatch):
    (tmp_path / 'fake_parts.py').write_text(FAKE_PARTS)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(tmp_path), ROOT, os.environ.get('PYTHONPATH', '')]))
    parts = [Part(name, name, f'fake_parts:{name}', 60, 6, 'a test part') for name in ('fails', 'raises', 'overruns')]
    parts.append(Part('late', 'late', 'fake_parts:fails', 60, 60, 'a test part'))
    data = run_parts(parts, str(tmp_path / 'out'), 'cpu', dry_run=True, time_limit=40, log=lambda *a: None, grace_s=2)
    validate_report(data, ['fails', 'raises', 'overruns', 'late'])
    status = {p['name']: p for p in data['parts']}
    assert status['fails']['status'] == 'fail'
    assert status['raises']['status'] == 'error' and 'broken on purpose' in status['raises']['error']
    assert status['raises']['tables']['checks'][0]['ok'] is True  # rows before the error are kept
    assert status['overruns']['status'] == 'timeout'
    assert status['overruns']['tables']['checks'], 'a part stopped at its budget keeps its rows'
    assert status['late']['status'] in STATUSES and data['ok'] is False
    with pytest.raises(ValueError, match='status'):
        validate_report(dict(data, parts=[dict(status['fails'], status='maybe')], counts=dict(data['counts'])))


def test_real_run_without_a_gpu_is_refused(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, TOOL, '--out', str(tmp_path), '--parts', 'environment'],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and '--dry-run' in proc.stderr
    proc = subprocess.run([sys.executable, TOOL, '--dry-run', '--parts', 'nope', '--out', str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and 'known' in proc.stderr
    proc = subprocess.run([sys.executable, TOOL, '--dry-run', '--budget-scale', '0', '--out', str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and 'budget_scale' in proc.stderr


def test_budget_scale_multiplies_every_budget(tmp_path, monkeypatch):
    (tmp_path / 'fake_parts.py').write_text(FAKE_PARTS)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(tmp_path), ROOT, os.environ.get('PYTHONPATH', '')]))
    part = Part('fails', 'fails', 'fake_parts:fails', 60, 6, 'a test part')
    data = run_parts([part], str(tmp_path / 'out'), 'cpu', dry_run=True, log=lambda *a: None, budget_scale=2.5)
    assert data['parts'][0]['budget_s'] == 15.0 and data['budget_scale'] == 2.5


def test_known_torch_bugs_match_only_their_versions():
    from dynconv_mm.gpu_check.compile_check import known_torch_bug
    error = 'InductorError: TypeError: cannot determine truth value of Relational: 16*s0*s53 < 16'
    what, workaround = known_torch_bug(error, '2.14.1+cu130')
    assert 'fixed in torch 2.15' in what and workaround == dict(dynamic=False)
    assert known_torch_bug(error, '2.15.0') is None
    assert known_torch_bug('RuntimeError: something else', '2.14.1') is None
