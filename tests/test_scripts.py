"""The script runner the suite's end-to-end tests use reports what a fresh `python <script>` process would."""
import os
import subprocess
import sys

import pytest

from scripts import run_script

PROBE = """
import os, sys, threading, time, atexit
import torch
print('argv', sys.argv[1:], 'path0', sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print('cwd', os.getcwd(), 'env', os.environ.get('PROBE'), 'threads', torch.get_num_threads())
print('main', __name__, 'stdin', repr(sys.stdin.read()))
atexit.register(lambda: print('atexit ran'))
threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined', flush=True))).start()
print('to stderr', file=sys.stderr)
ending = sys.argv[1]
if ending == 'message':
    sys.exit('error: a message')
if ending == 'status':
    sys.exit(3)
if ending == 'exception':
    raise ValueError('from the probe')
"""


@pytest.mark.parametrize('ending', ['normal', 'message', 'status', 'exception'])
def test_a_run_reports_what_a_fresh_interpreter_does(tmp_path, ending):
    script = tmp_path / 'probe.py'
    script.write_text(PROBE)
    env = {**os.environ, 'PROBE': 'set', 'OMP_NUM_THREADS': '1'}
    fresh = subprocess.run([sys.executable, str(script), ending], cwd=tmp_path, env=env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
    forked = run_script(script, ending, cwd=tmp_path, env=env)
    assert forked.returncode == fresh.returncode == {'normal': 0, 'message': 1, 'status': 3, 'exception': 1}[ending]
    assert forked.stdout == fresh.stdout and 'atexit ran' in fresh.stdout and 'thread joined' in fresh.stdout
    assert 'threads 1' in fresh.stdout and 'env set' in fresh.stdout and 'path0 True' in fresh.stdout
    last = forked.stderr.strip().splitlines()[-1]
    assert last == fresh.stderr.strip().splitlines()[-1] and forked.stderr.startswith('to stderr\n')


def test_a_run_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path):
    script = tmp_path / 'sleeps.py'
    script.write_text('import os, sys, time\nprint(os.getpid(), flush=True)\ntime.sleep(float(sys.argv[1]))\n')
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        run_script(script, 60, timeout=1)
    assert not os.path.exists(f'/proc/{int(timeout.value.output)}')
    assert run_script(script, 0).returncode == 0
