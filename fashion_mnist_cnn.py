"""Train the classic small CNN on Fashion-MNIST, show what it learned, and save it.

    python fashion_mnist_cnn.py                 # train and evaluate; results in runs/<time>/
    python fashion_mnist_cnn.py --data-dir DIR  # the same, offline, from the four IDX files
    python fashion_mnist_cnn.py COMMAND ...     # the shop's tools in fashion_shop/ (see --help)

The story first: data, model, train and evaluate, figures; then compute, save and continue, the CLI.
TensorFlow loads (local imports) once arguments and data are checked: --help and mistakes are quick.
"""

import argparse
import contextlib
import errno
import functools
import gc
import gzip
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

# The classic recipe; every run saves the options it used in metrics.json.
EPOCHS, AUGMENT_EPOCHS = 10, 15  # mirrored images take longer to pay (benchmarks/README.md)
BATCH_SIZE = 32
VALIDATION_SPLIT = 0.2  # share of the training set held out to validate each epoch
SEED = 42
SAMPLES = [0, 1]  # test images shown in predictions.png
EVAL_BATCH_SIZE = 256  # validation and test passes only: same numbers, fewer steps
# --arch improved's recipe (benchmarks/README.md): BatchNorm learns from larger batches, faster.
IMPROVED_BATCH_SIZE, IMPROVED_LEARNING_RATE = 256, 0.005  # the rate falls to 0 along a cosine

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
COMMANDS = ["predict", "finetune", "export", "review", "report"]  # the shop's, in fashion_shop/

# TensorFlow's C++ start-up notes are noise to our users; their own setting still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


class UserError(Exception):
    """A problem with what the user gave us: reported as one line, never as a traceback."""


def first_sentence(error):
    """A library's error in short: its first sentence (after get_file's ' -- '), else its type."""
    text = (str(error).split(". ")[0].strip().splitlines() or [""])[0].rpartition(" -- ")[2]
    return text if 0 < len(text) <= 200 else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Data: the official files (downloaded and checked, or --data-dir), the split, batches in [0, 1].
