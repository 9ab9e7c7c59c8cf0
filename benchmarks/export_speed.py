"""How fast each export answers, in its own runtime, against Keras' predict on the same images.

    python benchmarks/export_speed.py MODEL                  # exported here first, 5 rounds
    python benchmarks/export_speed.py MODEL --rounds 5 --photos FOLDER
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/export_speed.py MODEL   # TensorFlow as AVX2

Exports MODEL with the program's own command (`fashion_mnist_cnn.py export`, into a temporary
folder), then, in one process, alternates the sides round by round and keeps each side's
fastest: single-photo latency (the median of 200 calls on one image, what a web backend pays
per request) and batch throughput (images a second over the whole check batch in batches of
256, what a catalogue job gets). The sides: Keras' `model.predict` and `predict_on_batch` on
the .keras file, the SavedModel's `serve` signature (TensorFlow without Keras), LiteRT's
interpreter on the float and the int8-weight file, onnxruntime. Images: the 10,000 test images
for a 28x28 model, else the photos given: prepared as predict prepares them for Keras, decoded
(to fit in 224x224) for a colour model's exports, which prepare them in their graph.

ONEDNN_MAX_CPU_ISA caps only TensorFlow's oneDNN (Keras, the SavedModel); LiteRT (XNNPACK) and
onnxruntime pick their own kernels from the CPU, so they are measured at the machine's own class.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import runtimes  # noqa: E402
from fashion_shop.export import check_batch  # noqa: E402
from fashion_shop.models import in_float32, kind_of, load_trained_model, scale_pixels  # noqa: E402


def exported(model_path, folder, photos):
    """The program's own export of MODEL into folder: {side: runner}."""
    command = [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), "export", str(model_path)]
    command += ["--out-dir", str(folder)] + (["--photos", *map(str, photos)] if photos else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    name = next(path.name for path in folder.iterdir() if path.is_dir())
    return {
        "SavedModel (serve)": runtimes.savedmodel_runner(folder / name / "1"),
        "LiteRT": runtimes.litert_runner(folder / f"{name}.tflite"),
        "LiteRT, int8 weights": runtimes.litert_runner(folder / f"{name}.int8.tflite"),
        "onnxruntime": runtimes.onnx_runner(folder / f"{name}.onnx"),
    }


def latency(run, image, calls=200):
    """Median seconds of one call on one image, after a few to warm up."""
    for _ in range(10):
        run(image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(run, images):
    """Images a second over the whole batch, 256 at a time."""
    runtimes.answers(run, images[:256])  # warm up
    start = time.perf_counter()
    runtimes.answers(run, images)
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model.keras written by a run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each side's fastest kept")
    parser.add_argument("--photos", type=Path, nargs="+", help="photos for a colour model")
    args = parser.parse_args()
    fm.choose_onednn(fm.cpu_info()[1])  # as main() does
    keras = fm.start_tensorflow_quietly()
    model = load_trained_model(args.model)
    in_float32(model)
    batch = check_batch(
        argparse.Namespace(photos=args.photos, data_dir=None, model=args.model), kind_of(model)
    )
    # A colour model's exports take the decoded photos and prepare them in their graph; Keras'
    # model takes them prepared.
    prepared = batch.images if batch.prepared is None else batch.prepared
    with tempfile.TemporaryDirectory() as folder:
        sides = {
            "Keras predict": (lambda x: model.predict(x, verbose=0), prepared),
            "Keras predict_on_batch": (model.predict_on_batch, prepared),
            **{
                side: (run, batch.images)
                for side, run in exported(args.model, Path(folder), args.photos).items()
            },
        }
        best = {side: [float("inf"), 0.0] for side in sides}
        for round_ in range(args.rounds):
            for side, (run, images) in sides.items():
                one = images[:1] if isinstance(images, list) else scale_pixels(images[:1])
                one = np.stack(one) if isinstance(one, list) else one
                best[side][0] = min(best[side][0], latency(run, one))
                best[side][1] = max(best[side][1], throughput(run, images))
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    what = batch.what
    name, flags = fm.cpu_info()
    print(
        f"{name}, {fm.cpu_class(flags)}, {fm.cpu_cores()} cores, oneDNN {fm.onednn_setting()}; "
        f"Keras {keras.__version__}; {what}, fastest of {args.rounds} rounds"
    )
    keras_latency, keras_rate = best["Keras predict"]
    print(
        "| runtime | one photo | vs Keras predict | images a second (batches of 256) | vs Keras |"
    )
    print("| --- | --- | --- | --- | --- |")
    for side, (seconds, rate) in best.items():
        print(
            f"| {side} | {seconds * 1e6:,.0f} µs | {keras_latency / seconds:,.0f}x | "
            f"{rate:,.0f} | {rate / keras_rate:.2f}x |"
        )


if __name__ == "__main__":
    main()
