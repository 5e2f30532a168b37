"""The check's machinery: parts with time budgets, the worker process each part runs in, and the reports.

Every part runs in its own Python process (:mod:`dynconv_mm.gpu_check.worker`), so that a crash, a
hang or a broken CUDA context in one part is reported and the next part starts clean. A part writes
its rows to a JSON file as it goes; a part stopped at its budget keeps what it had measured
(status ``timeout``).
"""
from __future__ import annotations

import importlib
import json
import os
import os.path as osp
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ['SCHEMA', 'STATUSES', 'Part', 'PartContext', 'run_parts', 'write_reports', 'validate_report',
           'render_markdown']

SCHEMA = 'dynconv_mm.gpu_check/1'
#: ``pass``: every check held; ``fail``: a check did not; ``error``: the part raised or its process died;
#: ``timeout``: stopped at its budget (its rows so far are kept); ``skipped``: nothing of it could run here
STATUSES = ('pass', 'fail', 'error', 'timeout', 'skipped')
#: seconds a worker gets beyond its part's budget to start (imports) and to write its result
GRACE_S = 25.0
_PART_KEYS = ('name', 'title', 'measures', 'status', 'seconds', 'budget_s', 'summary', 'skipped', 'notes', 'tables',
              'findings', 'error', 'log')


@dataclass(frozen=True)
class Part:
    """One part of the check.

    Attributes:
        name: identifier (``--parts``).
        title: heading in the report.
        target: ``'module:function'`` run in the worker as ``function(ctx)``.
        budget_s: seconds it may take on one GPU (the whole check fits in ten minutes).
        dry_budget_s: seconds it may take in the dry run on the CPU.
        measures: one sentence for the report and the docs.
    """

    name: str
    title: str
    target: str
    budget_s: float
    dry_budget_s: float
    measures: str


