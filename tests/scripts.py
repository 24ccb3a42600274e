"""Run the repository's scripts as a user does, `python <script> <args>`: a process of its own, with its exit
status, stdout and stderr. Each process is forked from a server that has imported torch and the other heavy
libraries once, so that a script starts in milliseconds rather than seconds (the suite runs ~150 of them).
Run as a script, this module is that server: one JSON request per line on stdin, one JSON reply per line."""
import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOADED = ('torch', 'torchvision', 'torchvision.models', 'torchvision.transforms', 'numpy', 'PIL.Image',
             'matplotlib', 'scipy.io')

_server = None


def run_script(script, *args, cwd=REPO, env=None, timeout=300):
    """Run `script` (a path relative to the repository) with `args` in a fresh process; returns a
    subprocess.CompletedProcess with text stdout and stderr, or raises subprocess.TimeoutExpired."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=REPO, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env={'OMP_NUM_THREADS': '2', **os.environ})
        atexit.register(_server.stdin.close)
    argv = [os.path.join(REPO, script), *map(str, args)]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
        request = dict(argv=argv, cwd=str(cwd), env=os.environ.copy() if env is None else env,
                       stdout=out, stderr=err, timeout=timeout)
        _server.stdin.write(json.dumps(request) + '\n')
        _server.stdin.flush()
        reply = _server.stdout.readline()
        if not reply:
            raise RuntimeError(f"the script server stopped (exit status {_server.wait()})")
        returncode = json.loads(reply)['returncode']
        stdout, stderr = (_read(path) for path in (out, err))
    if returncode is None:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def _read(path):
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def _become(request):
    """In the forked child: take the request's arguments, directory, environment and output files."""
    sys.argv = request['argv']
    sys.path[0] = os.path.dirname(request['argv'][0])
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    if 'OMP_NUM_THREADS' in request['env']:  # read when torch loaded, in the server: apply it here
        import torch
        torch.set_num_threads(int(request['env']['OMP_NUM_THREADS']))
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY | os.O_CREAT),
                           (2, request['stderr'], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, mode, 0o644)
        os.dup2(opened, fd)
        os.close(opened)


def _wait(pid, timeout):
    """The child's exit status as subprocess reports it (negative: killed by that signal); None after `timeout`
    seconds, the child killed."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def serve():
    """Answer requests until stdin closes. Returns, in a forked child only, the script that child is to run."""
    for module in PRELOADED:
        __import__(module)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(request)
            return request['argv'][0]
        print(json.dumps({'returncode': _wait(pid, request['timeout'])}), flush=True)
    return None


def _run(script):
    """In the forked child: run `script` as __main__, then end as the interpreter does (exit status from SystemExit,
    a traceback and status 1 for any other exception, threads joined, atexit handlers run, output flushed), minus
    tearing down the preloaded modules, which would take a second."""
    try:
        runpy.run_path(script, run_name='__main__')
        status = 0
    except SystemExit as exit:
        status = exit.code
        if not (status is None or isinstance(status, int)):
            print(status, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


if __name__ == '__main__':
    script = serve()
    if script:
        _run(script)
