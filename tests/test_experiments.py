"""experiments.py: the selection rule, and every sub-command end to end on tiny settings (--smoke), reusing runs."""
import json
import os
import re
import shutil

import pytest
import torch
import torchvision

import experiments
from engine import checkpoint_path, finished_run_differences
from utils import UserError


def row(name, accuracy, params_removed, flops=1.0):
    return dict(name=name, accuracy=accuracy, params_removed=params_removed, flops=flops, flops_removed=0.0)


def test_the_leanest_network_within_the_tolerance_is_selected():
    rows = [row('k=2', 90.0, 0.3), row('k=4', 89.6, 0.5), row('k=6', 89.0, 0.7)]
    assert experiments.select_leanest(rows, teacher_acc=90.0, tolerance=0.5)['name'] == 'k=4'
    assert experiments.select_leanest(rows, teacher_acc=90.0, tolerance=1.0)['name'] == 'k=6'  # within: 89.0
    assert experiments.select_leanest(rows, teacher_acc=89.0, tolerance=0.0)['name'] == 'k=6'  # better than it
    ties = [row('a', 89.7, 0.5, flops=2.0), row('b', 89.9, 0.5, flops=3.0), row('c', 89.9, 0.5, flops=1.0)]
    assert experiments.select_leanest(ties, 90.0, 0.5)['name'] == 'c'  # as lean: the more accurate, then fewer FLOPs


def test_no_network_within_the_tolerance_is_reported_as_such():
    rows = [row('k=2', 85.0, 0.3), row('k=4', 86.0, 0.5)]
    assert experiments.select_leanest(rows, 90.0, 0.5) is None
    text = experiments.describe_selection(None, rows, 90.0, 0.5)
    assert text.startswith('no network within 0.5 points of the teacher (90.00%)') and 'k=4 at 86.00%' in text


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    """Offline source backbones (random, in torchvision's format) where the experiments look for them."""
    root = tmp_path_factory.mktemp('experiments')
    torch.manual_seed(0)
    for arch in ('resnet18', 'resnet50'):
        state = getattr(torchvision.models, arch)().state_dict()
        torch.save({k: v for k, v in state.items() if not k.startswith('fc.')}, root / f'{arch}_synth-source.pth')
    return root


def run(roots, command, *flags):
    args = experiments.get_args_parser().parse_args(
        [command, '--smoke', '--device', 'cpu', '--workers', '0', '--source-root', str(roots),
         '--model-root', str(roots / 'runs'), *map(str, flags)])
    return experiments.main(args)


def test_k_sweep_then_the_teacher_ablation_reusing_its_runs(roots, capsys):
    result = run(roots, 'ksweep', '--task', 'synth-digits', '--k', 1, 2)
    (curve,) = result['curves'].values()
    assert [r['k'] for r in curve['rows']] == [1, 2]
    assert [r['blocks_removed'] for r in curve['rows']] == [1, 2]
    assert 0 < curve['rows'][0]['params_removed'] < curve['rows'][1]['params_removed']
    for name in ('ksweep.json', 'ksweep.png'):
        assert (roots / 'runs' / name).stat().st_size > 0
    assert json.loads((roots / 'runs' / 'ksweep.json').read_text())['curves'].keys() == result['curves'].keys()
    out = capsys.readouterr().out
    assert 'leanest within 0.5 points' in out or 'no network within 0.5 points' in out

    result = run(roots, 'teacher', '--task', 'synth-digits', '--k', 1, 2)
    out = capsys.readouterr().out
    assert out.count('finished run in') >= 4  # the teacher, the student and its two pruned runs: reused
    with_teacher, without = result['curves'].values()
    assert [r['k'] for r in without['rows']] == [1, 2] and os.path.isdir(roots / 'runs' / 'student-no-teacher-k2')
    assert os.path.isdir(roots / 'runs' / 'pruned-k2')
    assert json.loads(open(roots / 'runs' / 'student-no-teacher' / 'args.json').read())['teacher_coeff'] == 0.0
    assert (roots / 'runs' / 'teacher.png').exists()


