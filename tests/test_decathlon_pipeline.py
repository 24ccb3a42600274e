"""End to end on a tiny miniature decathlon: universal blocks pre-trained on imagenet12, teachers and students
for svhn and dtd (svhn also pruned and retrained), submissions, the summary, and deploy_decathlon.ipynb run
headless against those runs."""
import io
import json
import os
import re
import shutil

import nbformat
import pytest
import torch
from jupyter_client.kernelspec import find_kernel_specs
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import deploy
import utils
from torch.utils.data import DataLoader

from decathlon_dataloaders import (CATEGORY_BASE, MEAN_STD, DecathlonDataset, annotation_path, decathlon_transform,
                                   task_mean_std)
from engine import checkpoint_path, evaluate, load_student

from scripts import run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'deploy_decathlon.ipynb')
TASKS = ('svhn', 'dtd')
TRAIN = ('--epochs', '1', '--workers', '0', '--input-size', '32')


def run_commands(*commands):
    """Run (script, *args) commands of the repository in order; returns each one's stdout."""
    # one thread: on two cores busy with other work, two threads made these tiny steps 4-6 times slower
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    outputs = []
    for script, *args in commands:
        result = run_script(script, *args, env=env, timeout=600)
        assert result.returncode == 0, f"{script} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    return outputs


@pytest.fixture(scope='module')
def decathlon(tmp_path_factory):
    """The tiny decathlon, trained once: paths and the summary's stdout."""
    root = tmp_path_factory.mktemp('decathlon')
    source_data, data, models = root / 'source_data', root / 'data', root / 'models'
    universal = models / 'universal.pth.tar'
    outputs = run_commands(
        ('data/make_synthetic_decathlon.py', '--data-dir', source_data, '--images-per-class', '1',
         '--tasks', 'imagenet12'),
        ('data/make_synthetic_decathlon.py', '--data-dir', data, '--images-per-class', '3', '--tasks', *TASKS),
        ('main_teacher_decathlon.py', '--task', 'imagenet12', '--data-dir', source_data,
         '--model-root', root / 'source_runs', '--pretrained', 'none', *TRAIN, '--export-backbone', universal),
        ('main_teacher_decathlon.py', '--task', 'all', '--data-dir', data, '--model-root', models,
         '--pretrained', universal, *TRAIN),
        ('main_student_decathlon.py', '--task', 'all', '--data-dir', data, '--model-root', models,
         '--pretrained', universal, *TRAIN, '--write-submission'),
        ('main_student_decathlon.py', '--task', 'svhn', '--data-dir', data, '--model-root', models, '--prune',
         '--n-pruning-universal', '2', '--thr-pruning-proxy', '0.01', '--lr', '0.01', *TRAIN[:4],
         '--write-submission'),  # the full student's crop size, not the task's default
        ('main_student_decathlon.py', '--task', 'all', '--data-dir', data, '--model-root', models, '--summary'))
    return {'data': data, 'models': models, 'universal': universal, 'summary': outputs[-1]}


def files_under(folder):
    """Every file path under folder, sorted."""
    return sorted(os.path.join(path, name) for path, _, names in os.walk(folder) for name in names)


def execute_notebook(runtime, **env):
    """deploy_decathlon.ipynb executed headless with the NETTAILOR_* variables `env`: the notebook and the text
    its code cells printed."""
    assert 'python3' in find_kernel_specs(), "no 'python3' Jupyter kernel: install ipykernel in this environment"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    runtime.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in ('NETTAILOR_RELEASED', 'NETTAILOR_MODEL_ROOT'):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(f'NETTAILOR_{name.upper()}', str(value))
        patch.setenv('OMP_NUM_THREADS', '1')
        patch.setenv('JUPYTER_RUNTIME_DIR', str(runtime / 'runtime'))
        patch.setenv('IPYTHONDIR', str(runtime / 'ipython'))
        patch.setenv('TMPDIR', str(runtime))  # where the notebook writes the task packs
        NotebookClient(notebook, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
    assert not [name for name in os.listdir(runtime) if name.startswith('nettailor-packs-')]  # cleaned up
    text = '\n'.join(output.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                     for output in cell.outputs)
    return {'notebook': notebook, 'text': text}


@pytest.fixture(scope='module')
def executed_notebook(decathlon, tmp_path_factory):
    """The notebook on the tiny runs."""
    models_before = files_under(decathlon['models'])
    executed = execute_notebook(tmp_path_factory.mktemp('jupyter'), data_dir=decathlon['data'],
                                model_root=decathlon['models'], universal=decathlon['universal'])
    assert files_under(decathlon['models']) == models_before, 'the notebook must only read the runs'
    return executed


def test_runs_are_finished_and_svhn_is_pruned(decathlon):
    for task in TASKS:
        for stage in ('teacher', 'student'):
            assert utils.load_checkpoint(checkpoint_path(decathlon['models'] / task / stage))['finished']
    pruned, checkpoint = load_student(decathlon['models'] / 'svhn' / 'pruned', 'cpu')
    assert checkpoint['finished']
    assert pruned.stats()['universal_blocks_kept'] == 10
    assert checkpoint['args']['input_size'] == 32 and checkpoint['args']['backbone'] == 'wide_resnet26'
    assert not (decathlon['models'] / 'dtd' / 'pruned').exists()
    import main_student_decathlon
    args = main_student_decathlon.get_args_parser().parse_args(['--task', 'svhn', '--prune'])
    assert args.backbone is None and args.input_size is None  # so that the full student's are taken
    result = run_script('main_student.py', '--model-dir', decathlon['models'] / 'svhn' / 'pruned', '--evaluate',
                        '--device', 'cpu')
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {decathlon['models'] / 'svhn' / 'pruned'} is a decathlon run, unlike this one: evaluate it with "
        "main_teacher_decathlon.py or main_student_decathlon.py --task svhn --evaluate"]