class PartContext:
    """What a part function receives: where it runs, how long it may take, and where its results go.

    Tables are lists of flat dicts (one row each); a row with ``ok=False`` fails the part.
    """

    def __init__(self, name: str, device: str, dry_run: bool, budget_s: float, out_dir: str,
                 result_path: str) -> None:
        self.name = name
        self.device = device
        self.dry_run = dry_run
        self.budget_s = float(budget_s)
        self.out_dir = out_dir
        self.result_path = result_path
        self.started = time.monotonic()
        self.summary = ''
        self.tables: Dict[str, List[Dict[str, Any]]] = {}
        self.skipped: List[str] = []
        self.notes: List[str] = []
        self.findings: Dict[str, Any] = {}
        os.makedirs(out_dir, exist_ok=True)

    @property
    def cuda(self) -> bool:
        return self.device.startswith('cuda')

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def enough_time(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` are left of the budget; if not, ``what`` is recorded as skipped."""
        left = self.time_left()
        if left >= seconds:
            return True
        self.skip(what, f'not started: {max(left, 0):.0f} s of the {self.budget_s:.0f} s budget left')
        return False

    def row(self, table: str, **values: Any) -> Dict[str, Any]:
        """Append a row to ``table`` (and save the partial result)."""
        row = {k: _plain(v) for k, v in values.items()}
        self.tables.setdefault(table, []).append(row)
        self.save()
        return row

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f'{what}: {why}')
        self.save()

    def cuda_only(self, what: str) -> None:
        """Record that ``what`` needs CUDA and did not run (the dry run on the CPU)."""
        self.skip(what, 'needs CUDA (dry run on the CPU)')

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.save()

    def finding(self, key: str, value: Any) -> None:
        self.findings[key] = _plain(value)
        self.save()

    @property
    def failed(self) -> bool:
        return any(r.get('ok') is False for rows in self.tables.values() for r in rows)

    def result(self, status: Optional[str] = None, error: Optional[str] = None) -> Dict[str, Any]:
        if status is None:
            if self.failed:
                status = 'fail'
            elif not self.tables and self.skipped:
                status = 'skipped'
            else:
                status = 'pass'
        return dict(name=self.name, status=status, seconds=round(time.monotonic() - self.started, 2),
                    summary=self.summary, skipped=list(self.skipped), notes=list(self.notes),
                    tables=self.tables, findings=self.findings, error=error)

    def save(self, status: Optional[str] = None, error: Optional[str] = None) -> None:
        """Write the result so far (``status=None``: still running, unless told)."""
        data = self.result(status, error)
        if status is None:
            data['status'] = 'running'
        tmp = self.result_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, self.result_path)


def _plain(v: Any) -> Any:
    """JSON-friendly values (tensors and numpy scalars become numbers, tuples lists)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    item = getattr(v, 'item', None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(v)


def resolve_target(target: str) -> Callable[[PartContext], None]:
    module, _, fn = target.partition(':')
    return getattr(importlib.import_module(module), fn)


def run_in_worker(spec: Dict[str, Any]) -> int:
    """The worker's side: run one part (``spec`` from :func:`run_parts`) and write its result."""
    ctx = PartContext(spec['name'], spec['device'], spec['dry_run'], spec['budget_s'], spec['out_dir'],
                      spec['result_path'])
    ctx.save()
    try:
        resolve_target(spec['target'])(ctx)
    except BaseException as err:  # a failed part is reported; the next one still runs
        ctx.save('error', f'{type(err).__name__}: {err}\n' + traceback.format_exc()[-4000:])
        return 1
    ctx.save(ctx.result()['status'])
    return 0


def _package_root() -> str:
    return osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def run_parts(parts: Sequence[Part], out_dir: str, device: str, dry_run: bool, time_limit: Optional[float] = None,
              log: Callable[[str], None] = print, grace_s: float = GRACE_S,
              budget_scale: float = 1.0) -> Dict[str, Any]:
    """Run ``parts`` one after another, each in a worker process under its budget times
    ``budget_scale`` (and, with ``time_limit``, within that many seconds in all; a worker still running
    ``grace_s`` after its budget is stopped); returns the report's data."""
    if not budget_scale > 0:
        raise ValueError(f'budget_scale must be a positive number of times the parts\' budgets, got {budget_scale!r}')
    os.makedirs(osp.join(out_dir, 'logs'), exist_ok=True)
    os.makedirs(osp.join(out_dir, 'parts'), exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_package_root(), env.get('PYTHONPATH', '')) if p)
    env.setdefault('PYTHONUNBUFFERED', '1')
    if dry_run:
        # tiny tensors: one thread is as fast, and immune to a machine whose cores are busy (several
        # OpenMP threads spinning against other processes run 10x slower)
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = '1'

    results = []
    for part in parts:
        budget = (part.dry_budget_s if dry_run else part.budget_s) * budget_scale
        if time_limit is not None:
            budget = min(budget, time_limit - (time.monotonic() - start) - grace_s)
        result_path = osp.join(out_dir, 'parts', f'{part.name}.json')
        log_path = osp.join(out_dir, 'logs', f'{part.name}.log')
        base = dict(name=part.name, title=part.title, measures=part.measures, budget_s=round(max(budget, 0.0), 1),
                    log=osp.relpath(log_path, out_dir))
        if budget < 5:
            results.append(dict(base, status='skipped', seconds=0.0, summary='', skipped=[
                f'{part.name}: not started: the time limit of {time_limit:.0f} s was used up'], notes=[], tables={},
                findings={}, error=None))
            log(f'[{part.name}] skipped: out of time')
            continue
        spec = dict(name=part.name, target=part.target, device=device, dry_run=dry_run, budget_s=budget,
                    out_dir=osp.join(out_dir, part.name), result_path=result_path)
        spec_path = osp.join(out_dir, 'parts', f'{part.name}.spec.json')
        with open(spec_path, 'w') as f:
            json.dump(spec, f)
        if osp.exists(result_path):
            os.remove(result_path)
        log(f'[{part.name}] {part.title} (budget {budget:.0f} s)')
        t0 = time.monotonic()
        timed_out = False
        with open(log_path, 'w') as logf:
            proc = subprocess.Popen([sys.executable, '-m', 'dynconv_mm.gpu_check.worker', spec_path],
                                    stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget + grace_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
        seconds = time.monotonic() - t0
        result = _read_result(result_path)
        if result is None:
            result = dict(status='error', summary='', skipped=[], notes=[], tables={}, findings={},
                          error=f'the worker wrote no result (exit code {rc}); last lines of its log:\n'
                                + _tail(log_path))
        if timed_out:
            result['status'] = 'timeout'
            result['error'] = (result.get('error') or '') + f'stopped after {seconds:.0f} s (budget {budget:.0f} s)'
        elif result.get('status') == 'running':
            result['status'] = 'error'
            result['error'] = f'the worker died (exit code {rc}); last lines of its log:\n' + _tail(log_path)
        result.update(base, seconds=round(seconds, 1))
        results.append({k: result.get(k) for k in _PART_KEYS})
        log(f'[{part.name}] {result["status"]} in {seconds:.1f} s' + (f': {result["summary"]}' if result['summary']
                                                                       else ''))
    data = dict(schema=SCHEMA, dry_run=dry_run, device=device, started=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                seconds=round(time.monotonic() - start, 1), time_limit_s=time_limit, budget_scale=budget_scale,
                parts=results,
                counts={s: sum(r['status'] == s for r in results) for s in STATUSES})
    data['ok'] = all(r['status'] in ('pass', 'skipped') for r in results)
    return data


def _kill_group(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and what it started (torchrun, the benchmark)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _read_result(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors='replace') as f:
            return f.read()[-chars:]
    except OSError:
        return ''


# ------------------------------------------------------------------------------------------- reports
def validate_report(data: Dict[str, Any], part_names: Optional[Sequence[str]] = None) -> None:
    """``ValueError`` listing what is wrong with a report's data (the JSON schema, checked by hand)."""
    problems = []

    def expect(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    expect(data.get('schema') == SCHEMA, f'schema is {data.get("schema")!r}, expected {SCHEMA!r}')
    for key, typ in (('dry_run', bool), ('device', str), ('started', str), ('seconds', (int, float)),
                     ('parts', list), ('counts', dict), ('ok', bool)):
        expect(isinstance(data.get(key), typ), f'{key!r} missing or not {typ}')
    parts = data.get('parts') or []
    names = [p.get('name') for p in parts]
    if part_names is not None:
        expect(names == list(part_names), f'parts {names}, expected {list(part_names)}')
    for p in parts:
        where = f'part {p.get("name")!r}'
        expect(set(p) == set(_PART_KEYS), f'{where}: keys {sorted(p)}, expected {sorted(_PART_KEYS)}')
        expect(p.get('status') in STATUSES, f'{where}: status {p.get("status")!r} not in {STATUSES}')
        for key, typ in (('seconds', (int, float)), ('budget_s', (int, float)), ('summary', str), ('measures', str),
                         ('skipped', list), ('notes', list), ('tables', dict), ('findings', dict)):
            expect(isinstance(p.get(key), typ), f'{where}: {key!r} is not {typ}')
        for table, rows in (p.get('tables') or {}).items():
            expect(isinstance(rows, list) and all(isinstance(r, dict) for r in rows),
                   f'{where}: table {table!r} is not a list of rows')
            for r in rows if isinstance(rows, list) else []:
                bad = [k for k, v in r.items() if isinstance(v, (dict, list))]
                expect(not bad, f'{where}: table {table!r} has nested values in {bad}')
    counts = data.get('counts') or {}
    expect(set(counts) == set(STATUSES) and sum(counts.values()) == len(parts), f'counts {counts} do not add up')
    if problems:
        raise ValueError('invalid GPU check report:\n  ' + '\n  '.join(problems))


def _fmt(v: Any) -> str:
    if v is None:
        return ''
    if isinstance(v, bool):
        return 'yes' if v else '**NO**'
    if isinstance(v, float):
        if v == 0:
            return '0'
        return f'{v:.3g}' if abs(v) < 1e5 else f'{v:.3e}'
    return str(v).replace('|', '\\|').replace('\n', ' ')


def _table(rows: List[Dict[str, Any]]) -> List[str]:
    cols: List[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    lines += ['| ' + ' | '.join(_fmt(r.get(c)) for c in cols) + ' |' for r in rows]
    return lines


def render_markdown(data: Dict[str, Any], environment_lines: Sequence[str] = ()) -> str:
    mode = 'dry run on the CPU (tiny sizes; what needs CUDA is skipped)' if data['dry_run'] else \
        f'on {data["device"]}'
    out = ['# dynconv_mm GPU check', '',
           f'- mode: {mode}', f'- started: {data["started"]}',
           f'- total: {data["seconds"]:.0f} s' + (f' (limit {data["time_limit_s"]:.0f} s)' if data.get('time_limit_s')
                                                  else ''),
           f'- result: {"all parts passed" if data["ok"] else "SOME PARTS DID NOT PASS"} ('
           + ', '.join(f'{n} {s}' for s, n in data['counts'].items() if n) + ')']
    out += list(environment_lines)
    out += ['', '| part | status | time (s) | budget (s) | summary |', '|---|---|---|---|---|']
    for p in data['parts']:
        out.append(f'| [{p["name"]}](#{p["name"]}) | {p["status"]} | {p["seconds"]:.1f} | {p["budget_s"]:.0f} | '
                   f'{_fmt(p["summary"])} |')
    for p in data['parts']:
        out += ['', f'## {p["name"]}', '', f'**{p["title"]}**: {p["status"]} in {p["seconds"]:.1f} s '
                f'(budget {p["budget_s"]:.0f} s; log `{p["log"]}`)', '', f'Measures: {p["measures"]}.', '']
        if p['summary']:
            out += [p['summary'], '']
        if p['error']:
            out += ['```', p['error'].strip()[-2500:], '```', '']
        if p['skipped']:
            out += ['Not run:', ''] + [f'- {s}' for s in p['skipped']] + ['']
        if p['notes']:
            out += [f'- {n}' for n in p['notes']] + ['']
        if p['findings']:
            out += ['Findings:', ''] + [f'- `{k}`: {json.dumps(v, default=str)}' for k, v in p['findings'].items()]
            out.append('')
        for table, rows in p['tables'].items():
            if rows:
                out += [f'*{table}*', ''] + _table(rows) + ['']
    return '\n'.join(out).rstrip() + '\n'


def write_reports(data: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """``report.json`` and ``report.md`` in ``out_dir``; returns their paths."""
    validate_report(data)
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=osp.join(out_dir, 'report.json'), md=osp.join(out_dir, 'report.md'))
    with open(paths['json'], 'w') as f:
        json.dump(data, f, indent=1, default=str)
    env_lines = []
    for p in data['parts']:
        if p['name'] == 'environment':
            env = p['findings'].get('headline')
            if env:
                env_lines.append(f'- machine: {env}')
    with open(paths['md'], 'w') as f:
        f.write(render_markdown(data, env_lines))
    return paths