OFFICIAL_FILES = {  # the four official files: size in bytes and md5 of each .gz, as Zalando's
    "train-images-idx3-ubyte.gz": (26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": (29_515, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": (4_422_102, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": (5_148, "bb300cfdad3c16e7a12a480ee83cd310"),
}
MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"  # the one keras uses
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801  # magic numbers: unsigned bytes, 3 or 1 dimensions


@contextlib.contextmanager
def tensorflow_notes_hidden(shown_on_failure=True):
    """stderr hidden (TensorFlow's C++ notes precede its log level), shown if the block fails."""
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":  # the user asked to see all
        yield
        return
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException as error:
            if shown_on_failure and not isinstance(error, KeyboardInterrupt):  # else, said why
                log.seek(0)
                os.write(saved_stderr, log.read())
            raise
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)


def start_tensorflow_quietly():
    with tensorflow_notes_hidden():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices()  # finding the devices writes notes too
    # A note each time a batch of a new size is traced: nothing for a user to act on.
    tf.get_logger().addFilter(lambda record: "tf.function retracing" not in record.getMessage())
    return keras


def download(url, file_hash, cache_subdir, offline):
    """A file fetched once into the Keras cache and checked; without internet, says `offline`."""
    keras = start_tensorflow_quietly()
    name = url.rpartition("/")[2]
    try:
        return Path(keras.utils.get_file(name, url, file_hash=file_hash, cache_subdir=cache_subdir))
    except Exception as error:  # get_file raises bare Exceptions for network failures
        reason = f"could not download {name} ({first_sentence(error)})"
        raise UserError(f"{reason}. Without internet, {offline}") from None


def download_data_files():
    offline = "put the four Fashion-MNIST files from https://github.com/zalandoresearch/"
    offline += "fashion-mnist in a folder and pass --data-dir FOLDER"
    get = functools.partial(download, cache_subdir="datasets/fashion-mnist", offline=offline)
    return {name: get(MIRROR + name, md5) for name, (_, md5) in OFFICIAL_FILES.items()}


def find_data_files(data_dir):
    if not data_dir.is_dir():
        problem = "not a folder" if data_dir.exists() else "no such folder"
        raise UserError(f"--data-dir {data_dir}: {problem}")
    paths = {}
    for name in OFFICIAL_FILES:
        either = (data_dir / name, data_dir / name.removesuffix(".gz"))
        paths[name] = next((path for path in either if path.is_file()), None)
        if not paths[name]:
            raise UserError(f"--data-dir {data_dir}: {name} is missing (gzipped or not)")
    return paths


def is_official(path, name):
    """True for a file of the official size, which must then also have the official md5."""
    size, md5 = OFFICIAL_FILES[name]
    if path.name != name or path.stat().st_size != size:
        return False
    if hashlib.md5(path.read_bytes()).hexdigest() != md5:
        damaged = f"it has the size of the official {name} but not its md5, so it is damaged"
        raise UserError(f"{path}: checksum mismatch: {damaged}; download it again")
    return True


def read_idx(path, magic):
    """An IDX file (gzipped or not) as uint8, read whole: a lying header cannot make us allocate."""
    what, gzipped = ("image" if magic == IDX_IMAGES else "label"), False
    try:
        data = path.read_bytes()
        gzipped = data[:2] == b"\x1f\x8b"
        data = gzip.decompress(data) if gzipped else data
    except (OSError, EOFError, zlib.error) as error:
        reason = "not a valid gzip file" if gzipped else "could not be read"
        raise UserError(f"{path}: {reason} ({error})") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() or "missing"
        raise UserError(f"{path}: not an IDX {what} file (magic {found}, expected {magic:08x})")
    start = 4 + 4 * data[3]  # the header: magic, then one 4-byte size per dimension
    if len(data) < start:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(np.frombuffer(data[4:start], ">u4").tolist())
    if magic == IDX_IMAGES and dims[1:] != (28, 28):
        raise UserError(f"{path}: images are {dims[1]}x{dims[2]} pixels, not 28x28")
    expected = math.prod(dims)
    if len(data) - start != expected:
        problem = "is truncated" if len(data) - start < expected else "has bytes past the end"
        promised = f"its header promises {dims[0]:,} {what}s ({expected:,} bytes)"
        raise UserError(f"{path}: {problem}: {promised}")
    if dims[0] == 0:
        raise UserError(f"{path}: holds no {what}s")
    return np.frombuffer(data, np.uint8, offset=start).reshape(dims)


def load_fashion_mnist(data_dir=None):
    """(x_train, y_train), (x_test, y_test) as uint8 arrays, from data_dir or the download."""
    paths = download_data_files() if data_dir is None else find_data_files(data_dir)
    # get_file checked downloads; of files given, each of official size is (a list: every one).
    official = data_dir is None or all([is_official(p, name) for name, p in paths.items()])
    splits = []
    for split in ("train", "t10k"):
        images_path = paths[f"{split}-images-idx3-ubyte.gz"]
        labels_path = paths[f"{split}-labels-idx1-ubyte.gz"]
        images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
        if len(images) != len(labels):
            counts = f"{len(images):,} images but {labels_path} {len(labels):,} labels"
            raise UserError(f"{images_path} holds {counts}")
        if labels.max() > 9:
            raise UserError(f"{labels_path}: label {labels.max()} found, labels must be 0-9")
        splits.append((images, labels))
    if not official:
        note = f"the data in {data_dir} is not the official Fashion-MNIST files, so its accuracy"
        print(f"note: {note} is not comparable with published figures")
    return splits


def split_validation(n_images, validation_split, seed):
    """Indices to train on and to hold out, drawn (Keras' last 20% can be whole classes)."""
    order = np.random.default_rng(seed).permutation(n_images)
    split_at = math.floor(n_images * (1 - validation_split))
    if split_at == 0 or split_at == n_images:
        leaves = f"leaves no training or no validation images out of {n_images}"
        raise UserError(f"--validation-split {validation_split} {leaves}")
    return order[:split_at], order[split_at:]


def batches(images, labels, batch_size, indices=None, epoch_key=None, halves=False, augment=False):
    """The images at `indices` (default: all) scaled to [0, 1] a batch at a time, in an order (and
    mirrored) drawn from epoch_key=(seed, epoch) alone, to make any epoch again when continuing."""
    import tensorflow as tf

    images, labels = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
    indices = np.arange(len(labels)) if indices is None else indices
    if epoch_key is not None:
        draws = np.random.default_rng(epoch_key)
        indices = draws.permutation(indices)
    order = tf.data.Dataset.from_tensor_slices(indices).batch(batch_size)
    if augment:  # a key a batch, drawn from the epoch_key after the order
        keys = draws.integers(2**31, size=(math.ceil(len(indices) / batch_size), 2))
        order = tf.data.Dataset.zip(order, tf.data.Dataset.from_tensor_slices(keys))

    def gather(batch, key=None):
        x = tf.cast(tf.gather(images, batch)[..., tf.newaxis], tf.float32) / 255.0
        if augment:  # mirrored with probability 1/2, by stateless draws from the batch's key
            mirror = tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], seed=key) < 0.5
            x = tf.where(mirror, tf.reverse(x, axis=[2]), x)
        if halves:
            middle = tf.shape(batch)[0] // 2
            x = (x[:middle], x[middle:])
        return x, tf.gather(labels, batch)

    # A fixed prefetch, autotuning off: its rounds made each epoch end late (benchmarks/README).
    options = tf.data.Options()
    options.autotune.enabled = False
    return order.map(gather).prefetch(2).with_options(options)


# ----------------------------------------------------------------------------------------------
# Model
MIRRORED = "_mirrored"  # fashion_mnist_cnn[_improved][_mirrored]: predict reads what it learned