def test_export_writes_each_tasks_final_run_at_its_own_crop(decathlon, tmp_path):
    """--task all --export: every task's final run (svhn pruned, dtd the full student: its pruned run unfinished),
    rebuilt at the 32 px it was trained at, not the tasks' default crops; the outputs are the students'."""
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    finished = torch.load(models / 'dtd' / 'student' / 'checkpoint.pth', weights_only=True)
    unfinished = {**finished, 'finished': False}
    os.makedirs(models / 'dtd' / 'pruned')
    torch.save(unfinished, models / 'dtd' / 'pruned' / 'checkpoint.pth')
    out, = run_commands(('main_student_decathlon.py', '--task', 'all', '--data-dir', tmp_path / 'no-data',
                         '--model-root', models, '--export', tmp_path / 'deploy'))  # the runs' tasks: no data needed
    assert f"dtd: the pruned run in {models / 'dtd'} is unfinished" in out
    assert sorted(os.listdir(tmp_path / 'deploy')) == sorted(TASKS)
    images = torch.randn(3, 3, 32, 32)
    for task, stage in (('svhn', 'pruned'), ('dtd', 'student')):
        student, _ = load_student(models / task / stage, 'cpu')
        extra = {'preprocessing.json': ''}
        program = torch.export.load(str(tmp_path / 'deploy' / task / 'tailored.pt2'), extra_files=extra).module()
        steps = json.loads(extra['preprocessing.json'])  # at the run's crop, with the miniature's own mean and std
        assert steps == deploy.preprocessing_steps(decathlon_transform(task, False, 32, decathlon['data']))
        assert steps[-1]['normalize']['mean'] == list(task_mean_std(task, decathlon['data'])[0]) != list(
            MEAN_STD[task][0])
        with torch.no_grad():
            expected = student.eval()(images)[0]
            assert (program(images) - expected).abs().max() <= 1e-5 * expected.abs().max()
    result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                        '--model-root', models, '--export', tmp_path / 'deploy')  # again: refused before any
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: --export {tmp_path / 'deploy' / 'dtd'} already holds tailored.pt2: pass --force to replace it, "
        "or export elsewhere")
    result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                        '--model-root', models, '--export', '')
    assert result.returncode == 1 and result.stderr.strip() == 'error: --export needs the folder to write to'
    shutil.rmtree(models / 'dtd' / 'pruned')
    torch.save(unfinished, models / 'dtd' / 'student' / 'checkpoint.pth')  # only an interrupted student left
    for command in ('--export', '--summary'):
        result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                            '--model-root', models, command, *([tmp_path / 'deploy2'] if command == '--export' else []))
        assert result.returncode == 1 and result.stderr.strip() == (
            f"error: the dtd student in {models / 'dtd'} is unfinished: finish it with --task dtd --resume and the "
            "flags it was started with (its args.json)")
    assert not (tmp_path / 'deploy2').exists()
    torch.save(finished, models / 'dtd' / 'student' / 'checkpoint.pth')
    pruned = torch.load(models / 'svhn' / 'pruned' / 'checkpoint.pth', weights_only=False)
    pruned['args']['pretrained'] = str(tmp_path / 'gone.pth')  # svhn's weights missing: dtd, before it, not exported
    torch.save(pruned, models / 'svhn' / 'pruned' / 'checkpoint.pth')
    result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                        '--model-root', models, '--export', tmp_path / 'deploy3')
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: svhn: the universal weights {tmp_path / 'gone.pth'} that {models / 'svhn' / 'pruned'} was trained on "
        "are missing")
    assert not (tmp_path / 'deploy3' / 'dtd').exists()


def test_evaluate_takes_each_runs_own_crop_and_network(decathlon):
    """The runs trained at 32 px are evaluated at 32 px (not the task's default crop) and reproduce their recorded
    accuracy; an --input-size or --arch unlike the run's is refused."""
    common = ['--task', 'svhn', '--data-dir', decathlon['data'], '--model-root', decathlon['models'], '--workers', '0',
              '--device', 'cpu', '--evaluate']
    teacher_out, student_out, pruned_out = run_commands(('main_teacher_decathlon.py', *common),
                                                        ('main_student_decathlon.py', *common),
                                                        ('main_student_decathlon.py', *common, '--prune'))
    for stage, out in (('teacher', teacher_out), ('student', student_out), ('pruned', pruned_out)):
        recorded = utils.load_checkpoint(checkpoint_path(decathlon['models'] / 'svhn' / stage))['accuracy']
        assert float(out.split('top-1 accuracy ')[1].split('%')[0]) == pytest.approx(recorded, abs=0.005), stage
    import main_student_decathlon
    import main_teacher_decathlon
    for module, flags, setting in ((main_teacher_decathlon, ['--input-size', '64'], '--input-size 32, not 64'),
                                   (main_teacher_decathlon, ['--arch', 'resnet18'],
                                    '--arch wide_resnet26, not resnet18'),
                                   (main_student_decathlon, ['--input-size', '64'], '--input-size 32, not 64')):
        stage = 'teacher' if module is main_teacher_decathlon else 'student'
        with pytest.raises(utils.UserError, match=re.escape(
                f"{decathlon['models'] / 'svhn' / stage} was trained with {setting}: drop those flags (--evaluate "
                "rebuilds the run as recorded)")):
            module.main(module.get_args_parser().parse_args([*map(str, common), *flags]))


