"""benchmark.py runs end to end on a tiny configuration and reports every case against the unit."""
import pytest

import benchmark
import fast
from utils import UserError


@pytest.mark.parametrize('amp', [False, True])
def test_benchmark_reports_every_case_as_a_ratio(tmp_path, capsys, amp):
    args = benchmark.get_args_parser().parse_args(
        ['--arch', 'resnet18', '--batch-size', '2', '--input-size', '32', '--repeats', '1',
         '--prune-universal', '4', '--json', str(tmp_path / 'speed.json')] + ['--amp'] * amp)
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
    assert 'one-pass / two-pass' in capsys.readouterr().out
    assert (tmp_path / 'speed.json').exists()


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
