"""Shared helpers: small generated data sets in the IDX layout, and running the program.
The photo helpers are in photo_helpers.py."""

import contextlib
import gzip
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "fashion_mnist_cnn.py"
SHARED = ROOT.parent / "shared" / "fashion-mnist"

sys.path.insert(0, str(ROOT))
# The environment the program runs in, as a user's shell gives it: taken before anything here
# (this file's setting below, TensorFlow's imports in the test modules) adds TensorFlow's own
# variables, so that command-line tests exercise the program's defaults for them.
USER_ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "DISPLAY", "WAYLAND_DISPLAY")
}
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow in the test process

import fashion_mnist_cnn as fm  # noqa: E402  (imports no TensorFlow)

fm.choose_onednn(fm.cpu_info()[1])  # as main() does, before a test module imports TensorFlow


def write_idx(path, array, gzipped=True):
    """Write an IDX file the way the official ones are written."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if gzipped:
        path.write_bytes(gzip.compress(data))
    else:
        path.with_suffix("").write_bytes(data)  # the same name without .gz


def distinct_images(labels, seed=0):
    """Images whose class is plain to see: a bright block at one of ten places, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        top, left = 2 + 14 * (label // 5) + rng.integers(0, 3), 1 + 5 * (label % 5)
        image[top : top + 9, left : left + 4] = 255
    return images


def make_dataset(directory, n_train=200, n_test=50, gzipped=True, seed=0):
    """Write the four files of a small Fashion-MNIST-shaped data set; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(
            directory / f"{split}-images-idx3-ubyte.gz", distinct_images(labels, seed), gzipped
        )
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels, gzipped)
    return directory


@pytest.fixture(autouse=True, scope="session")
def program_temporary_files(tmp_path_factory):
    """The program's temporary files go under pytest's own temporary folder (which pytest
    prunes): TensorFlow's autograph writes some that only a normal exit removes, and several
    tests kill the program."""
    USER_ENV["TMPDIR"] = str(tmp_path_factory.mktemp("program-tmp"))


@pytest.fixture
def data_dir(tmp_path):
    return make_dataset(tmp_path / "data")


def on_cores(cores):
    """A preexec_fn that runs the child on its first `cores` cores (None: all of them)."""
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def program_env(env=None):
    """The user's environment (no display: no window may open in tests), plus env."""
    return dict(USER_ENV, **(env or {}))


def run_program(*args, env=None, timeout=300, cwd=None, cores=None):
    """Run fashion_mnist_cnn.py as a user would; return the CompletedProcess. Whatever the
    outcome, the program printed no traceback (one at exit, "Exception ignored in", included)."""
    result = subprocess.run(
        [sys.executable, str(PROGRAM), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=program_env(env),
        cwd=cwd,
        preexec_fn=on_cores(cores),
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def start_program(*args, env=None, cwd=None, cores=None):
    """Start fashion_mnist_cnn.py in the background, its output unbuffered; return the Popen."""
    return subprocess.Popen(
        [sys.executable, str(PROGRAM), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=program_env(dict(env or {}, PYTHONUNBUFFERED="1")),
        cwd=cwd,
        preexec_fn=on_cores(cores),
    )


def wait_for_line(process, prefix, timeout=120):
    """Read the child's stdout until a line starts with prefix; return the lines read. Fails
    (rather than hangs) if none comes within timeout seconds."""
    lines, found = [], threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith(prefix):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"no line starting {prefix!r} in {timeout} s: {''.join(lines)}")
    return lines


def links_to(shot, folder, count, suffix):
    """A large catalogue without writing it: folder holds count links to one shot, in order."""
    folder.mkdir()
    for n in range(count):
        (folder / f"{n:04d}{suffix}").symlink_to(shot)
    return folder


def wait_until(process, ready, timeout=120):
    """Poll until ready() holds; fails (with the child's stderr) if the child ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.01)


def main_here(*args, cwd=None):
    """Run fashion_mnist_cnn.main in this process, as the command line would, where the process
    itself is not under test; returns a CompletedProcess. TensorFlow fixes its thread pools at
    its first operation, which this process ran long ago, so a run here keeps them."""
    import matplotlib.pyplot as plt

    out, err = io.StringIO(), io.StringIO()
    apply_threads, before = fm.apply_threads, os.getcwd()
    fm.apply_threads = lambda threads: None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = fm.main([str(arg) for arg in args])
            except SystemExit as exit:  # argparse's answer to --help and to a bad argument
                code = exit.code
    finally:
        fm.apply_threads = apply_threads
        os.chdir(before)
        plt.close("all")  # a run leaves its figures open for plt.show()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_main():
    return main_here


def assert_clean_failure(result, *fragments):
    """Non-zero exit, one line on stderr that says what went wrong, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
