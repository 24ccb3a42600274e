"""benchmark.py runs end to end on a tiny configuration and reports every case against the unit."""
import errno
import json
import os
import pathlib
import re
import shlex

import pytest

import benchmark
import fast
from utils import UserError


@pytest.mark.parametrize('amp', [False, True])
def test_benchmark_reports_every_case_as_a_ratio(tmp_path, capsys, amp):
    args = benchmark.get_args_parser().parse_args(
        ['--arch', 'resnet18', '--batch-size', '2', '--input-size', '32', '--repeats', '1',
         '--prune-universal', '4', '--json', str(tmp_path / 'new' / 'speed.json')] + ['--amp'] * amp)
    results = benchmark.main(args)
    ratios = results['ratio_to_teacher_forward']
    assert results['config']['amp'] == amp
    assert set(ratios) == {'teacher forward', 'frozen teacher forward', 'teacher train step', 'student train step',
                           'shared-statistics train step',
                           'two-pass train step', 'split-free train step', 'proxy-free train step',
                           'student eval forward',
                           'pruned eval forward'}
    assert ratios['teacher forward'] == 1.0 and all(r > 0 for r in ratios.values())
    assert 0 < results['pruned_flops_ratio'] < 1
    out = capsys.readouterr().out
    assert set(results['paired_ratios']) == {'one-pass / two-pass train step', 'one-pass / split-free train step',
                                             'student train step / frozen teacher forward'}
    assert all(f'  {name}: {ratio:.2f}' in out for name, ratio in results['paired_ratios'].items())  # as printed
    assert results['pruned_universal_blocks'] == {'kept': 4, 'total': 8} and '(4/8 universal blocks)' in out
    assert json.loads((tmp_path / 'new' / 'speed.json').read_text()) == results  # its folder created


def test_paths_prices_each_fast_path_by_running_its_plain_layers(tmp_path, capsys, monkeypatch):
    fast_paths = {name: getattr(fast, name) for name in dir(fast)}
    calls = {path: 0 for path in benchmark.PLAIN_PATHS}

    def counted(path, plain):
        def call(*args, **kwargs):
            calls[path] += 1
            return plain(*args, **kwargs)
        return call
    for path, (name, plain) in list(benchmark.PLAIN_PATHS.items()):
        monkeypatch.setitem(benchmark.PLAIN_PATHS, path, (name, counted(path, plain)))
    args = benchmark.get_args_parser().parse_args(
        ['--paths', '--arch', 'resnet18', '--batch-size', '2', '--input-size', '32', '--repeats', '1',
         '--json', str(tmp_path / 'paths.json')])
    results = benchmark.main(args)
    assert all(count > 0 for count in calls.values()), calls  # each path's plain layers ran
    ratios = results['ratio_without_path']
    assert set(ratios) == set(benchmark.PLAIN_PATHS)
    assert all(set(r) == {'student train step', 'student eval forward'} and min(r.values()) > 0
               for r in ratios.values())
    assert 'proxy-matrices' in capsys.readouterr().out and (tmp_path / 'paths.json').exists()
    assert {name: getattr(fast, name) for name in dir(fast)} == fast_paths  # put back afterwards


@pytest.mark.parametrize('flag', ['--repeats', '--batch-size'])
def test_benchmark_refuses_empty_measurements(flag):
    with pytest.raises(UserError, match=f'{flag} must be positive, got 0'):
        benchmark.main(benchmark.get_args_parser().parse_args([flag, '0']))


def test_benchmark_refuses_two_measurements_at_once():
    with pytest.raises(UserError, match='--latency and --paths are separate measurements: pass one of them per run'):
        benchmark.main(benchmark.get_args_parser().parse_args(['--latency', '--paths']))


def test_latency_compares_the_teacher_and_the_exported_tailored_network(tmp_path, capsys):
    args = benchmark.get_args_parser().parse_args(
        ['--latency', '--arch', 'resnet18', '--input-size', '32', '--repeats', '1', '--prune-universal', '4',
         '--json', str(tmp_path / 'latency.json')])
    results = benchmark.main(args)
    rows = results['latency']
    assert [(row['runtime'], row['batch']) for row in rows] == [('PyTorch', 1), ('PyTorch', 64),
                                                                 ('onnxruntime', 1), ('onnxruntime', 64)]
    assert 0 < results['flops_ratio'] < 1
    for row in rows:
        assert row['teacher_seconds'] > 0 and row['tailored_seconds'] > 0
        assert row['ratio_over_flops_ratio'] == pytest.approx(row['ratio'] / results['flops_ratio'])
    assert 'ratio/FLOPs' in capsys.readouterr().out and (tmp_path / 'latency.json').exists()


@pytest.fixture
def no_measurement(monkeypatch):
    """Any measurement fails the test: a refusal must come before it."""
    def measured(*args):
        raise AssertionError('measured before refusing')
    for name in ('measure', 'measure_paths', 'measure_latency', 'time_demo'):
        monkeypatch.setattr(benchmark, name, measured)


@pytest.mark.parametrize('mode', [[], ['--paths']])
def test_benchmark_refuses_a_batch_of_one_for_a_training_step(mode, no_measurement):
    with pytest.raises(UserError, match='^--batch-size must be at least 2: BatchNorm cannot train on a batch of one$'):
        benchmark.main(benchmark.get_args_parser().parse_args(mode + ['--batch-size', '1']))


