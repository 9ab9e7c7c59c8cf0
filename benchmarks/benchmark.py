"""Time the project's default run against the plain Keras recipe, side by side, and its options.

    python benchmarks/benchmark.py [--rounds 5]                 # full data from the Keras cache
    python benchmarks/benchmark.py --data-dir DIR [--rounds 5]  # or the four IDX files in DIR
    python benchmarks/benchmark.py -- "--augment" "--arch improved"

Each round runs every side (the plain recipe, the default run, the program with each option set
given after --) in fresh processes, rotating which goes first, with seed = round number, so
every side sees the same seeds. Per run it records the fit time per epoch, the end-to-end wall
time and CPU time of the whole process, its peak RSS and its test accuracy; then it prints the
ratios of the fastest (and leanest) runs of plain and default, and every side's accuracy, mean
± sd over the seeds, with its mean wall time against the default run's and the share of it spent
writing the per-epoch backups that let a stopped run continue. The machine shares its
CPU with neighbours, so compare only numbers from one invocation.

Without --data-dir both the plain recipe and the program read the official files from the
Keras cache (~/.keras/datasets/fashion-mnist/), as a user's run does.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAM = HERE.parent / "fashion_mnist_cnn.py"
sys.path.insert(0, str(HERE.parent))
import fashion_mnist_cnn as fm  # noqa: E402  (no TensorFlow: only its CPU and IDX helpers)

# Multiply-adds of the classic model's forward pass for one image: output positions x filters
# x kernel size x input channels (conv), inputs x units (dense).
FORWARD_MACS = {
    "conv1": 26 * 26 * 32 * 3 * 3 * 1,
    "conv2": 11 * 11 * 64 * 3 * 3 * 32,
    "conv3": 3 * 3 * 64 * 3 * 3 * 64,
    "dense1": 576 * 64,
    "dense2": 64 * 10,
}
# A training step does each three times (forward, input gradient, kernel gradient), less the
# gradient of the input image, which nothing needs: 8.2 M multiply-adds an image.
TRAIN_MACS = 3 * sum(FORWARD_MACS.values()) - FORWARD_MACS["conv1"]

# The recipe as it is usually written (TensorFlow's and Keras' tutorials): float64 pixels from
# `x / 255.0`, the same layers, default compile and fit with validation_split.
PLAIN_RECIPE = """
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import keras
from keras import layers