def test_finished_runs_are_reused_only_if_trained_as_the_experiment_would(roots, tmp_path):
    """Every setting a stage trains with is compared, not only the recipe's flags, and so is what it was trained
    from: its universal weights, its teacher, the student it was pruned from."""
    def ksweep(source_root):
        return experiments.main(experiments.get_args_parser().parse_args(
            ['ksweep', '--smoke', '--device', 'cpu', '--workers', '0', '--source-root', str(source_root),
             '--model-root', str(tmp_path / 'runs'), '--k', '1']))
    ksweep(roots)
    other = tmp_path / 'other'
    other.mkdir()
    torch.save({name: tensor + 1 for name, tensor in torch.load(roots / 'resnet18_synth-source.pth').items()},
               other / 'resnet18_synth-source.pth')
    with pytest.raises(UserError, match=re.escape(
            f"{tmp_path / 'runs' / 'teacher'} holds a finished run trained with --pretrained "
            f"{roots / 'resnet18_synth-source.pth'}, not {other / 'resnet18_synth-source.pth'}: pass --force")):
        ksweep(other)
    uncached = tmp_path / 'uncached'  # refused before the source backbone is pre-trained there (minutes)
    with pytest.raises(UserError, match=re.escape(f"--pretrained {roots / 'resnet18_synth-source.pth'}, not "
                                                  f"{uncached / 'resnet18_synth-source.pth'}: pass --force")):
        ksweep(uncached)
    assert not uncached.exists()
    pruned = checkpoint_path(tmp_path / 'runs' / 'pruned-k1')
    checkpoint = torch.load(pruned, weights_only=False)
    torch.save({**checkpoint, 'args': {**checkpoint['args'], 'optimizer': 'adam'}}, pruned)  # no recipe flag
    with pytest.raises(UserError, match=re.escape('pruned-k1 holds a finished run trained with --optimizer adam, not '
                                                  'sgd: pass --force')):
        ksweep(roots)
    torch.save(checkpoint, pruned)
    for source, stage, name in (('full_model_dir', 'student', 'full student'), ('teacher_fn', 'teacher', 'teacher')):
        shutil.copytree(tmp_path / 'runs' / stage, tmp_path / f'other-{stage}')
        path = checkpoint_path(tmp_path / f'other-{stage}')
        replaced = torch.load(path, weights_only=False)
        state = replaced['model']['state'] if stage == 'student' else replaced['model']
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor += 1  # trained otherwise
        torch.save(replaced, path)
        assert finished_run_differences(tmp_path / 'runs' / 'pruned-k1', {source: str(path)}) == [
            f"another {name} than {path}"]
        assert finished_run_differences(tmp_path / 'runs' / 'pruned-k1', {source: str(tmp_path / 'runs' / stage)}) == []


def test_max_skip_and_backbone_ablations(roots):
    result = run(roots, 'max-skip', '--task', 'synth-digits', '--k', 1, '--max-skip', 1, 'dense')
    assert list(result['curves']) == ['max_skip 1', 'max_skip dense']
    pruned_args = json.loads(open(roots / 'runs' / 'student-skipdense-k1' / 'args.json').read())
    assert pruned_args['max_skip'] == 'dense'  # the retrained network keeps its student's reach
    assert (roots / 'runs' / 'max-skip.png').exists()
    result = run(roots, 'backbone', '--task', 'synth-digits', '--k', 2, '--archs', 'resnet18', 'resnet50')
    assert list(result['curves']) == ['resnet18', 'resnet50']
    assert result['curves']['resnet50']['rows'][0]['blocks_total'] == 16
    assert (roots / 'runs' / 'backbone.png').exists() and (roots / 'runs' / 'resnet50' / 'teacher').is_dir()


def test_difficulty_runs_the_three_tasks_and_draws_their_networks(roots, capsys):
    result = run(roots, 'difficulty', '--k', 1)
    assert list(result['results']) == list(experiments.DIFFICULTY_TASKS)
    table = capsys.readouterr().out
    for task in experiments.DIFFICULTY_TASKS:
        assert task in table
    assert (roots / 'runs' / 'difficulty.png').stat().st_size > 0
    assert (roots / 'runs' / 'difficulty.json').exists()


def test_experiments_refuse_what_cannot_run(roots):
    with pytest.raises(UserError, match='--k is required'):
        run(roots, 'ksweep', '--task', 'synth-digits')
    with pytest.raises(UserError, match="no recipe for task 'mnist'"):
        run(roots, 'ksweep', '--task', 'mnist', '--k', 1)
    with pytest.raises(UserError, match='^every --k must be at least 1, got 0$'):
        run(roots, 'ksweep', '--task', 'synth-digits', '--k', 0, 2)
    with pytest.raises(UserError, match='^--tolerance must be a non-negative number, got nan$'):
        run(roots, 'ksweep', '--task', 'synth-digits', '--k', 2, '--tolerance', 'nan')