def hidden_layers(layers, arch):
    """seed: the design's, 93,322 parameters; improved: BatchNorm (momentum 0.9 settles within a
    short run) and light Dropout, 422,538, of the kind the benchmark lists at about 93%."""
    if arch == "seed":
        return [
            layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(), layers.Dense(64, activation="relu"),
        ]  # fmt: skip
    return [
        layers.Conv2D(32, (3, 3), padding="same", activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.BatchNormalization(momentum=0.9),
        layers.Conv2D(64, (3, 3), padding="same", activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.BatchNormalization(momentum=0.9), layers.Dropout(0.1),
        layers.Flatten(), layers.Dense(128, activation="relu"),
        layers.BatchNormalization(momentum=0.9), layers.Dropout(0.3),
    ]  # fmt: skip


def compile_model(model, optimizer, steps_per_execution=1):  # for every model trained here
    loss = "sparse_categorical_crossentropy"
    model.compile(optimizer, loss, metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model


def build_model(
    precision="float32", arch="seed", steps_per_execution=32, total_steps=None, mirrored=False
):
    """The CNN with Adam (improved: at a rate falling to 0 over total_steps)."""
    import keras
    from keras import layers

    previous_policy = keras.config.dtype_policy()
    if precision == "bfloat16":  # weights and Adam stay float32; only the arithmetic is bf16
        keras.config.set_dtype_policy("mixed_bfloat16")
    name = "fashion_mnist_cnn" if arch == "seed" else f"fashion_mnist_cnn_{arch}"
    try:  # in this order: each layer draws the seed of its initial weights as it is made
        stack = [keras.Input((28, 28, 1)), *hidden_layers(layers, arch)]
        stack.append(layers.Dense(10, activation="softmax", dtype="float32"))  # stable in bf16 too
        model = keras.Sequential(stack, name=name + MIRRORED * mirrored)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    learning_rate = 0.001  # Adam's default: the recipe's
    if arch == "improved":
        learning_rate = keras.optimizers.schedules.CosineDecay(IMPROVED_LEARNING_RATE, total_steps)
    return compile_model(model, keras.optimizers.Adam(learning_rate), steps_per_execution)


def in_halves(model):
    """The model fed two halves of each batch side by side, joined before the loss: same steps."""
    import keras

    first, second = keras.Input((28, 28, 1)), keras.Input((28, 28, 1))
    both = keras.layers.Concatenate(axis=0)([model(first), model(second)])
    trainer = keras.Model([first, second], both, name=f"{model.name}_in_halves")
    return compile_model(trainer, model.optimizer, model.steps_per_execution)


# ----------------------------------------------------------------------------------------------
# Train and evaluate
# Ctrl-C, and the SIGTERM of schedulers, `timeout` and container stops: both stop gracefully.
STOP_SIGNALS = {signal.SIGINT: "Interrupted", signal.SIGTERM: "Terminated"}


@contextlib.contextmanager
def stop_gracefully(model=None, then="finishing this step, then saving", file=None):
    """A first Ctrl-C or SIGTERM sets state["signal"] (and stops training), a second quits."""
    state = {"signal": None}

    def handle(signum, frame):
        state["signal"] = signum
        if model is not None:
            model.stop_training = True
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_DFL)
        print(f"\n{STOP_SIGNALS[signum]}: {then}. Again to quit now.", file=file or sys.stdout)

    previous = {stop_signal: signal.signal(stop_signal, handle) for stop_signal in STOP_SIGNALS}
    try:
        yield state
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def new_progress():
    counters = {"train_seconds": 0.0, "backup_seconds": 0.0, "continued_from_epoch": None}
    return {"epochs_completed": 0, "history": {}} | counters


def train(model, epoch_data, validation_data, epochs, out_dir, progress=None, back_up=None):
    """Fit from `progress` on, an epoch at a time on epoch_data(epoch), back_up after each."""
    from keras.callbacks import CSVLogger, LambdaCallback

    progress = progress or new_progress()
    # A fit() per epoch, on batches made for it, ended by this, its progress bar counting to epochs.
    stop = LambdaCallback(on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", True))
    with stop_gracefully(model) as state:
        for epoch in range(progress["epochs_completed"], epochs):
            if state["signal"]:  # it came while the last epoch was backed up
                break
            start = time.perf_counter()
            history = model.fit(
                epoch_data(epoch),
                validation_data=validation_data,
                initial_epoch=epoch,
                epochs=epochs,
                shuffle=False,  # each epoch's batches come in their own order already
                verbose=1 if sys.stdout.isatty() else 2,  # a progress bar, or a line an epoch
                callbacks=[stop, CSVLogger(out_dir / "history.csv", append=True)],
            ).history
            progress["train_seconds"] += time.perf_counter() - start
            for key, values in history.items():
                progress["history"].setdefault(key, []).extend(values)
            if state["signal"]:  # an epoch cut short is not a completed one
                break
            progress["epochs_completed"] = epoch + 1
            if back_up:
                start = time.perf_counter()
                back_up(progress)
                progress["backup_seconds"] += time.perf_counter() - start
    return progress, state["signal"]


def confusion_matrix(true, predicted):
    """Counts of (true class, predicted class) pairs, true classes as rows."""
    return np.bincount(true.astype(int) * 10 + predicted, minlength=100).reshape(10, 10)


def per_class_accuracy(confusion, only_present=False):
    """Each class's share predicted right (0 for a class without images; or only_present ones)."""
    counts = confusion.sum(axis=1)
    accuracy = (confusion.diagonal() / np.maximum(counts, 1)).round(4).tolist()
    return {CLASS_NAMES[c]: accuracy[c] for c in range(10) if counts[c] or not only_present}


def evaluate(model, test_data, y_test):
    """Test scores by predict_on_batch: predict would first trace a model per step of a call."""
    import keras

    probabilities = np.concatenate([model.predict_on_batch(x) for x, _ in test_data])
    predicted = probabilities.argmax(axis=1)
    loss = np.mean(keras.losses.sparse_categorical_crossentropy(y_test, probabilities))
    scores = {"test_accuracy": float(np.mean(predicted == y_test)), "test_loss": float(loss)}
    confusion = confusion_matrix(y_test, predicted)
    scores["per_class_accuracy"] = per_class_accuracy(confusion)
    return scores | {"probabilities": probabilities, "confusion": confusion}


# ----------------------------------------------------------------------------------------------
# Figures: the model's answers on test images, for people (the report command draws more).
def use_windows(show):
    """Whether figures open in windows, where asked and possible; else Agg: files only."""
    import matplotlib

    display = any(os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY"))
    shown = show and (display or sys.platform in ("win32", "darwin"))
    if not shown:
        matplotlib.use("Agg")
    return shown


def plot_predictions(images, labels, probabilities):
    from matplotlib import pyplot, ticker

    size, ratios = (10, 3 * len(images) + 0.8), {"width_ratios": [1, 1.6]}
    fig, axes = pyplot.subplots(len(images), 2, figsize=size, squeeze=False, gridspec_kw=ratios)
    for (picture, bars), image, label, probs in zip(axes, images, labels, probabilities):
        predicted = int(np.argmax(probs))
        colour = "tab:green" if predicted == label else "tab:red"
        picture.imshow(image, cmap="binary")
        picture.set(xticks=[], yticks=[])
        title = f"Predicted: {CLASS_NAMES[predicted]} ({probs[predicted]:.1%})\n"
        picture.set_title(title + f"True: {CLASS_NAMES[label]}", color=colour)
        bars.barh(range(10), probs, color="lightgrey")[predicted].set_color(colour)
        bars.set_yticks(range(10), CLASS_NAMES)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.xaxis.set_major_formatter(ticker.PercentFormatter(1.0))
    fig.suptitle("Predictions on test images (green: right, red: wrong)")
    return fig


# ----------------------------------------------------------------------------------------------
# Compute: device, precision, halves, threads, from the machine; metrics.json says why of each.
# ONEDNN_MAX_CPU_ISA values that keep oneDNN from AVX-512, or from bf16.
BELOW_AVX512 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
BELOW_BF16 = BELOW_AVX512 | {"AVX512_CORE", "AVX512_CORE_VNNI"}
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # an x86 CPU's flags for native bf16
# A CPU's class, which decides the fastest kernels: the first whose flags it has all of.
CPU_CLASSES = [
    ({"asimd", "bf16"}, "Arm with bf16"), ({"asimd"}, "Arm"), ({"amx_bf16"}, "AMX"),
    ({"avx512_bf16"}, "AVX-512 with bf16"), ({"avx512f"}, "AVX-512"), ({"avx2"}, "AVX2"),
]  # fmt: skip


def cpu_info(text=None, machine=None):
    """The CPU's name and flags, less those ONEDNN_MAX_CPU_ISA forbids; text: /proc/cpuinfo's."""
    if text is None:
        cpuinfo = Path("/proc/cpuinfo")
        text = cpuinfo.read_text() if cpuinfo.is_file() else ""  # none on macOS, Windows
    machine = platform.machine() if machine is None else machine
    fields = dict(map(str.strip, line.split(":", 1)) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("flags", fields.get("Features", "")).split())  # x86's, Arm's
    if machine.lower() in ("arm64", "aarch64"):
        flags.add("asimd")  # NEON, which every 64-bit Arm CPU has; macOS has no cpuinfo to say so
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in BELOW_AVX512:
        flags = {flag for flag in flags if not flag.startswith(("avx512", "amx"))}
    if cap in BELOW_BF16:
        flags -= BF16_FLAGS
    return fields.get("model name", machine or "unknown CPU"), flags


def cpu_class(flags):
    found = [name for needed, name in CPU_CLASSES if needed <= flags]
    return found[0] if found else ("older than AVX2" if flags else "features unknown")


def cpu_cores():  # those this process may use
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_onednn(flags, bfloat16=False):
    """oneDNN from AVX2 on (TF's from AVX-512), but for bf16 below AVX-512; before TF loads."""
    if "avx2" in flags:
        below_avx512 = bfloat16 and "avx512f" not in flags
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0" if below_avx512 else "1")


def onednn_setting():
    return {"1": "on", "0": "off"}.get(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "TF's default")


def find_gpus():
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        name, capability = details.get("device_name", gpu.name), details.get("compute_capability")
        gpus.append({"name": name, "compute_capability": tuple(capability or (0, 0))})
    return gpus


def native_bf16(gpus, flags):
    """Whether the first GPU (from compute capability 8.0), or else the CPU, has native bf16."""
    return gpus[0]["compute_capability"] >= (8, 0) if gpus else bool(BF16_FLAGS & flags)


def choose_compute(args, n_fit, n_held_out, gpus, cpu, cores, onednn):
    """Device, precision, batches whole or in halves, threads, and "why" of each."""
    model_name, flags = cpu
    native = native_bf16(gpus, flags)
    if gpus:  # without a distribution strategy, TensorFlow computes on the first GPU
        major, minor = gpus[0]["compute_capability"]
        device = f"GPU ({gpus[0]['name']})"
        bf16 = "native" if native else "native only from 8.0, so float32"
        why_precision = f"compute capability {major}.{minor}: bf16 is {bf16}"
    else:
        device = f"CPU ({model_name}, {cpu_class(flags)}, {cores} cores)"
        bf16 = "computes bf16 natively" if native else "has no native bf16, so float32"
        why_precision = f"the CPU {bf16}"
    one_left = n_fit % args.batch_size == 1 or n_held_out % EVAL_BATCH_SIZE == 1
    rules = [  # why batches stay whole; the first that applies is told
        (gpus, "on a GPU a whole batch is one kernel per layer already"),
        (args.no_split, "whole batches: --no-split"),
        (cores != 2, f"whole batches: {cores} core(s), and halves are measured to pay on 2"),
        (args.arch != "seed", "whole batches: --arch improved (BatchNorm needs the whole batch)"),
        (args.batch_size < 2, "whole batches: batches of one image"),
        (one_left, "whole batches: a batch of one image"),
    ]
    whole = [reason for applies, reason in rules if applies]
    precision = "bfloat16" if native else "float32"
    if args.precision != "auto":
        precision, why_precision = args.precision, f"--precision {args.precision}"
    halves = "2 cores, the classic model: two halves side by side, the same results"
    why = {"precision": why_precision, "split_batches": whole[0] if whole else halves}
    own = "TensorFlow's own" + " on a GPU" * bool(gpus)
    why["threads"] = own if whole else "half the cores for each half"
    threads = None if whole else {"intra_op": cores // 2, "inter_op": 2}
    chosen = {"device": device, "precision": precision, "split_batches": not whole}
    return chosen | {"threads": threads, "onednn": onednn, "why": why}


def apply_threads(threads):
    """Before TensorFlow's first operation; the user's TF_NUM_*_THREADS win."""
    import tensorflow as tf

    if threads and "TF_NUM_INTRAOP_THREADS" not in os.environ:
        tf.config.threading.set_intra_op_parallelism_threads(threads["intra_op"])
    if threads and "TF_NUM_INTEROP_THREADS" not in os.environ:
        tf.config.threading.set_inter_op_parallelism_threads(threads["inter_op"])


# ----------------------------------------------------------------------------------------------
# Save and continue: files are written whole or not at all, and a run stopped by anything (kill
# -9) goes on from its last epoch to an unbroken run's numbers: backup/ holds the weights, Adam's
# and the Dropout layers' random state, all checked. Keras' BackupAndRestore keeps no random state.
BACKUP_FORMAT = 1  # what backup/ holds; a backup in another format is refused


@contextlib.contextmanager
def atomic_path(path):
    """A name beside `path` (with its suffix, which Keras needs), renamed onto it once written."""
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_json(data, path):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")  # str: paths


def save_figure(fig, path):
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)


def fingerprint(*arrays):
    """A short hash of the contents: a run continues only on the data it started on."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def file_sha256(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def state_checksum(state):
    """state.json's checksum of the rest of itself: a changed one is refused."""
    rest = {key: value for key, value in state.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


def unfinished_runs(command):
    """`command`'s unfinished runs under runs/, newest first: (folder, state or None if unread)."""
    found = []
    paths = Path("runs").glob("*/backup/state.json")
    for path in sorted(paths, key=os.path.getmtime, reverse=True):
        try:
            state = json.loads(path.read_text())
            ours = state.get("command", command) == command
        except (OSError, ValueError, AttributeError):
            state, ours = None, True  # read_backup says why
        if ours:
            found.append((path.parent.parent, state))
    return found


def can_go_on(state, epochs):
    """Whether the same command may go on with this run: its process ended, not past `epochs`."""
    if not isinstance(state, dict) or state.get("progress", {}).get("epochs_completed", 0) > epochs:
        return False
    pid = state.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or os.name == "nt":  # nt: kill 0 is Ctrl-C
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process is there
    except OSError as error:  # ESRCH: it has ended; EPERM: another user's, still going
        return error.errno == errno.ESRCH
    return False


def check_out_dir(out_dir, overwrite=False, resume=False, make=False):
    """Refuse an --out-dir this run cannot use, before any heavy work; make it only if asked."""
    if out_dir is None:
        return
    unfinished = (out_dir / "backup" / "state.json").exists()
    if resume and not unfinished:
        raise UserError(f"--resume: {out_dir} holds no unfinished run to continue")
    if not (overwrite or unfinished) and (out_dir / "metrics.json").exists():
        raise UserError(f"--out-dir {out_dir} holds a finished run; pass --overwrite to replace it")
    if not (overwrite or unfinished) and (out_dir / "model.keras").exists():  # put there by hand
        held = f"--out-dir {out_dir} holds a model.keras that this run would replace"
        raise UserError(f"{held}; give another --out-dir, or --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir}: a file, not a folder")
    try:
        if make:
            out_dir.mkdir(parents=True, exist_ok=True)
        nearest = next(folder for folder in (out_dir, *out_dir.parents) if folder.exists())
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({error.strerror})") from None


def read_backup(out_dir, command, options, epochs):
    """out_dir's backup, if any, refused if damaged, foreign, with other options or epochs."""
    if not (path := out_dir / "backup" / "state.json").exists():
        return None
    problem = None
    try:
        state = json.loads(path.read_text())
        weights = out_dir / "backup" / str(state.get("weights"))
        if state.get("format") != BACKUP_FORMAT:
            problem = "it was written by another version of this program"
        elif state.get("checksum") != state_checksum(state):
            problem = "backup/state.json has been changed or damaged"
        elif not weights.is_file() or file_sha256(weights) != state["weights_sha256"]:
            problem = f"{weights.name} is missing or damaged"
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        problem = "backup/state.json cannot be read"
    if problem:
        raise UserError(f"{out_dir} cannot be continued: {problem}; to start over, add --overwrite")
    if state["command"] != command:
        other = f"{state['command']} run, not a {command} one"
        raise UserError(f"{out_dir} holds an unfinished {other}")
    for name, value in options.items():
        if (started := state["options"].get(name)) == value:
            continue
        if isinstance(value, bool):
            was = f"{'with' if started else 'without'} {name}"
        elif name.startswith("--"):
            was = f"with {name} {started}, not {value}"
        else:
            was = f"from another {name}"
        same = "continue it with the same options, or start over with --overwrite"
        raise UserError(f"{out_dir} was started {was}: {same}")
    done = state["progress"]["epochs_completed"]
    if epochs < done:
        raise UserError(f"--epochs {epochs}: {out_dir} has completed {done} epochs already")
    return state


class Run(NamedTuple):  # a run's folder, and what its backup records and must match
    out_dir: Path
    command: str  # "training" or "finetune"
    options: dict  # what a continued run must share with the run it continues
    backup: dict | None  # the backup to continue from, checked
    again: str = ""  # what the same command needs to continue the run: nothing, or less --overwrite


def open_run(args, command, options, suffix=""):
    """The run's folder and backup: --out-dir, --resume's newest unfinished run, else the newest
    with the same options (a kill -9 says nothing: the same command goes on), else a new one."""
    out_dir, found = args.out_dir, False
    if out_dir is None and args.resume:
        if not (runs := unfinished_runs(command)):
            raise UserError(f"--resume: no unfinished {command} run under runs/ to continue")
        out_dir = runs[0][0]
    elif out_dir is None and not args.overwrite:
        for folder, state in unfinished_runs(command):
            if can_go_on(state, args.epochs) and state.get("options") == options:
                out_dir, found = folder, True
                break
    if out_dir is None:  # one per run, so that no run overwrites another
        stamp, n = time.strftime("%Y%m%d-%H%M%S") + suffix, 1
        while (out_dir := Path("runs") / (f"{stamp}-{n}" if n > 1 else stamp)).exists():
            n += 1
    check_out_dir(out_dir, args.overwrite, args.resume, make=True)
    backup = None if args.overwrite else read_backup(out_dir, command, options, args.epochs)
    if backup:
        done = backup["progress"]["epochs_completed"]
        same = " (an unfinished run with the same options; --overwrite starts anew)" * found
        all_done = f": its {done} epochs are done; evaluating and saving"
        then = all_done if done == args.epochs else f" from epoch {done + 1} of {args.epochs}"
        print(f"Continuing {out_dir}{then}{same}")
    return Run(out_dir, command, options, backup, " without --overwrite" * args.overwrite)


def random_state(model):
    """The Dropout layers' seed state, which save_weights leaves out."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def save_backup(model, run, progress):
    folder = run.out_dir / "backup"
    folder.mkdir(exist_ok=True)
    weights = folder / f"epoch-{progress['epochs_completed']}.weights.h5"
    # Room first: h5py cannot close a file the disk had no room for, and HDF5 crashes at exit.
    variables = model.weights + list(getattr(model.optimizer, "variables", []))
    size = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    if shutil.disk_usage(folder).free < 2 * size + 2**20:
        raise OSError(errno.ENOSPC, "No space left on device", str(weights))
    model.save_weights(weights)  # with the optimizer's state
    state = {"format": BACKUP_FORMAT, "command": run.command, "options": run.options}
    state |= {"progress": progress, "weights": weights.name, "weights_sha256": file_sha256(weights)}
    state |= {"pid": os.getpid(), "random_state": [v.numpy().tolist() for v in random_state(model)]}
    save_json(state | {"checksum": state_checksum(state)}, folder / "state.json")
    for old in set(folder.glob("*.weights.h5")) - {weights}:
        old.unlink()


def remove_backup(out_dir):
    # state.json first: without it there is no backup, whatever a kill leaves.
    (out_dir / "backup" / "state.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "backup", ignore_errors=True)


def train_run(model, run, epoch_data, validation_data, epochs, halves=False):
    """train() from the run's backup (put back into the model), or a first one, backing it up."""
    if not model.optimizer.built:  # else Keras would skip the backup's optimizer state
        model.optimizer.build(model.trainable_variables)
    history, progress = run.out_dir / "history.csv", new_progress()
    if run.backup is None:
        remove_backup(run.out_dir)
        for name in ("history.csv", "training_curves.png", "confusion_matrix.png", "mistakes.png"):
            (run.out_dir / name).unlink(missing_ok=True)  # an earlier run's (and report's figures)
        save_backup(model, run, progress)
    else:
        try:
            with warnings.catch_warnings(action="error"):  # Keras only warns when it skips a part
                model.load_weights(run.out_dir / "backup" / run.backup["weights"])
            for variable, seed in zip(random_state(model), run.backup["random_state"], strict=True):
                variable.assign(seed)
        except (ValueError, OSError, KeyError, Warning):  # Keras' reasons run to many lines
            why = f"{run.out_dir} cannot be continued: its backup does not fit this model"
            raise UserError(f"{why}; to start over, add --overwrite") from None
        done = run.backup["progress"]["epochs_completed"]
        if history.exists():  # back to its rows of the completed epochs; CSVLogger appends to it
            rows = history.read_text().splitlines(keepends=True)
            with atomic_path(history) as temporary:
                temporary.write_text("".join(rows[: 1 + done]))
        progress = run.backup["progress"] | {"continued_from_epoch": done}
    trainer = in_halves(model) if halves else model
    back_up = functools.partial(save_backup, model, run)
    return train(trainer, epoch_data, validation_data, epochs, run.out_dir, progress, back_up)


def finish_run(run, model, progress, stop_signal, results, details, saved):
    """Save model and metrics.json, drop the backup unless a signal stopped the run; exit code."""
    with atomic_path(run.out_dir / "model.keras") as temporary:
        model.save(temporary)
    done = progress["epochs_completed"]
    record = {"epochs_completed": done, "interrupted": stop_signal is not None}
    record |= {key: progress[key] for key in ("continued_from_epoch", "history")}
    record |= {key: round(progress[key], 2) for key in ("train_seconds", "backup_seconds")}
    save_json(results | record | details, run.out_dir / "metrics.json")
    print(f"\nSaved {saved} to {run.out_dir}/")
    if stop_signal is None:
        remove_backup(run.out_dir)
        return 0
    print(f"Run the same command{run.again} again to continue from epoch {done + 1}.")
    return 128 + stop_signal  # the shell's code: 130 for Ctrl-C, 143 for SIGTERM


# ----------------------------------------------------------------------------------------------
# The command line: arguments (a bad value is one line, before TensorFlow loads), then the run.
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block that buries the mistake
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default that depends on others is said in words
        return action.help if action.default is None else super()._get_help_string(action)


def checked(convert, accept, expected):
    """An argparse type: convert(text), kept where accept(value) holds, else one line."""

    def parse(text):
        with contextlib.suppress(ValueError):
            value = convert(text)
            if value is not None and accept(value):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


def digits(text):
    return int(text) if text.isascii() and text.isdigit() else None  # no signs, spaces, "²"


positive_int = checked(
    lambda t: digits(t.strip().lstrip("+")), lambda n: n >= 1, "a whole number of at least 1"
)
# NumPy's seeding, which Keras' set_random_seed uses too, takes 0 to 2**32 - 1 only.
seed_value = checked(digits, lambda n: n < 2**32, "a whole number from 0 to 2**32 - 1")
sample_index = checked(digits, lambda n: True, "a test image index (0, 1, ...)")
share_of_one = checked(float, lambda x: 0 < x < 1, "a number between 0 and 1")
share_or_zero = checked(float, lambda x: 0 <= x < 1, "a number from 0 to below 1")


def add_run_folder_options(parser, what="the model, metrics and figures", suffix=""):
    where = f"where {what} go (default: a new runs/<timestamp>{suffix}/)"
    parser.add_argument("--out-dir", type=Path, help=where)
    either = parser.add_mutually_exclusive_group()
    again = "start over, in --out-dir or a new folder (else an unfinished run is continued)"
    either.add_argument("--overwrite", action="store_true", help=again)
    newest = "continue the newest unfinished run under runs/, or --out-dir's"
    either.add_argument("--resume", action="store_true", help=newest)


def parse_train_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py",
        usage=f"%(prog)s [options]  (train)\n       %(prog)s {{{','.join(COMMANDS)}}} ...",
        description="Train the classic small CNN on Fashion-MNIST and show what it learned.",
        epilog="With its model.keras: predict classifies photos, finetune adapts it to yours, "
        "export writes it for serving, review checks a sort, report draws what it learned.",
        formatter_class=HelpFormatter,
    )
    option = parser.add_argument_group("the recipe").add_argument
    epochs = f"training epochs (default: {EPOCHS}; {AUGMENT_EPOCHS} with --augment)"
    option("--epochs", type=positive_int, help=epochs)
    batch = f"batch size (default: {BATCH_SIZE}; {IMPROVED_BATCH_SIZE} with --arch improved)"
    option("--batch-size", type=positive_int, help=batch)
    held_out = "share of the training set held out (at random) to validate each epoch"
    option("--validation-split", type=share_of_one, default=VALIDATION_SPLIT, help=held_out)
    option("--seed", type=seed_value, default=SEED, help="random seed, so runs repeat")
    improved = "seed: the classic CNN; improved: with BatchNorm and Dropout, batches of "
    improved += f"{IMPROVED_BATCH_SIZE}, a rate from {IMPROVED_LEARNING_RATE} falling on a cosine"
    option("--arch", choices=["seed", "improved"], default="seed", help=improved)
    mirror = "mirror half the training images at random each epoch; predict shows photos both ways"
    option("--augment", action="store_true", help=mirror)
    files = parser.add_argument_group("files")
    from_dir = "read the four Fashion-MNIST IDX files (.gz or not) from DIR, not the download"
    files.add_argument("--data-dir", type=Path, help=from_dir)
    add_run_folder_options(files)
    shown = "test images to show in predictions.png"
    option = files.add_argument
    option("--samples", type=sample_index, nargs="+", default=SAMPLES, metavar="INDEX", help=shown)
    option("--no-show", action="store_true", help="never open a figure window")
    option = parser.add_argument_group("compute").add_argument
    native = "auto: bfloat16 mixed precision where the CPU computes bf16 natively, else float32"
    option("--precision", choices=["auto", "float32", "bfloat16"], default="auto", help=native)
    whole = "train on whole batches, not two halves side by side as on 2 cores (same results)"
    option("--no-split", action="store_true", help=whole)
    # A mistyped command, or one after the options, lands here (the right ones never do).
    parser.add_argument("command", nargs="?", choices=COMMANDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command:
        parser.error(f"{args.command} comes first: fashion_mnist_cnn.py {args.command} ...")
    del args.command  # so metrics.json's config holds the options alone
    args.epochs = args.epochs or (AUGMENT_EPOCHS if args.augment else EPOCHS)
    if args.batch_size is None:
        args.batch_size = IMPROVED_BATCH_SIZE if args.arch == "improved" else BATCH_SIZE
    return args


def run_training(args):
    """Load Fashion-MNIST, build the CNN, fit it with 20% held out, test it, plot, and save."""
    check_out_dir(args.out_dir, args.overwrite, args.resume)  # before the download
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    fit, held_out = split_validation(len(x_train), args.validation_split, args.seed)
    if max(args.samples) >= len(x_test):
        raise UserError(f"--samples: the test set has images 0 to {len(x_test) - 1} only")
    # What a continued run must share with the run it continues (not --epochs: it may grow).
    options = {"data set": fingerprint(x_train, y_train, x_test, y_test), "--arch": args.arch}
    options |= {"--batch-size": args.batch_size, "--validation-split": args.validation_split}
    options |= {"--seed": args.seed, "--augment": args.augment}
    run = open_run(args, "training", options)
    show = use_windows(not args.no_show)

    keras = start_tensorflow_quietly()
    cpu, gpus, cores = cpu_info(), find_gpus(), cpu_cores()
    compute = choose_compute(args, len(fit), len(held_out), gpus, cpu, cores, onednn_setting())
    apply_threads(compute["threads"])
    keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow in one go
    precision, split = compute["precision"], compute["split_batches"]
    steps = math.ceil(len(fit) / args.batch_size) * args.epochs
    model = build_model(precision, args.arch, total_steps=steps, mirrored=args.augment)
    model.summary()
    sizes = f"{len(fit):,} images, validating on {len(held_out):,}, testing on {len(x_test):,}"
    print(f"Training for {args.epochs} epoch{'s' * (args.epochs > 1)} on {sizes}")
    batching = "batches in halves" if split else "whole batches"
    print(f"On {compute['device']}: {precision}, {batching}, oneDNN {compute['onednn']}")

    x_train = keras.ops.convert_to_tensor(x_train)  # one copy, shared by both pipelines

    def epoch_data(epoch):  # drawn from the seed and the epoch alone, so a run can continue
        key = (args.seed, epoch)
        return batches(x_train, y_train, args.batch_size, fit, key, split, args.augment)

    validation = batches(x_train, y_train, EVAL_BATCH_SIZE, held_out, halves=split)
    progress, stop_signal = train_run(model, run, epoch_data, validation, args.epochs, split)
    results = evaluate(model, batches(x_test, y_test, EVAL_BATCH_SIZE), y_test)
    print(f"\nTest accuracy: {results['test_accuracy']:.4f}\nTest loss: {results['test_loss']:.4f}")
    print("\nPer-class test accuracy:")
    for name, accuracy in results["per_class_accuracy"].items():
        print(f"  {name:<12} {accuracy:7.2%}")

    probabilities, samples = results["probabilities"], args.samples
    predictions = plot_predictions(x_test[samples], y_test[samples], probabilities[samples])
    save_figure(predictions, run.out_dir / "predictions.png")
    config = vars(args) | {"precision": precision, "split_batches": split}
    scores = {key: results[key] for key in ("test_accuracy", "test_loss", "per_class_accuracy")}
    saved = "model.keras, metrics.json, history.csv and predictions.png"
    details = {"config": config | {"keras": keras.__version__}, "compute": compute}
    code = finish_run(run, model, progress, stop_signal, scores, details, saved)
    if code == 0:
        report = f"python {Path(__file__).name} report {shlex.quote(str(run.out_dir))}"
        print(f"Training curves, confusion matrix and mistakes: {report}")
    if show and code == 0:
        import matplotlib.pyplot as plt

        plt.show()
    return code


def run_shop_command(argv):  # from the fashion_shop package beside this file
    # The package imports this file by name; run as a script, it is that module already.
    sys.modules.setdefault("fashion_mnist_cnn", sys.modules[__name__])
    try:
        command = importlib.import_module(f"fashion_shop.{argv[0]}")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("fashion_shop"):
            beside = f"which is not beside {Path(__file__).name}: get the whole project"
            raise UserError(f"{argv[0]} needs the fashion_shop package, {beside}") from None
        raise UserError(f"{argv[0]} needs {error.name}: pip install -r requirements.txt") from None
    return command.main(argv[1:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8, printed as ls does
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        if argv[:1] and argv[0] in COMMANDS:
            choose_onednn(cpu_info()[1])
            return run_shop_command(argv)
        args = parse_train_args(argv)
        # Before anything imports TensorFlow (the download does); the first choice stands.
        choose_onednn(cpu_info()[1], bfloat16=args.precision == "bfloat16")
        return run_training(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `| head` stopped reading: quietly, as `cat`; stdout to /dev/null, or the last flush fails.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 141, the shell's code for a process that SIGPIPE ended
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = "the disk is full; free some space and run the same command again: it continues"
        print(f"error: {full}", file=sys.stderr)  # as every file is whole or not there
        return 1


if __name__ == "__main__":
    code = main()
    gc.freeze()  # TensorFlow leaves many objects: the OS frees them faster than gc's last passes
    sys.exit(code)