seed, epochs = int(sys.argv[1]), int(sys.argv[2])
keras.utils.set_random_seed(seed)
(x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
x_train = (x_train / 255.0).reshape(-1, 28, 28, 1)
x_test = (x_test / 255.0).reshape(-1, 28, 28, 1)
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    layers.Conv2D(32, (3, 3), activation="relu"),
    layers.MaxPooling2D((2, 2)),
    layers.Conv2D(64, (3, 3), activation="relu"),
    layers.MaxPooling2D((2, 2)),
    layers.Conv2D(64, (3, 3), activation="relu"),
    layers.Flatten(),
    layers.Dense(64, activation="relu"),
    layers.Dense(10, activation="softmax"),
])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
start = time.perf_counter()
model.fit(x_train, y_train, epochs=epochs, batch_size=32, validation_split=0.2, verbose=2)
fit_seconds = time.perf_counter() - start
test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
print("RESULT", json.dumps({"test_accuracy": test_accuracy, "fit_seconds": fit_seconds}))
"""


def training_images(data_dir):
    """How many training images the runs see: the official 60,000 from the Keras cache."""
    if data_dir is None:
        return 60_000
    paths = fm.find_data_files(Path(data_dir))
    return len(fm.read_idx(paths["train-labels-idx1-ubyte.gz"], fm.IDX_LABELS))


def fit_flop_per_epoch(n_train, validation_split=fm.VALIDATION_SPLIT):
    """Floating-point operations of one epoch of the classic model's fit: training plus the
    validation pass."""
    n_fit = int(n_train * (1 - validation_split))
    return 2 * (n_fit * TRAIN_MACS + (n_train - n_fit) * sum(FORWARD_MACS.values()))


def describe_cpu():
    """The CPU class and its fp32 peak in GFLOP/s, with the formula it is taken from.

    Peak = cores x clock x FLOP a cycle. FLOP a cycle, float32: two FMA units of 256 bits
    (8 lanes x 2 FLOP each) on AVX2 CPUs and on AMD's AVX-512 ones (Zen 4 splits 512-bit
    instructions in two), two of 512 bits on Intel's AVX-512 ones. The clock is the one
    /proc/cpuinfo reports (a VM's is often the nominal one), so the share is an estimate.
    """
    name, flags = fm.cpu_info()
    cores = fm.cpu_cores()
    try:
        info = Path("/proc/cpuinfo").read_text()
        mhz = float(info.split("cpu MHz")[1].split(":")[1].split()[0])
        vendor = info.split("vendor_id")[1].split(":")[1].split()[0]
    except (OSError, IndexError, ValueError):
        mhz, vendor = 0.0, "unknown"
    wide = "avx512f" in flags and vendor == "GenuineIntel"
    per_cycle = 64 if wide else 32 if "fma" in flags else 16
    peak = cores * mhz / 1000 * per_cycle
    features = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    text = (
        f"CPU: {name} ({vendor}), class {fm.cpu_class(flags)}, flags {' '.join(features)}, "
        f"{cores} cores; fp32 peak {peak:.0f} GFLOP/s = {cores} cores x {mhz / 1000:.2f} GHz "
        f"x {per_cycle} FLOP/cycle (2 FMA units x {per_cycle // 4} lanes x 2)"
    )
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        text += f"; ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
    return text, peak


def run_measured(command, env):
    """Run a command; return its stdout, wall seconds, CPU seconds and peak RSS in MiB."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark: {command[1]} failed:\n{output[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return output, wall, cpu, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_plain(data_dir, seed, epochs, scratch):
    env = dict(os.environ)
    if data_dir is not None:
        # keras.datasets reads $KERAS_HOME/datasets/fashion-mnist/: point it at data_dir's files.
        cache = scratch / "keras_home" / "datasets" / "fashion-mnist"
        cache.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(data_dir):
            if not (cache / name).exists():
                (cache / name).symlink_to(Path(data_dir).resolve() / name)
        env["KERAS_HOME"] = str(scratch / "keras_home")
    if env.get("ONEDNN_MAX_CPU_ISA") == "AVX2":  # --emulate-avx2: TensorFlow's AVX2 default
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    epochs = epochs or fm.EPOCHS
    command = [sys.executable, "-c", PLAIN_RECIPE, str(seed), str(epochs)]
    output, wall, cpu, rss = run_measured(command, env)
    result = json.loads(output.split("RESULT ", 1)[1])
    return {
        "fit_per_epoch": result["fit_seconds"] / epochs,
        "test_accuracy": result["test_accuracy"],
        "wall": wall,
        "cpu": cpu,
        "peak_rss_mib": rss,
        "epochs": epochs,
    }


def run_program(data_dir, seed, epochs, scratch, options):
    """The program as a user runs it, with `options`; epochs None: the program's own default."""
    out_dir = scratch / f"run-{seed}-{time.time_ns()}"
    command = [sys.executable, str(PROGRAM), "--seed", str(seed), "--out-dir", str(out_dir)]
    command += ["--data-dir", str(data_dir)] * (data_dir is not None)
    command += ["--epochs", str(epochs)] * (epochs is not None)
    _, wall, cpu, rss = run_measured([*command, "--no-show", *options], dict(os.environ))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {
        "fit_per_epoch": metrics["train_seconds"] / metrics["epochs_completed"],
        "backup_seconds": metrics["backup_seconds"],  # saving what a stopped run continues from
        "test_accuracy": metrics["test_accuracy"],
        "wall": wall,
        "cpu": cpu,
        "peak_rss_mib": rss,
        "epochs": metrics["epochs_completed"],
        "precision": metrics["config"]["precision"],
        "onednn": metrics["compute"]["onednn"],
    }


def accuracy_text(side_runs):
    accuracies = [r["test_accuracy"] for r in side_runs]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return f"{statistics.mean(accuracies):.4f} ± {spread:.4f}"


def summarise_speed(plain, default, flop_per_epoch, peak):
    """The plain recipe against the default run: best of each side, and the ratios."""
    rows = [
        ("fit s/epoch", "fit_per_epoch"),
        ("wall s", "wall"),
        ("CPU s", "cpu"),
        ("peak RSS MiB", "peak_rss_mib"),
    ]
    print(f"\n{'best of each side':<18}{'plain':>10}{'default':>10}{'plain/default':>15}")
    ratios = {}
    for label, key in rows:
        p, d = min(r[key] for r in plain), min(r[key] for r in default)
        ratios[key] = p / d
        print(f"{label:<18}{p:>10.1f}{d:>10.1f}{p / d:>14.2f}x")
    print(f"{'peak RSS default/plain':<33}{1 / ratios['peak_rss_mib']:>10.2f}x")
    print(f"fit: {flop_per_epoch / 1e12:.3f} TFLOP an epoch (training + validation pass)")
    for side, side_runs in (("plain", plain), ("default", default)):
        gflops = flop_per_epoch / min(r["fit_per_epoch"] for r in side_runs) / 1e9
        print(f"  {side:<8} {gflops:6.1f} GFLOP/s = {gflops / peak:.0%} of the fp32 peak")
    return ratios


def summarise_accuracy(runs):
    """Every side's test accuracy over the seeds and its wall time against the default run's."""
    base = statistics.mean(r["wall"] for r in runs["(default)"])
    print(f"\n{'run':<30}{'epochs':>7}{'accuracy mean ± sd':>22}{'wall mean s':>13}"
          f"{'vs default':>12}{'peak RSS MiB':>14}{'backups':>9}")  # fmt: skip
    for label, side_runs in runs.items():
        wall = statistics.mean(r["wall"] for r in side_runs)
        epochs = side_runs[0]["epochs"]
        rss = max(r["peak_rss_mib"] for r in side_runs)
        # The per-epoch backups' share of the wall time (the plain recipe makes none).
        backups = sum(r.get("backup_seconds", 0) for r in side_runs) / (wall * len(side_runs))
        print(f"{label:<30}{epochs:>7}{accuracy_text(side_runs):>22}{wall:>13.1f}"
              f"{wall / base:>11.2f}x{rss:>14.0f}{backups:>9.2%}")  # fmt: skip
    seeds = len(runs["(default)"])
    print(f"(seeds 0-{seeds - 1}; each run: " + "; ".join(
        f"{label} " + " ".join(f"{r['test_accuracy']:.4f}" for r in side_runs)
        for label, side_runs in runs.items()) + ")")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=fm.HelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, help="the four IDX files (default: the Keras cache, as users run)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds; seeds 0..rounds-1")
    parser.add_argument(
        "--epochs", type=int, help="epochs for every side (default: each side's own default)"
    )
    parser.add_argument(
        "options",
        nargs="*",
        help="after --, option sets to run the program with as well, each one quoted: "
        '-- "--augment" "--arch improved"',
    )
    parser.add_argument("--no-plain", action="store_true", help="leave the plain recipe out")
    parser.add_argument("--json", type=Path, help="also write every run and the ratios here")
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="on an AVX-512 CPU, compute as an AVX2 one: ONEDNN_MAX_CPU_ISA=AVX2 for every "
        "side, and oneDNN off for the plain recipe, as TensorFlow leaves it on AVX2 CPUs",
    )
    args = parser.parse_args()
    if args.emulate_avx2:
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

    cpu, peak = describe_cpu()
    plain_onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS") or (
        "0" if args.emulate_avx2 else "TF's default (on with AVX-512-class features)"
    )
    print(
        f"{cpu}\nPython {platform.python_version()}; data: {args.data_dir or 'the Keras cache'};"
        f" {args.epochs or 'default'} epochs, {args.rounds} rounds; plain recipe's oneDNN: "
        f"{plain_onednn}"
    )
    sides = [] if args.no_plain else ["plain"]
    sides += ["(default)", *args.options]
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for seed in range(args.rounds):
            shift = seed % len(sides)
            for side in sides[shift:] + sides[:shift]:
                if side == "plain":
                    result = run_plain(args.data_dir, seed, args.epochs, scratch)
                else:
                    options = [] if side == "(default)" else side.split()
                    result = run_program(args.data_dir, seed, args.epochs, scratch, options)
                runs[side].append(result)
                print(
                    f"round {seed} {side:<28} "
                    + " ".join(
                        f"{k}={v:.4f}"
                        if k == "test_accuracy"
                        else f"{k}={v:.1f}"
                        if isinstance(v, float)
                        else f"{k}={v}"
                        for k, v in result.items()
                    ),
                    flush=True,
                )
    print(f"default run's oneDNN: {runs['(default)'][0]['onednn']}")
    ratios = {}
    if "plain" in runs:
        flop = fit_flop_per_epoch(training_images(args.data_dir))
        ratios = summarise_speed(runs["plain"], runs["(default)"], flop, peak)
    summarise_accuracy(runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