@pytest.mark.parametrize('flags, message', [
    (['difficulty', '--task', 'synth-shapes'], '^--task does not apply to difficulty: it is for ksweep, teacher, '
                                               'max-skip, backbone$'),
    (['difficulty', '--arch', 'resnet50'], '^--arch does not apply to difficulty'),
    (['backbone', '--k', 2, '--arch', 'resnet50'], '^--arch does not apply to backbone'),
    (['ksweep', '--k', 2, '--archs', 'resnet50'], '^--archs does not apply to ksweep: it is for backbone$'),
    (['ksweep', '--k', 2, '--max-skip', 1], '^--max-skip does not apply to ksweep: it is for max-skip$'),
    (['ksweep', '--k', 9], r'^--k 9 is more universal blocks than resnet18 has \(8\)$'),
    (['backbone', '--k', 9, '--archs', 'resnet50', 'resnet18'], 'than resnet18 has'),
    (['backbone', '--k', 2, '--archs', 'resnet101'], "^unknown architecture 'resnet101'; choose one of resnet18"),
    (['max-skip', '--k', 2, '--max-skip', 2, 'all'],
     r"^--max-skip must be an integer in \[1, 8\] or 'dense', got 'all'$"),
    (['ksweep', '--k', 2, '--pretrained', 'imagenet'], '^--pretrained is for the real tasks'),
    (['ksweep', '--k', 2, '--input-size', 0], '^--input-size must be positive, got 0$'),
    (['ksweep', '--k', 2, '--task', 'synth-source'], "^no recipe for task 'synth-source': choose svhn"),
    (['ksweep', '--k', 2, 3, 2], r'^--k names one setting twice \(2 and 2\): give each once$'),
    (['backbone', '--k', 2, '--archs', 'resnet18', 'resnet18'], r'^--archs names one setting twice'),
    (['max-skip', '--k', 2, '--max-skip', 3, 8, 'dense'], r'^--max-skip names one setting twice \(8 and dense\)'),
])
def test_experiments_refuse_ignored_flags_and_impossible_settings_before_training(roots, tmp_path, flags, message):
    """Each of these used to be ignored silently or found only after the teacher (and students) had trained."""
    model_root = tmp_path / 'runs'
    args = experiments.get_args_parser().parse_args(
        [*map(str, flags), '--smoke', '--device', 'cpu', '--source-root', str(roots), '--model-root', str(model_root)])
    with pytest.raises(UserError, match=message):
        experiments.main(args)
    assert not model_root.exists()


def test_a_weights_file_is_checked_against_every_architecture_before_training(roots, tmp_path):
    """backbone --pretrained FILE trained resnet18's three stages before finding the file did not fit resnet34."""
    args = experiments.get_args_parser().parse_args([
        'backbone', '--task', 'svhn', '--k', '1', '--archs', 'resnet18', 'resnet34', '--pretrained',
        str(roots / 'resnet18_synth-source.pth'), '--smoke', '--device', 'cpu', '--source-root', str(roots),
        '--model-root', str(tmp_path / 'runs')])
    with pytest.raises(UserError, match=r'^pre-trained weights .*resnet18_synth-source.pth do not fit resnet34: '):
        experiments.main(args)
    assert not (tmp_path / 'runs').exists()


def test_force_reruns_the_experiment_runs_but_never_the_shared_source_backbone(roots):
    """--force retraining the demo's cached source backbone would change every run's universal weights (their
    students would then refuse it)."""
    weights = roots / 'resnet18_synth-source.pth'
    before = weights.read_bytes()
    args = experiments.get_args_parser().parse_args(['ksweep', '--k', '1', '--force', '--source-root', str(roots)])
    assert experiments.source_weights(args, 'resnet18') == str(weights)
    assert weights.read_bytes() == before and not (roots / 'source').exists()


def test_a_finished_sweep_whose_source_backbone_file_is_gone_provides_it_again(roots, tmp_path, monkeypatch):
    """The table's rows rebuild each finished student on its universal weights: a deleted cached source file was
    refused with advice to pass --pretrained, which the synthetic tasks refuse.  The experiment provides it again
    (experiments.source_weights: re-exported from the finished source run, or pre-trained, which reproduces it);
    here a copy of the fixture's file stands in for that."""
    source_root = tmp_path / 'source'
    source_root.mkdir()
    weights = source_root / 'resnet18_synth-source.pth'
    shutil.copy(roots / 'resnet18_synth-source.pth', weights)
    argv = ['ksweep', '--smoke', '--device', 'cpu', '--workers', '0', '--source-root', str(source_root),
            '--model-root', str(tmp_path / 'runs'), '--k', '1']
    first = experiments.main(experiments.get_args_parser().parse_args(argv))
    provided = []
    monkeypatch.setattr(experiments, 'source_weights', lambda args, arch: provided.append(arch) or
                        shutil.copy(roots / f'{arch}_synth-source.pth', weights))
    weights.unlink()
    again = experiments.main(experiments.get_args_parser().parse_args(argv))
    assert provided == ['resnet18'] and weights.exists()
    assert again['curves'] == first['curves']