def test_runs_keep_the_mean_and_std_they_were_trained_with(decathlon, tmp_path, monkeypatch):
    """The miniature's own statistics (its decathlon_mean_std.json) are recorded with each run: an export of a run
    whose data moved carries them, not the published ones, and data normalised otherwise is refused."""
    import main_student_decathlon
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    run = models / 'svhn' / 'pruned'
    checkpoint = torch.load(checkpoint_path(run), weights_only=False)
    mean, std = task_mean_std('svhn', decathlon['data'])
    assert checkpoint['args']['mean_std'] == [list(mean), list(std)] and list(mean) != list(MEAN_STD['svhn'][0])
    checkpoint['args']['data_dir'] = str(tmp_path / 'moved')  # the data it was trained on, gone
    torch.save(checkpoint, checkpoint_path(run))
    run_commands(('main_student_decathlon.py', '--task', 'svhn', '--model-root', models, '--export', tmp_path / 'out'))
    extra = {'preprocessing.json': ''}
    torch.export.load(str(tmp_path / 'out' / 'svhn' / 'tailored.pt2'), extra_files=extra)
    assert json.loads(extra['preprocessing.json'])[-1]['normalize'] == {'mean': list(mean), 'std': list(std)}
    published = tmp_path / 'published'  # the same images, normalised with the published statistics
    shutil.copytree(decathlon['data'], published)
    os.remove(published / 'decathlon-1.0' / 'decathlon_mean_std.json')
    args = main_student_decathlon.get_args_parser().parse_args(
        ['--task', 'svhn', '--data-dir', str(published), '--model-root', str(models), '--workers', '0', '--evaluate'])
    with pytest.raises(utils.UserError, match=re.escape(
            f"the svhn mean and std of {published} are not those the network was trained with (mean {list(mean)}, "
            f"std {list(std)}): pass the --data-dir it was trained on")):
        main_student_decathlon.main(args)
    batches = []  # a submission's images, normalised as the run was trained, whatever the data folder's file says
    monkeypatch.setattr(main_student_decathlon, 'predict', lambda model, loader, device: batches.append(
        next(iter(loader))[0]) or torch.zeros(len(loader.dataset), dtype=torch.long))
    main_student_decathlon.write_run_submission(args, run)
    expected = DecathlonDataset('svhn', 'test_stripped', decathlon['data'],
                                decathlon_transform('svhn', False, 32, decathlon['data']))
    assert torch.equal(batches[0][0], expected[0][0])
    val_only = tmp_path / 'val-only'  # evaluating reads no training image: they need not be there
    shutil.copytree(decathlon['data'], val_only)
    shutil.rmtree(val_only / 'decathlon-1.0' / 'data' / 'svhn' / 'train')
    import main_teacher_decathlon
    for module in (main_teacher_decathlon, main_student_decathlon):
        result = module.main(module.get_args_parser().parse_args(
            ['--task', 'svhn', '--data-dir', str(val_only), '--model-root', str(models), '--workers', '0',
             '--evaluate']))
        assert 0 <= result['svhn']['accuracy'] <= 100

def test_summary_lists_both_tasks_the_score_and_a_valid_submission(decathlon):
    lines = decathlon['summary'].splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split() and line.split()[0] in TASKS}
    assert set(rows) == set(TASKS)
    assert rows['svhn'][-1] == 'pruned' and rows['dtd'][-1] == 'student'
    assert rows['svhn'][5] == '10/12' and rows['dtd'][5] == '12/12'
    assert re.search(r'mean accuracy [\d.]+, decathlon score \d+ over 2 task\(s\)', decathlon['summary'])
    results_path = decathlon['models'] / 'results.json'
    assert f"submission for the evaluation server: {results_path}" in decathlon['summary']

    with open(results_path) as f:
        results = json.load(f)
    task_of_image, categories = {}, {}
    for task in TASKS:
        with open(annotation_path(decathlon['data'], task, 'test_stripped')) as f:
            annotations = json.load(f)
        task_of_image.update({image['id']: task for image in annotations['images']})
        categories[task] = {category['id'] for category in annotations['categories']}
        assert min(categories[task]) == CATEGORY_BASE[task]
    assert sorted(entry['image_id'] for entry in results) == sorted(task_of_image)
    for entry in results:
        assert set(entry) == {'image_id', 'category_id'}
        assert entry['category_id'] in categories[task_of_image[entry['image_id']]]



def test_submission_for_test_annotations_of_another_class_count_is_refused(decathlon, tmp_path):
    import main_student_decathlon
    data = tmp_path / 'data'
    shutil.copytree(decathlon['data'], data)
    path = annotation_path(data, 'svhn', 'test_stripped')
    with open(path) as f:
        annotations = json.load(f)
    annotations['categories'] = annotations['categories'][:2]
    with open(path, 'w') as f:
        json.dump(annotations, f)
    run_dir = decathlon['models'] / 'svhn' / 'student'
    before = (run_dir / 'submission.json').read_bytes()
    args = main_student_decathlon.get_args_parser().parse_args(['--task', 'svhn', '--data-dir', str(data),
                                                                '--workers', '0', '--device', 'cpu'])
    with pytest.raises(utils.UserError, match=f'^{path} lists 2 svhn categories, the model in {run_dir} predicts 10'):
        main_student_decathlon.write_run_submission(args, run_dir)
    assert (run_dir / 'submission.json').read_bytes() == before

def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == 'python3'
    code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
    assert code_cells and all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)


def test_notebook_deploys_every_task_on_the_shared_universal_blocks(decathlon, executed_notebook):
    text = executed_notebook['text']
    assert f"Models:            {decathlon['models']} -- chosen by NETTAILOR_MODEL_ROOT" in text
    universal_params = int(re.search(r'Universal blocks .*: ([\d,]+) parameters', text).group(1).replace(',', ''))
    assert universal_params == 5_814_176  # Wide ResNet-26 stem and 12 blocks, no final BN or classifier
    loaded = re.search(r'Loaded universal blocks: layers\.0\.conv1\.weight at data_ptr (0x[0-9a-f]+)', text).group(1)
    for task, stage in (('svhn', 'pruned'), ('dtd', 'student')):
        shared = re.search(rf'{task} +\({stage}\): layers\.0\.conv1\.weight at data_ptr (0x[0-9a-f]+); '
                           r'all \d+ universal weights shared with the loaded blocks: True; '
                           r'BatchNorm statistics its own: True', text)
        assert shared and shared.group(1) == loaded, task
        assert re.search(rf'== {task} \({stage}\): {10 if task == "svhn" else 12}/12 universal blocks', text)


