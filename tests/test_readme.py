"""The README's Python example runs as printed."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    with open(os.path.join(REPO, 'README.md')) as f:
        blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)  # it saves task.pth
    exec(compile(blocks[0], 'README.md', 'exec'), {})
    share = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < share < 1  # pruning 2 universal blocks removed FLOPs
    assert (tmp_path / 'task.pth').stat().st_size > 0
