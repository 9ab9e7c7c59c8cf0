"""Where does a training step's time go? Profile the default run's fit and total it by op.

    pip install xprof   # reads TensorFlow's profile files; not needed for anything else
    python benchmarks/profile_epoch.py [--data-dir DIR] [--steps 200] [--precision auto]

It trains one warm-up pass (tracing, oneDNN set-up), then profiles `--steps` steps of the
default run's training with tf.profiler and prints each op type's share of the compute time.
"""

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fashion_mnist_cnn as fm  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="the four IDX files (default: Keras cache)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--no-split", action="store_true", help="whole batches, not halves")
    args = parser.parse_args()
    try:
        from xprof.profile_data import ProfileData
    except ImportError:
        sys.exit("profile_epoch.py needs xprof to read the profile: pip install xprof")

    fm.choose_onednn(fm.cpu_info()[1], bfloat16=args.precision == "bfloat16")  # as main() does
    (x_train, y_train), _ = fm.load_fashion_mnist(args.data_dir)
    keras = fm.start_tensorflow_quietly()
    import tensorflow as tf

    # The program's own choices for these options, on this machine.
    options = fm.parse_train_args(["--precision", args.precision] + ["--no-split"] * args.no_split)
    compute = fm.choose_compute(
        options, len(x_train), 0, fm.find_gpus(), fm.cpu_info(), fm.cpu_cores(), fm.onednn_setting()
    )
    fm.apply_threads(compute["threads"])
    print(f"On {compute['device']}: {compute['precision']}, {compute['why']['split_batches']}")
    keras.utils.set_random_seed(0)
    precision, split = compute["precision"], compute["split_batches"]
    model = fm.build_model(precision)
    model = fm.in_halves(model) if split else model
    data = fm.batches(x_train, y_train, fm.BATCH_SIZE, epoch_key=(fm.SEED, 0), halves=split)
    data = data.take(args.steps)
    model.fit(data, verbose=0)  # warm-up: tracing and kernel set-up are not steady state
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        model.fit(data, verbose=0)
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        profile = ProfileData.from_file(str(next(Path(logdir).rglob("*.xplane.pb"))))
        by_op = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):  # TensorFlow's compute threads
                    continue
                for event in line.events:
                    if event.name != "ExecutorState::Process":  # a wrapper around the ops
                        by_op[event.name.rsplit("/", 1)[-1].rpartition(":")[2]] += event.duration_ns
    total = sum(by_op.values())
    print(
        f"{args.steps} steps ({precision}{', in halves' if split else ''}) in {wall:.2f} s wall, "
        f"{wall / args.steps * 1e3:.1f} ms a step; op time {total / 1e9:.2f} s"
    )
    for op, nanoseconds in by_op.most_common(12):
        print(f"  {100 * nanoseconds / total:5.1f}%  {op}")


if __name__ == "__main__":
    main()