def test_notebook_reports_storage_switch_time_and_accuracy(decathlon, executed_notebook):
    text = executed_notebook['text']
    for task in TASKS:
        run_dir = decathlon['models'] / task / ('pruned' if task == 'svhn' else 'student')
        student, checkpoint = load_student(run_dir, 'cpu')
        pack_bytes = io.BytesIO()
        torch.save(checkpoint['model'], pack_bytes)

        storage = re.search(rf'{task} +task pack ([\d.]+) MB on disk \(([\d,]+) parameters\) vs ([\d.]+) MB', text)
        pack_mb, params, finetuned_mb = float(storage.group(1)), int(storage.group(2).replace(',', '')), \
            float(storage.group(3))
        assert pack_mb == pytest.approx(pack_bytes.getbuffer().nbytes / 1e6, rel=0.02)
        assert params == student.stats()['params_task']
        assert pack_mb < finetuned_mb / 4

        switch = re.search(rf'{task} +task switch \(load pack from disk \+ first forward\): median ([\d.]+) ms '
                           r'over 5 switches', text)
        assert switch and 0 < float(switch.group(1)) < 10_000

        accuracy = re.search(rf'{task} +val top-1 accuracy ([\d.]+)% on (\d+) images', text)
        assert float(accuracy.group(1)) == pytest.approx(checkpoint['accuracy'], abs=0.01)
        with open(annotation_path(decathlon['data'], task, 'val')) as f:
            assert int(accuracy.group(2)) == len(json.load(f)['images'])
    assert re.search(r'loading a fine-tuned Wide ResNet-26 from disk \+ first forward: median [\d.]+ ms', text)

    total = re.search(r'NetTailor, 2 tasks: universal ([\d.]+) MB \+ packs ([\d.]+) MB = ([\d.]+) MB', text)
    finetuned_total = re.search(r'2 fine-tuned Wide ResNet-26: ([\d.]+) MB', text)
    assert float(total.group(1)) == pytest.approx(5_814_176 * 4 / 1e6, rel=0.02)
    assert float(total.group(3)) < float(finetuned_total.group(1))
    cells = executed_notebook['notebook'].cells
    drawn = [cell.source for cell in cells if cell.cell_type == 'code'
             if any('image/png' in output.get('data', {}) for output in cell.outputs)]
    assert len(drawn) == 2 and 'plot_architecture(stats, ax=ax, name=task)' in drawn[0]  # architectures, samples


def test_notebook_refuses_universal_weights_and_models_of_another_task(decathlon, tmp_path):
    """A run is evaluated on the universal weights it was trained on (its fingerprint, whatever the file's name), a
    released checkpoint only on a task of its class count: else the accuracies shown are of another network."""
    from test_wide import FIXTURE
    other = torch.load(decathlon['universal'], weights_only=True)
    tensors = other.get('state_dict', other)
    tensors['layers.3.conv1.weight'][0, 0, 0, 0] += 1e-3
    torch.save(other, tmp_path / 'other.pth.tar')
    with pytest.raises(CellExecutionError, match=re.escape(
            f"the universal weights {tmp_path / 'other.pth.tar'} are not those {decathlon['models'] / 'dtd'}")):
        execute_notebook(tmp_path / 'jupyter', data_dir=decathlon['data'], model_root=decathlon['models'],
                         universal=tmp_path / 'other.pth.tar')
    released = tmp_path / 'decathlon_models'
    (released / 'dtd').mkdir(parents=True)  # the fixture is a 10-class model
    shutil.copy(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), released / 'dtd' / 'checkpoint.pth.tar')
    with pytest.raises(CellExecutionError, match=re.escape(
            f"{released / 'dtd' / 'checkpoint.pth.tar'} predicts 10 classes, the dtd annotations in")):
        execute_notebook(tmp_path / 'jupyter', released=released, universal=tmp_path / 'other.pth.tar',
                         data_dir=decathlon['data'])


def test_notebook_refuses_a_val_limit_that_is_not_a_count(decathlon, tmp_path):
    """NETTAILOR_VAL_LIMIT=-3 failed deep in torch.linspace (and 'ten' with a bare int() traceback)."""
    with pytest.raises(CellExecutionError, match=re.escape(
            "NETTAILOR_VAL_LIMIT must be a number of images (0: all of them), got '-3'")):
        execute_notebook(tmp_path / 'jupyter', data_dir=decathlon['data'], model_root=decathlon['models'],
                         universal=decathlon['universal'], val_limit='-3')


def test_notebook_names_its_own_setting_for_the_data_folder(decathlon, tmp_path):
    """The decathlon's errors said `pass --data-dir`: the notebook takes no flags."""
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CellExecutionError) as error:
        execute_notebook(tmp_path / 'jupyter', data_dir=tmp_path / 'empty', model_root=decathlon['models'],
                         universal=decathlon['universal'])
    assert re.search(r"task \w+ not found: .* is missing; run `python data/download_decathlon.py` for the real data "
                     r"or .* for the offline miniature, or point NETTAILOR_DATA_DIR at the folder that holds "
                     r"decathlon-1.0", str(error.value))
    assert '--data-dir' not in str(error.value)


def test_notebook_takes_the_runs_the_summary_takes(decathlon, tmp_path):
    """Through required_final_run, as --summary: it deployed a pruned run whose full student was trained again
    since, and left out a task whose student was unfinished, where --summary refuses both (the latter here)."""
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    student = torch.load(checkpoint_path(models / 'dtd' / 'student'), weights_only=False)
    student['finished'] = False
    torch.save(student, checkpoint_path(models / 'dtd' / 'student'))
    with pytest.raises(CellExecutionError, match=re.escape(f"the dtd student in {models / 'dtd'} is unfinished")):
        execute_notebook(tmp_path / 'jupyter', data_dir=decathlon['data'], model_root=models,
                         universal=decathlon['universal'])


