"""engine.TrainStep and engine.CapturedForward replayed from CUDA graphs compute what the eager ones compute,
and the scripts, graphed by default on CUDA, end where --no-cuda-graph runs end.

They need a GPU: `pytest --device cuda tests/test_cuda_graphs.py`; without one these tests are skipped (the
eager TrainStep they compare against is what every CPU test runs)."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine import CapturedForward, MixedPrecision, TrainStep
from backbones import create_teacher
from nettailor import create_student, distillation_loss

from test_distributed import distance, task_state
from test_pipeline import TINY, run, workdir  # noqa: F401  (a module-scoped fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU (pytest --device cuda)')


@pytest.fixture(autouse=True)
def exact_float32():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def student_step(seed, task_bn_stats, amp, cuda_graph, teacher):
    torch.manual_seed(seed)
    device = torch.device('cuda')
    student = create_student('resnet18', 10, 3, input_size=32, task_bn_stats=task_bn_stats).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    precision = MixedPrecision(device, amp)

    def loss_fn(x, y):
        logits, outputs = student(x, distill=True)
        with torch.no_grad():
            t_logits, t_outputs = teacher(x)
        ce = F.cross_entropy(logits, y)
        complexity = student.expected_complexity()
        omega = distillation_loss(logits, outputs, t_logits, t_outputs)
        return ce + 0.3 * complexity + 10.0 * omega, {'ce': ce, 'complexity': complexity, 'omega': omega}

    step = TrainStep(student.train(), loss_fn, optimizer, precision, cuda_graph)
    return student, step, scheduler


@pytest.mark.parametrize('task_bn_stats, amp', [(True, False), (False, False), (True, True)])
def test_graphed_student_steps_compute_the_eager_steps(task_bn_stats, amp):
    teacher = create_teacher('resnet18', 10).cuda().eval().requires_grad_(False)
    runs = [student_step(0, task_bn_stats, amp, graphed, teacher) for graphed in (False, True)]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator))
               for n in (8, 8, 8, 5, 8)]  # a partial batch runs eagerly between replays
    tolerance = 2e-2 if amp else 1e-4
    for x, y in batches:
        metrics = []
        for student, step, scheduler in runs:
            metrics.append({k: float(v) for k, v in step(x.cuda(), y.cuda()).items()})
            scheduler.step()  # the schedule reaches the graphed step without re-capture
        assert metrics[0].keys() == metrics[1].keys()
        for name in metrics[0]:
            assert metrics[1][name] == pytest.approx(metrics[0][name], rel=tolerance, abs=1e-6), name
    assert runs[1][1].graph is not None
    (eager, _, _), (graphed, _, _) = runs
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=tolerance, atol=tolerance * 1e-2), name
        else:
            assert torch.equal(a, b), name  # num_batches_tracked: the warm-up passes left no trace


def test_graphed_teacher_step_computes_the_eager_step():
    models = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = create_teacher('resnet18', 10).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        loss_fn = lambda x, y, model=model: (F.cross_entropy(model(x)[0], y), {})  # noqa: E731
        models.append((model, TrainStep(model, loss_fn, optimizer, MixedPrecision(torch.device('cuda'), False),
                                        graphed)))
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, device='cuda'), torch.randint(0, 10, (8,), device='cuda')
        losses = [float(step(x, y)['loss']) for _, step in models]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(models[0][0].parameters(), models[1][0].parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_captured_forward_computes_the_eager_forward():
    torch.manual_seed(0)
    student = create_student('resnet18', 10, 3, input_size=32).cuda()
    student.prune(2, 0.0)
    student.eval()
    forward = CapturedForward(student)
    for n in (8, 8, 3):
        x = torch.randn(n, 3, 32, 32, device='cuda')
        with torch.no_grad():
            expected = student(x)[0]
        assert torch.allclose(forward(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_scripts_on_cuda_end_where_their_eager_runs_end(workdir, tmp_path):  # noqa: F811
    """main_teacher.py and main_student.py on CUDA replay their steps from CUDA graphs by default and end where
    --no-cuda-graph runs end (80 images in batches of 32: each epoch's last batch runs eagerly); --amp too.
    With loading processes, as users run them: their pin-memory thread allocates while the steps are captured."""
    common = [*TINY[:TINY.index('--workers')], '--workers', 2, '--train-limit', 80, '--test-limit', 64,
              '--batch-size', 32, '--device', 'cuda', '--pretrained', workdir / 'backbone.pth', '--epochs', 2,
              '--lr', 0.01]
    teacher = tmp_path / 'teacher'
    run('main_teacher.py', *common, '--arch', 'resnet18', '--model-dir', teacher, '--no-cuda-graph')
    run('main_teacher.py', *common, '--arch', 'resnet18', '--model-dir', tmp_path / 'teacher graphed')
    student = [*common, '--backbone', 'resnet18', '--teacher-fn', teacher / 'checkpoint.pth', '--teacher-coeff', 2]
    run('main_student.py', *student, '--model-dir', tmp_path / 'student', '--no-cuda-graph')
    run('main_student.py', *student, '--model-dir', tmp_path / 'student graphed')
    for eager, graphed in (('teacher', 'teacher graphed'), ('student', 'student graphed')):
        for name, expected in ((eager, False), (graphed, True)):  # the default on CUDA is graphed
            assert json.load(open(tmp_path / name / 'args.json'))['cuda_graph'] is expected, name
        a, b = task_state(tmp_path / eager), task_state(tmp_path / graphed)
        norm = distance(a, {name: torch.zeros_like(t) for name, t in a.items()})
        assert distance(a, b) <= 1e-3 * norm, eager
        for first, second in zip(metrics(tmp_path / eager), metrics(tmp_path / graphed)):
            assert second['loss'] == pytest.approx(first['loss'], rel=1e-3), eager
    run('main_student.py', *student, '--model-dir', tmp_path / 'student amp', '--amp')
    graphed, amp = metrics(tmp_path / 'student graphed'), metrics(tmp_path / 'student amp')
    assert [r['epoch'] for r in amp] == [0, 1]
    assert amp[-1]['loss'] == pytest.approx(graphed[-1]['loss'], rel=5e-2)  # float16 autocast


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