@pytest.mark.parametrize('argv, message', [
    (['--latency', '--amp'], '--amp does not apply to --latency: it is for the default run, --paths'),
    (['--latency', '--channels-last'], '--channels-last does not apply to --latency'),
    (['--latency', '--batch-size', '2'], '--batch-size does not apply to --latency: it is for the default run, '
                                         '--paths'),
    (['--paths', '--prune-universal', '4'], '--prune-universal does not apply to --paths: it is for the default '
                                            'run, --latency'),
    *[(['--demo', *flag], f'{flag[0]} does not apply to --demo') for flag in (
        ['--arch', 'resnet18'], ['--device', 'cpu'], ['--batch-size', '2'], ['--input-size', '32'],
        ['--repeats', '1'], ['--amp'], ['--max-skip', '2'], ['--prune-universal', '4'], ['--channels-last'])],
])
def test_benchmark_refuses_a_flag_its_mode_would_ignore(argv, message, no_measurement):
    with pytest.raises(UserError, match=f'^{re.escape(message)}'):
        benchmark.main(benchmark.get_args_parser().parse_args(argv))


@pytest.mark.parametrize('argv, message', [
    (['--prune-universal', '-1'], '--prune-universal must be in [0, 16] (resnet34 has 16 universal blocks), got -1'),
    (['--arch', 'resnet18', '--prune-universal', '9'], '--prune-universal must be in [0, 8] (resnet18 has 8 '),
    (['--latency', '--arch', 'resnet101'], "unknown architecture 'resnet101'; choose one of resnet18, "),
])
def test_benchmark_refuses_pruning_and_networks_that_cannot_be(argv, message, no_measurement):
    """A negative count was refused once the networks were built, naming no flag."""
    with pytest.raises(UserError, match=f'^{re.escape(message)}'):
        benchmark.main(benchmark.get_args_parser().parse_args(argv))


def documented_runs():
    """The flags of every `benchmark.py ...` example in the docstring, the docs and the GPU check script."""
    root = pathlib.Path(benchmark.__file__).parent
    texts = [benchmark.__doc__] + [(root / name).read_text() for name in ('README.md', 'docs/performance.md',
                                                                           '.ci/gpu_check')]
    return [shlex.split(re.split(r'[`#\\]', line)[0]) for text in texts
            for line in re.findall(r'benchmark\.py(.*)', text)]


def test_every_documented_run_is_accepted_with_the_documented_defaults():
    runs = documented_runs()
    assert [] in runs and ['--latency', '--repeats', '10'] in runs and len(runs) >= 10
    for argv in runs:
        args = benchmark.get_args_parser().parse_args(argv)
        benchmark.complete_args(args)
    args = benchmark.get_args_parser().parse_args([])
    benchmark.complete_args(args)  # python benchmark.py: ResNet34, max_skip 3, batch 32, 64x64, CPU
    assert (args.arch, args.max_skip, args.batch_size, args.input_size, args.device, args.repeats,
            args.prune_universal, args.amp, args.channels_last) == ('resnet34', '3', 32, 64, 'cpu', 10, 8, False, False)
    args = benchmark.get_args_parser().parse_args(['--arch', 'resnet18'])
    benchmark.complete_args(args)
    assert args.prune_universal == 4  # half the blocks, as for ResNet34 (8 removed every one of ResNet18's)


@pytest.mark.parametrize('where, message', [
    (lambda tmp: tmp, 'names a folder: name the file to write'),
    (lambda tmp: f'{tmp}{os.sep}new{os.sep}', 'names a folder: name the file to write'),
    (lambda tmp: tmp / 'file' / 'sub' / 'speed.json', 'lies under {tmp}/file, which is a file'),
], ids=['folder', 'trailing-separator', 'under-a-file'])
def test_benchmark_checks_the_json_path_before_measuring(tmp_path, where, message, no_measurement):
    (tmp_path / 'file').write_text('')
    path = str(where(tmp_path))
    with pytest.raises(UserError, match=f'^--json {re.escape(path)} {re.escape(message.format(tmp=tmp_path))}'):
        benchmark.main(benchmark.get_args_parser().parse_args(['--json', path]))
    assert sorted(os.listdir(tmp_path)) == ['file']


def test_json_results_are_never_half_written(tmp_path):
    path = tmp_path / 'speed.json'
    path.write_text('earlier results')
    args = benchmark.get_args_parser().parse_args(['--json', str(path)])
    with pytest.raises(TypeError):
        benchmark.save_json(args, {'teacher forward': 1.0, 'unserialisable': object()})
    assert path.read_text() == 'earlier results' and os.listdir(tmp_path) == ['speed.json']


def test_json_results_that_cannot_be_written_are_one_line(tmp_path, monkeypatch):
    """A full disk after the whole measurement (printed already) ended in a traceback."""
    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(benchmark, 'atomic_write_json', full_disk)
    args = benchmark.get_args_parser().parse_args(['--json', str(tmp_path / 'speed.json')])
    with pytest.raises(UserError, match=f"^cannot write --json {re.escape(str(tmp_path))}/speed.json: No space left "
                                        "on device$"):
        benchmark.save_json(args, {'teacher forward': 1.0})