def test_notebook_deploys_the_released_models(decathlon, tmp_path):
    """The released path: the authors' universal weights loaded once and their task checkpoints converted and
    attached (here the fixture made by the released code, as an svhn model, on the miniature's svhn images)."""
    from test_wide import FIXTURE, released_fixture_student, released_fixture_universal
    from wide_nettailor import load_released_pack
    released = tmp_path / 'decathlon_models'
    (released / 'svhn').mkdir(parents=True)
    shutil.copy(os.path.join(FIXTURE, 'task', 'checkpoint.pth.tar'), released / 'svhn' / 'checkpoint.pth.tar')
    released_fixture_universal(tmp_path / 'wide_resnet26.pth.tar')
    text = execute_notebook(tmp_path / 'jupyter', released=released, universal=tmp_path / 'wide_resnet26.pth.tar',
                            data_dir=decathlon['data'])['text']
    assert f"Models:            {released} -- the released models, chosen by NETTAILOR_RELEASED" in text
    assert re.search(r'svhn +\(released\): .*universal weights shared with the loaded blocks: True; '
                     r'BatchNorm statistics its own: True', text)
    assert '== svhn (released): 10/12 universal blocks, 30/33 proxies' in text
    student = released_fixture_student(tmp_path, load_released_pack(str(released / 'svhn' / 'checkpoint.pth.tar')))
    dataset = DecathlonDataset('svhn', 'val', decathlon['data'],
                               decathlon_transform('svhn', False, data_dir=decathlon['data']))
    expected = evaluate(student, DataLoader(dataset, batch_size=7), 'cpu')
    accuracy = re.search(r'svhn +val top-1 accuracy ([\d.]+)% on (\d+) images \(recorded: acc 0.0 in the released '
                         r'checkpoint\)', text)
    assert float(accuracy.group(1)) == pytest.approx(expected, abs=0.01) and int(accuracy.group(2)) == len(dataset)
    assert re.search(r'svhn +task pack [\d.]+ MB on disk', text) and 'NetTailor, 1 tasks' in text


def test_summary_stars_an_accuracy_measured_on_a_test_limit_subset(decathlon, tmp_path):
    """A quick run's accuracy (--test-limit) was shown as the whole val set's, and the score with it."""
    assert '*' not in decathlon['summary']
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    student = torch.load(checkpoint_path(models / 'dtd' / 'student'), weights_only=False)
    student['args']['test_limit'] = 2
    torch.save(student, checkpoint_path(models / 'dtd' / 'student'))
    out = run_commands(('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                        '--model-root', models, '--summary'))[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows['dtd'][2] == f"{student['accuracy']:.2f}*" and not rows['svhn'][2].endswith('*')
    assert not rows['dtd'][1].endswith('*')  # its teacher measured on the whole val set
    assert ("* measured on at most 2 val images (the run's --test-limit): a quick run's accuracy, not comparable to "
            "the paper's, nor is the score") in out


def test_summary_writes_the_submissions_it_lacks(decathlon, tmp_path):
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    (models / 'dtd' / 'student' / 'submission.json').unlink()
    summary = ('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'], '--model-root', models,
               '--summary')
    out = run_commands(summary)[0]
    assert (f"{models / 'results.json'} not written: dtd lacks its submission.json (--write-submission); the one "
            "there is an earlier summary's") in out
    (models / 'results.json').unlink()
    out = run_commands(summary)[0]
    assert 'submission for the evaluation server' not in out and not (models / 'results.json').exists()
    assert out.splitlines()[-1] == (f"{models / 'results.json'} not written: dtd lacks its submission.json "
                                    "(--write-submission)")
    out = run_commands(('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                        '--model-root', models, '--summary', '--write-submission'))[0]
    assert f"submission for the evaluation server: {models / 'results.json'}" in out
    assert (models / 'dtd' / 'student' / 'submission.json').exists()
    entries = json.loads((models / 'results.json').read_text())
    assert {entry['category_id'] // 10000000 for entry in entries} == {4, 8}  # dtd and svhn
    svhn = models / 'svhn' / 'pruned' / 'submission.json'  # damaged: a traceback, or merged as it was
    for damaged, reason in (('[{"image_id": 1, "cat', 'Unterminated string starting at'),
                            ('{"a": 1}', 'not a list of {"image_id", "category_id"} entries')):
        svhn.write_text(damaged)
        result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'],
                            '--model-root', models, '--summary')
        assert result.returncode == 1 and result.stderr.startswith(f"error: {svhn} is not a submission written by "
                                                                   f"--write-submission ({reason}")
        assert result.stderr.strip().endswith("delete it, and pass --write-submission to write it again")
    assert json.loads((models / 'results.json').read_text()) == entries


def test_task_all_resume_continues_the_interrupted_task_and_starts_the_others(decathlon, tmp_path):
    """An interrupted --task all: rerun with --resume, it resumed the interrupted task, then stopped at the first
    task not begun ('no checkpoint to resume from')."""
    models = tmp_path / 'models'
    shutil.copytree(decathlon['models'], models)
    checkpoint = torch.load(models / 'svhn' / 'student' / 'checkpoint.pth', weights_only=False)
    checkpoint['finished'] = False
    checkpoint['args']['teacher_fn'] = str(models / 'svhn' / 'teacher' / 'checkpoint.pth')  # as if trained here
    torch.save(checkpoint, models / 'svhn' / 'student' / 'checkpoint.pth')
    shutil.rmtree(models / 'dtd' / 'student')  # not begun
    run_commands(('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'], '--model-root', models,
                  '--pretrained', decathlon['universal'], *TRAIN[2:], '--epochs', '2', '--resume'))
    svhn, dtd = (torch.load(models / task / 'student' / 'checkpoint.pth', weights_only=False)
                 for task in ('svhn', 'dtd'))
    assert svhn['finished'] and dtd['finished'] and svhn['epoch'] == dtd['epoch'] == 1
    assert [json.loads(line)['epoch'] for line in open(models / 'svhn' / 'student' / 'metrics.jsonl')] == [0, 1]


def test_submit_checks_a_pruning_job_against_the_run_it_writes(decathlon, tmp_path):
    """submit.py decathlon --stage pruned (the README's example) checked its jobs as if they wrote <task>/student,
    which a finished student holds, and so refused every one."""
    import submit
    args = submit.get_args_parser().parse_args([
        '--local', '--log-dir', str(tmp_path / 'jobs'), 'decathlon', '--stage', 'pruned', '--tasks', 'dtd',
        '--data-dir', str(decathlon['data']), '--model-root', str(decathlon['models'])])
    [job] = submit.decathlon_jobs(args, ['--n-pruning-universal', '1', '--thr-pruning-proxy', '0'])
    assert job.run_dir == os.path.join(decathlon['models'], 'dtd', 'pruned')
    submit.check_job(job, 1, 0)
    assert not (decathlon['models'] / 'dtd' / 'pruned').exists() and not (tmp_path / 'jobs').exists()


def test_submit_compares_a_finished_decathlon_run_with_every_setting_its_job_trains_with(decathlon, tmp_path,
                                                                                         monkeypatch):
    """A finished run is checked against what its job would train, defaults included, as its script completes
    them: it was compared on the flags given only, and its script's stage (set from --prune) was not resolved;
    without the released weights, which the job would train from, those were said to be missing instead."""
    import main_student_decathlon
    import main_teacher_decathlon
    import submit
    trained = ['--epochs', '1', '--workers', '0']  # how the fixture trained them, with each stage's flags below
    flags = {'teacher': ['--input-size', '32'], 'student': ['--input-size', '32', '--write-submission'],
             'pruned': ['--n-pruning-universal', '2', '--thr-pruning-proxy', '0.01', '--lr', '0.01']}
    universal = ['--pretrained', decathlon['universal']]

    def job(stage, stage_flags):
        args = submit.get_args_parser().parse_args([
            '--local', '--log-dir', str(tmp_path / 'jobs'), 'decathlon', '--stage', stage, '--tasks', 'svhn',
            '--data-dir', str(decathlon['data']), '--model-root', str(decathlon['models'])])
        [job] = submit.decathlon_jobs(args, list(map(str, stage_flags)))
        return job
    for stage, stage_flags in flags.items():
        stage_flags = stage_flags + (universal if stage != 'pruned' else [])
        submit.check_job(job(stage, stage_flags + trained), 1, 0)  # trained as the job would train it
        epochs = job(stage, stage_flags + trained[2:])  # the scripts' --epochs 30
        with pytest.raises(utils.UserError, match=re.escape(
                f"{epochs.run_dir} holds a finished run trained with --epochs 1, not 30: move it away")):
            submit.check_job(epochs, 1, 0)
    released = str(tmp_path / 'wide_resnet26.pth.tar')  # not downloaded
    monkeypatch.setattr(main_teacher_decathlon, 'DEFAULT_WEIGHTS', released)
    monkeypatch.setattr(main_student_decathlon, 'DEFAULT_WEIGHTS', released)
    for stage in ('teacher', 'student'):
        weights = job(stage, flags[stage] + trained)
        with pytest.raises(utils.UserError, match=re.escape(
                f"{weights.run_dir} holds a finished run trained with --pretrained {decathlon['universal']}, not "
                f"{released}: move it away")):
            submit.check_job(weights, 1, 0)
    assert not (tmp_path / 'jobs').exists()


def test_submit_summarises_the_tasks_it_submitted(decathlon, tmp_path):
    """The summary after the jobs covers the tasks submitted: it took every task under --data-dir, and a task not
    submitted, without a run, failed the submission once its jobs had succeeded."""
    import submit
    args = submit.get_args_parser().parse_args([
        '--local', '--log-dir', str(tmp_path / 'jobs'), 'decathlon', '--stage', 'student', '--tasks', 'dtd',
        '--data-dir', str(decathlon['data']), '--model-root', str(decathlon['models'])])
    table = submit.summary(args, submit.decathlon_jobs(args, []))
    assert [line.split()[0] for line in table.splitlines()[1:3]] == ['dtd', 'mean']
    assert 'over 1 task(s)' in table


def test_submit_checks_a_decathlon_teachers_flags(decathlon, tmp_path):
    """What main_teacher_decathlon.py refuses is refused before submitting: the jobs used to fail once they ran
    (or, for --export-backbone, each overwrote the file the one before wrote)."""
    from test_submit import refused
    teachers = ['decathlon', '--stage', 'teacher', '--data-dir', decathlon['data'], '--model-root',
                tmp_path / 'models', '--tasks']
    refused(tmp_path, [*teachers, 'svhn', 'dtd'], ['--pretrained', 'none', '--export-backbone', tmp_path / 'u.pth'],
            r"^flags after --: --export-backbone writes one task's network, and every job would write it: submit "
            r"that task alone \(--tasks TASK\)$")
    refused(tmp_path, [*teachers, 'svhn'], ['--pretrained', 'none', '--export-backbone', decathlon['universal']],
            r"^--export-backbone .*universal.pth.tar exists: pass --force to replace it, or name another file$")
    refused(tmp_path, [*teachers, 'svhn'], ['--pretrained', 'none', '--input-size', 1],
            r"^wide_resnet26 cannot take 1x1 inputs: choose another --input-size")


def test_decathlon_runs_and_others_do_not_mix(decathlon, tmp_path):
    """The decathlon's svhn is other data than SVHN's (splits, crops, normalisation): a student distilled from the
    other's teacher, or pruned from the other's student, trained silently."""
    import main_student
    import main_student_decathlon
    teacher = torch.load(checkpoint_path(decathlon['models'] / 'svhn' / 'teacher'), weights_only=False)
    del teacher['args']['decathlon']  # as main_teacher.py --task svhn records it
    torch.save(teacher, tmp_path / 'teacher.pth')
    args = main_student_decathlon.get_args_parser().parse_args([
        '--task', 'svhn', '--data-dir', str(decathlon['data']), '--model-root', str(tmp_path / 'models'),
        '--pretrained', str(decathlon['universal']), '--teacher-fn', str(tmp_path / 'teacher.pth'), *TRAIN])
    with pytest.raises(utils.UserError, match=r"^teacher .*teacher.pth is not a decathlon run, unlike this one: "
                                              r"wrong --teacher-fn\?$"):
        main_student_decathlon.main(args)
    args = main_student.get_args_parser().parse_args([
        '--full-model-dir', str(decathlon['models'] / 'svhn' / 'student'), '--n-pruning-universal', '1',
        '--model-dir', str(tmp_path / 'pruned'), '--data-dir', str(decathlon['data'])])
    with pytest.raises(utils.UserError, match=r"^the student in .*svhn/student is a decathlon run, unlike this one: "
                                              r"prune it with main_student_decathlon.py --task svhn --prune$"):
        main_student.main(args)
    assert sorted(os.listdir(tmp_path)) == ['teacher.pth']
    import main_teacher_decathlon  # evaluated where a decathlon run goes, the other's run is refused too
    os.makedirs(tmp_path / 'models' / 'svhn' / 'teacher')
    shutil.copy(tmp_path / 'teacher.pth', checkpoint_path(tmp_path / 'models' / 'svhn' / 'teacher'))
    args = main_teacher_decathlon.get_args_parser().parse_args([
        '--task', 'svhn', '--evaluate', '--data-dir', str(decathlon['data']), '--model-root', str(tmp_path / 'models'),
        '--workers', '0'])
    with pytest.raises(utils.UserError, match=r"^.*svhn/teacher is not a decathlon run, unlike this one: evaluate it "
                                              r"with main_teacher.py or main_student.py --model-dir RUN --evaluate$"):
        main_teacher_decathlon.main(args)


def test_a_run_directory_another_process_writes_is_refused_naming_no_flag_the_script_lacks(decathlon, tmp_path):
    """The decathlon scripts set the run directory from --model-root: the refusal names the folder, not --model-dir."""
    import fcntl
    import main_teacher_decathlon
    run_dir = tmp_path / 'models' / 'svhn' / 'teacher'
    os.makedirs(run_dir)
    args = main_teacher_decathlon.get_args_parser().parse_args([
        '--task', 'svhn', '--data-dir', str(decathlon['data']), '--model-root', str(tmp_path / 'models'),
        '--pretrained', str(decathlon['universal']), *TRAIN])
    with open(run_dir / '.lock', 'a') as held:  # as another process's run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = rf"^another process is writing {re.escape(str(run_dir))}; wait for it to end, or write this run to "
        with pytest.raises(utils.UserError, match=refused + "another folder$"):
            main_teacher_decathlon.main(args)
    assert os.listdir(run_dir) == ['.lock']


def test_run_locations_the_decathlon_scripts_set_by_convention_are_refused(tmp_path):
    import main_student_decathlon
    import main_teacher_decathlon
    common = ['--task', 'svhn', '--data-dir', str(tmp_path / 'data'), '--model-root', str(tmp_path / 'models')]
    for module, flags, message in (
            (main_teacher_decathlon, ['--model-dir', str(tmp_path / 'run')], 'pass --model-root, not --model-dir'),
            (main_student_decathlon, ['--model-dir', str(tmp_path / 'run')], 'pass --model-root, not --model-dir'),
            (main_student_decathlon, ['--prune', '--full-model-dir', str(tmp_path / 'student')],
             'pass --prune, not --full-model-dir'),
            (main_teacher_decathlon, ['--pretrained', 'none', '--export-backbone', str(tmp_path / 'w.pth'),
                                      '--task', 'all'], "--export-backbone writes one task's network")):
        with pytest.raises(utils.UserError, match=message):
            module.main(module.get_args_parser().parse_args(common + flags))
    assert not os.listdir(tmp_path)
    (tmp_path / 'afile').write_text('')
    for module, flags, message in (  # each flag after the first used to be ignored, or failed after training
            (main_student_decathlon, ['--summary', '--export', 'out'], '^--summary and --export are separate commands'),
            (main_student_decathlon, ['--evaluate', '--summary'], '^--summary and --evaluate are separate commands'),
            (main_student_decathlon, ['--summary', '--prune'], "^--prune does not apply to --summary: it takes each"),
            (main_teacher_decathlon, ['--train-splits', 'val'],
             "^--train-splits takes 'train' or 'train,val', got 'val'$"),
            (main_student_decathlon, ['--train-splits', 'train,train'], "^--train-splits takes 'train' or 'train,val'"),
            (main_student_decathlon, ['--export', 'out', '--write-submission'],
             '^--write-submission does not apply to --export'),
            (main_teacher_decathlon, ['--pretrained', 'none', '--export-backbone', str(tmp_path)],
             f'^--export-backbone {tmp_path} names a folder: name the file to write$'),
            (main_teacher_decathlon, ['--pretrained', 'none', '--export-backbone', str(tmp_path / 'afile' / 'w.pth')],
             f"^--export-backbone {tmp_path / 'afile' / 'w.pth'} lies under {tmp_path / 'afile'}, which is a file$"),
            (main_teacher_decathlon, ['--pretrained', 'none', '--export-backbone', str(tmp_path / 'afile')],
             f"^--export-backbone {tmp_path / 'afile'} exists: pass --force to replace it"),
            (main_teacher_decathlon, ['--evaluate', '--force', '--export-backbone',
                                      str(tmp_path / 'models' / 'svhn' / 'teacher' / 'checkpoint.pth')],
             "is the run's own checkpoint: name another file$"),
            (main_teacher_decathlon, ['--task', 'svhm', '--evaluate'], "^unknown decathlon task 'svhm'; valid tasks"),
            (main_student_decathlon, ['--task', 'svhm', '--export', 'out'], "^unknown decathlon task 'svhm'"),
            # the pruning flags' hints name the decathlon script's flags, not main_student.py's
            (main_student_decathlon, ['--pretrained', 'none', '--thr-pruning-proxy', '0.01'],
             r'^--thr-pruning-proxy prunes a trained student: pass it with --prune \(submit.py: --stage pruned\)$'),
            (main_student_decathlon, ['--summary', '--thr-pruning-proxy', '0.01'],
             "^--summary takes each task's final run as it is: drop --thr-pruning-proxy$"),
            (main_student_decathlon, ['--prune', '--evaluate', '--n-pruning-universal', '2'],
             "^--evaluate takes the task's run as it is: drop --n-pruning-universal \\(prune with --prune")):
        with pytest.raises(utils.UserError, match=message):
            module.main(module.get_args_parser().parse_args(common + flags))
    assert os.listdir(tmp_path) == ['afile']


def test_a_task_failing_under_task_all_is_named_and_a_summary_takes_moved_weights(decathlon, tmp_path):
    result = run_script('main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'], '--model-root',
                        decathlon['models'], '--prune', '--n-pruning-universal', 99, '--workers', 0)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (  # svhn skipped: its pruned run is finished
        'error: dtd: cannot prune 99 universal blocks: 12 are left')
    assert not (decathlon['models'] / 'dtd' / 'pruned').exists()
    models = tmp_path / 'models'  # their universal weights moved: --summary takes --pretrained where they are now
    shutil.copytree(decathlon['models'], models)
    os.rename(models / 'universal.pth.tar', tmp_path / 'moved.pth.tar')
    for run_dir in ('svhn/student', 'svhn/pruned', 'dtd/student'):
        checkpoint = torch.load(models / run_dir / 'checkpoint.pth', weights_only=False)
        checkpoint['args']['pretrained'] = str(models / 'universal.pth.tar')  # as if trained there
        if run_dir == 'svhn/pruned':
            checkpoint['args']['full_model_dir'] = str(models / 'svhn' / 'student')
        torch.save(checkpoint, models / run_dir / 'checkpoint.pth')
    summary = ['main_student_decathlon.py', '--task', 'all', '--data-dir', decathlon['data'], '--model-root', models,
               '--summary']
    result = run_script(*summary)
    assert result.returncode == 1 and 'are missing: put them back, or pass --pretrained' in result.stderr
    out, = run_commands((*summary, '--pretrained', tmp_path / 'moved.pth.tar'))
    assert 'decathlon score' in out
    student = torch.load(models / 'svhn' / 'student' / 'checkpoint.pth', weights_only=False)
    student['model']['state']['gate_logits'] += 0.5  # as if the student were trained again (--force)
    torch.save(student, models / 'svhn' / 'student' / 'checkpoint.pth')
    for command in (['--summary'], ['--export', tmp_path / 'deploy']):  # they took the stale pruned run
        result = run_script(*summary[:-1], *command, '--pretrained', tmp_path / 'moved.pth.tar')
        assert result.returncode == 1 and result.stderr.strip() == (
            f"error: the svhn run {models / 'svhn' / 'pruned'} was trained from an earlier "
            f"{models / 'svhn' / 'student' / 'checkpoint.pth'} (trained again since): train it again (--task svhn "
            "--prune --force and its flags)")


def test_submissions_that_cannot_be_written_are_one_line(tmp_path):
    """--summary and --write-submission in a folder that cannot be written ended in a traceback."""
    from decathlon_dataloaders import write_submission
    (tmp_path / 'afile').write_text('')
    path = tmp_path / 'afile' / 'results.json'
    with pytest.raises(utils.UserError, match=f"^cannot write {path}: File exists; make its folder writable$"):
        write_submission([], str(path))


def test_missing_released_weights_name_the_download_command(tmp_path, monkeypatch):
    import main_student_decathlon
    import main_teacher_decathlon
    missing = str(tmp_path / 'wide_resnet26.pth.tar')
    monkeypatch.setattr(main_teacher_decathlon, 'DEFAULT_WEIGHTS', missing)  # wherever the real file may be
    monkeypatch.setattr(main_student_decathlon, 'DEFAULT_WEIGHTS', missing)
    common = ['--task', 'svhn', '--data-dir', str(tmp_path / 'data'), '--model-root', str(tmp_path / 'models')]
    for module, flags in ((main_teacher_decathlon, ['--pretrained', missing]), (main_student_decathlon, [])):
        with pytest.raises(utils.UserError, match=r'the released Wide ResNet-26 weights are missing .*: run '
                                                  r'`python checkpoints/download_models.py`, or pass --pretrained'):
            module.main(module.get_args_parser().parse_args(common + flags))
    assert not os.listdir(tmp_path)
    # --resume of a run trained from other weights, without its flags: those are named, not the released weights
    run = tmp_path / 'models' / 'svhn' / 'teacher'
    os.makedirs(run)
    torch.save({'finished': False, 'epoch': 0, 'num_classes': 10, 'model': {},
                'args': {**vars(main_teacher_decathlon.get_args_parser().parse_args(common)), 'pretrained': None,
                         'model_dir': str(run), 'arch': 'wide_resnet26', 'input_size': 64, 'momentum': 0.9}},
               run / 'checkpoint.pth')  # momentum: SGD's, as a run records it
    with pytest.raises(utils.UserError, match=rf"^--resume: the run in {run} was trained with --pretrained None, not "
                                              rf"{missing}; resume it with its own flags"):
        main_teacher_decathlon.main(main_teacher_decathlon.get_args_parser().parse_args(common + ['--resume']))
    # without --resume, the run kept is named; the weights a new run would train from only once --force replaces it
    for flags, message in (([], rf"^{run} already holds an unfinished run; pass --force to overwrite it or --resume"),
                           (['--force'], r'^the released Wide ResNet-26 weights are missing')):
        with pytest.raises(utils.UserError, match=message):
            main_teacher_decathlon.main(main_teacher_decathlon.get_args_parser().parse_args(common + flags))
