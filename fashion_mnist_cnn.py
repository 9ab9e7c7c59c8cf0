"""Train the classic small CNN on Fashion-MNIST, show what it learned, and use it.

    python fashion_mnist_cnn.py                        # train and evaluate; results in runs/<time>/
    python fashion_mnist_cnn.py --data-dir DIR         # the same, offline, from the four IDX files
    python fashion_mnist_cnn.py predict MODEL PATH...  # classify your own photos and folders
    python fashion_mnist_cnn.py finetune MODEL FOLDER  # adapt the model to your labelled photos
    python fashion_mnist_cnn.py finetune --backbone mobilenet_v2 FOLDER  # or an ImageNet network

The run reads top to bottom: arguments -> data -> model -> train -> evaluate -> figures -> save.
TensorFlow is imported only once the arguments and the data have been checked, so that --help
and mistakes are answered at once; that is why some functions import it themselves.
"""

import argparse
import contextlib
import datetime
import errno
import functools
import gc
import gzip
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# Defaults: the classic recipe. Every run saves the options it used in metrics.json.

EPOCHS = 10
AUGMENT_EPOCHS = 15  # mirrored images take longer to pay: at 10 epochs the gain was in the noise
BATCH_SIZE = 32
VALIDATION_SPLIT = 0.2  # share of the training set held out to validate each epoch
SEED = 42
SAMPLES = [0, 1]  # test images shown in predictions.png
EVAL_BATCH_SIZE = 256  # validation and test passes only: same numbers, fewer steps

# `--arch improved` brings its own recipe, chosen on the full data (benchmarks/README.md):
# BatchNorm lets it learn from larger batches at a higher rate, which a CPU runs faster, and the
# rate falls to zero along a cosine, which settles the model within the 10 epochs.
IMPROVED_BATCH_SIZE = 256
IMPROVED_LEARNING_RATE = 0.005

# Fine-tuning on your own photos (`finetune`): chosen on real shop photos, each photo mirrored
# at random as shops show shoes pointing either way (benchmarks/README.md).
FINETUNE_EPOCHS = 120
FINETUNE_LEARNING_RATE = 0.001  # with --backbone too
FINETUNE_HOLDOUT = 0.2  # share of each class's photos kept back to measure on

# `finetune --backbone`: a network pre-trained on ImageNet sees the colour photo, and a new
# 10-class layer learns from what it sees; chosen on real shop photos (benchmarks/README.md).
BACKBONE_EPOCHS = 100  # the new layer alone learns fast: 100 epochs of 400 photos take seconds
BACKBONE_SIZE = 224  # the input the ImageNet weights were made for

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# The four official files: size in bytes and md5 of the .gz as published by Zalando.
OFFICIAL_FILES = {
    "train-images-idx3-ubyte.gz": (26_421_880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": (29_515, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": (4_422_102, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": (5_148, "bb300cfdad3c16e7a12a480ee83cd310"),
}
MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"  # the one keras uses
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801  # magic numbers: unsigned bytes, 3 or 1 dimensions

# TensorFlow's C++ start-up notes are noise to our users; their own setting still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


class UserError(Exception):
    """A problem with what the user gave us: reported as one line, never as a traceback."""


# ----------------------------------------------------------------------------------------------
# Arguments


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block, which buries the actual mistake.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # An option whose default depends on others says so in its own words, not "None".
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(text):
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def share(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to below 1, got {text!r}")
    return value


def seed_value(text):
    # NumPy's seeding, which Keras' set_random_seed uses too, takes 0 to 2**32 - 1 only.
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 to 2**32 - 1, got {text!r}"
        )
    return int(text)


def sample_index(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a test image index (0, 1, ...), got {text!r}")
    return int(text)


def parse_train_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py",
        description="Train the classic small CNN on Fashion-MNIST and show what it learned.",
        epilog="Then, with the model.keras a run writes: fashion_mnist_cnn.py predict MODEL "
        "PATH... classifies your own photos and folders; fashion_mnist_cnn.py finetune MODEL "
        "FOLDER adapts the model to your labelled photos (see predict --help, finetune --help).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"training epochs (default: {EPOCHS}; {AUGMENT_EPOCHS} with --augment)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"batch size (default: {BATCH_SIZE}; {IMPROVED_BATCH_SIZE} with --arch improved)",
    )
    parser.add_argument(
        "--validation-split",
        type=fraction,
        default=VALIDATION_SPLIT,
        help="share of the training set held out (at random) to validate each epoch",
    )
    parser.add_argument("--seed", type=seed_value, default=SEED, help="random seed, so runs repeat")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="read the four Fashion-MNIST IDX files (.gz or not) from DIR instead of "
        "downloading them into the Keras cache",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where the model, metrics and figures go (default: a new runs/<timestamp>/)",
    )
    add_continue_options(parser)
    parser.add_argument(
        "--samples",
        type=sample_index,
        nargs="+",
        default=SAMPLES,
        metavar="INDEX",
        help="test images to show in predictions.png",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 mixed precision where the CPU computes bf16 natively, else float32",
    )
    parser.add_argument(
        "--no-split",
        action="store_true",
        help="train on each batch whole, not as two halves side by side (the default where "
        "there are 2 or more cores; same results, only slower)",
    )
    parser.add_argument(
        "--arch",
        choices=["seed", "improved"],
        default="seed",
        help="seed: the classic model; improved: a small CNN with BatchNorm and Dropout, "
        f"trained in batches of {IMPROVED_BATCH_SIZE} at a rate that starts at "
        f"{IMPROVED_LEARNING_RATE} and falls along a cosine",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="mirror half the training images left-right at random, anew every epoch; "
        f"trains {AUGMENT_EPOCHS} epochs unless --epochs says otherwise; predict shows the "
        "model each photo both ways",
    )
    parser.add_argument("--no-show", action="store_true", help="never open a figure window")
    args = refuse_resume_with_overwrite(parser, parser.parse_args(argv))
    if args.epochs is None:
        args.epochs = AUGMENT_EPOCHS if args.augment else EPOCHS
    if args.batch_size is None:
        args.batch_size = IMPROVED_BATCH_SIZE if args.arch == "improved" else BATCH_SIZE
    return args


def add_continue_options(parser):
    """--overwrite and --resume, alike for training and fine-tuning."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out-dir that holds a run, finished or not (without it, an "
        "unfinished run there is continued)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest unfinished run under runs/, or --out-dir's",
    )


def refuse_resume_with_overwrite(parser, args):
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite starts over: give one of them")
    return args


def parse_predict_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py predict",
        description="Classify your own pictures with a model.keras from a training or "
        "fine-tuning run. Product photos of any size and background, PNG or JPEG: each is "
        "brought to what the model was trained on, as Fashion-MNIST was made from Zalando's.",
    )
    parser.add_argument(
        "model",
        type=Path,
        help="a model.keras written by a run (for real product photos, train it with --arch "
        "improved --augment: about 69%% of them right, against the default run's 60%%)",
    )
    parser.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="path",
        help="PNG or JPEG files, and folders: every PNG and JPEG under them, in sorted order",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--csv",
        type=Path,
        metavar="FILE",
        help="write one row per image to FILE as they are done (replacing FILE if predict "
        "wrote it; any other file is left alone), and print a summary instead of a line per image",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the --csv FILE of a stopped run: images already in it are skipped",
    )
    args = parser.parse_args(argv)
    if args.resume and not args.csv:
        parser.error("--resume continues a --csv FILE: give the FILE")
    return args


def parse_finetune_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py finetune",
        description="Adapt a trained model to your own labelled photos, or with --backbone "
        "train one for them on a network pre-trained on ImageNet (better on real photos). "
        "FOLDER holds one subfolder per class, named after it (case, spaces, punctuation and "
        "plurals ignored: t-shirt_top or Tops, Ankle boots); classes without photos may be left "
        "out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model", type=Path, nargs="?", help="a model.keras written by a run (not with --backbone)"
    )
    parser.add_argument("folder", type=Path, help="the labelled photos, a subfolder per class")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help="instead of MODEL, Keras' ImageNet network of that name sees the colour photos "
        "and a new last layer is trained (weights downloaded once into the Keras cache)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs (default: {FINETUNE_EPOCHS}, or {BACKBONE_EPOCHS} with --backbone)",
    )
    parser.add_argument(
        "--learning-rate", type=fraction, default=FINETUNE_LEARNING_RATE, help="Adam's rate"
    )
    parser.add_argument(
        "--holdout",
        type=share,
        default=FINETUNE_HOLDOUT,
        help="share of each class's photos held out to measure before and after (0: tune on "
        "all of them, measure nothing)",
    )
    parser.add_argument("--seed", type=seed_value, default=SEED, help="random seed")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where the new model and metrics go (default: a new runs/<timestamp>-finetune/)",
    )
    add_continue_options(parser)
    args = refuse_resume_with_overwrite(parser, parser.parse_args(argv))
    if args.backbone and args.model:
        parser.error("--backbone trains a new model on the photos: leave out MODEL")
    if not args.backbone and not args.model:
        parser.error("give the MODEL to adapt and the FOLDER of photos, or --backbone NAME FOLDER")
    if args.epochs is None:
        args.epochs = BACKBONE_EPOCHS if args.backbone else FINETUNE_EPOCHS
    return args


# ----------------------------------------------------------------------------------------------
# Data


def download_data_files():
    """Fetch the four official files into the Keras cache (once), checked against their md5."""
    keras = start_tensorflow_quietly()
    paths = {}
    for name, (_, md5) in OFFICIAL_FILES.items():
        try:
            paths[name] = Path(
                keras.utils.get_file(
                    name, MIRROR + name, file_hash=md5, cache_subdir="datasets/fashion-mnist"
                )
            )
        except Exception as error:  # get_file raises bare Exceptions for network failures
            reason = str(error).splitlines()[0].rpartition(" -- ")[2]
            raise UserError(
                f"could not download {name} ({reason}). Without internet, put the four "
                "Fashion-MNIST files from https://github.com/zalandoresearch/fashion-mnist in a "
                "folder and pass --data-dir FOLDER"
            ) from None
    return paths


def find_data_files(data_dir):
    """The four files in data_dir, each either gzipped (official name) or not (no .gz)."""
    if not data_dir.is_dir():
        problem = "not a folder" if data_dir.exists() else "no such folder"
        raise UserError(f"--data-dir {data_dir}: {problem}")
    paths = {}
    for name in OFFICIAL_FILES:
        candidates = [data_dir / name, data_dir / name.removesuffix(".gz")]
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise UserError(f"--data-dir {data_dir}: {name} is missing (gzipped or not)")
        paths[name] = found[0]
    return paths


def is_official(path, name):
    """True for a file of the official size, which must then also have the official md5."""
    size, md5 = OFFICIAL_FILES[name]
    if path.name != name or path.stat().st_size != size:
        return False
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "md5").hexdigest() != md5:
            raise UserError(
                f"{path}: checksum mismatch: it has the size of the official {name} but not "
                "its md5, so it is damaged; download it again"
            )
    return True


def read_idx(path, magic):
    """Read an IDX file (gzipped or raw) into a uint8 array, checking header against payload."""
    what = "image" if magic == IDX_IMAGES else "label"
    gzipped = False
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or int.from_bytes(header, "big") != magic:
                raise UserError(
                    f"{path}: not an IDX {what} file (magic {header.hex() or 'missing'}, "
                    f"expected {magic:08x})"
                )
            ndim = header[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header")
            dims = tuple(int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
            if magic == IDX_IMAGES and dims[1:] != (28, 28):
                raise UserError(f"{path}: images are {dims[1]}x{dims[2]} pixels, not 28x28")
            # Read in chunks up to what the header promises (plus one byte to notice extra
            # data), so a lying header never makes us allocate memory the file cannot fill.
            expected = math.prod(dims)
            payload = bytearray()
            while len(payload) <= expected:
                chunk = f.read(min(1 << 20, expected + 1 - len(payload)))
                if not chunk:
                    break
                payload += chunk
    except (OSError, EOFError, zlib.error) as error:
        reason = "not a valid gzip file" if gzipped else "could not be read"
        raise UserError(f"{path}: {reason} ({error})") from None
    if len(payload) != expected:
        problem = "is truncated" if len(payload) < expected else "has bytes past the end"
        raise UserError(
            f"{path}: {problem}: its header promises {dims[0]:,} {what}s ({expected:,} bytes)"
        )
    if dims[0] == 0:
        raise UserError(f"{path}: holds no {what}s")
    return np.frombuffer(payload, np.uint8).reshape(dims)


def load_fashion_mnist(data_dir=None):
    """(x_train, y_train), (x_test, y_test) as uint8 arrays, from data_dir or the download."""
    paths = download_data_files() if data_dir is None else find_data_files(data_dir)
    # Downloads were checked by get_file; of other files, each official-size one is checked
    # (a list, not a generator, so that one unofficial file does not skip the others).
    official = data_dir is None or all([is_official(p, name) for name, p in paths.items()])
    splits = []
    for split in ("train", "t10k"):
        images_path = paths[f"{split}-images-idx3-ubyte.gz"]
        labels_path = paths[f"{split}-labels-idx1-ubyte.gz"]
        images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
        if len(images) != len(labels):
            raise UserError(
                f"{images_path} holds {len(images):,} images but {labels_path} "
                f"{len(labels):,} labels"
            )
        if labels.max() > 9:
            raise UserError(f"{labels_path}: label {labels.max()} found, labels must be 0-9")
        splits.append((images, labels))
    if not official:
        print(
            f"note: the data in {data_dir} is not the official Fashion-MNIST files, so its "
            "accuracy is not comparable with published figures"
        )
    return splits


def split_validation(n_images, validation_split, seed):
    """Indices of the images to train on and of those held out, the same for the same seed.

    A random hold-out rather than Keras' "last 20%", which would hold out whole classes of a
    file sorted by class (the shared sample is); on the shuffled official files the two are alike.
    """
    order = np.random.default_rng(seed).permutation(n_images)
    split_at = math.floor(n_images * (1 - validation_split))
    if split_at == 0 or split_at == n_images:
        raise UserError(
            f"--validation-split {validation_split} leaves no training or no validation "
            f"images out of {n_images}"
        )
    return order[:split_at], order[split_at:]


def batches(images, labels, batch_size, indices=None, epoch_key=None, halves=False, augment=False):
    """A tf.data pipeline of float32 [0, 1] batches of the images at `indices` (default: all).

    The data set stays uint8 (pass it as a tensor to share one copy between pipelines): each
    batch is gathered from it and scaled on its own, so no float copy of the data set is made,
    least of all the float64 one that `x / 255.0` makes (8x the memory). With epoch_key, a
    (seed, epoch) pair, the images come in an order drawn from that key alone, and with augment
    are mirrored at random (mirror_at_random) by draws from it alone: any epoch's batches can be
    made again, which continuing a stopped run needs (a tf.data shuffle draws from the state of
    its iterators). With halves, each batch comes as its two halves, for in_halves().
    """
    import tensorflow as tf

    images, labels = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
    indices = np.arange(len(labels)) if indices is None else indices
    if epoch_key is not None:
        draws = np.random.default_rng(epoch_key)
        indices = draws.permutation(indices)
    order = tf.data.Dataset.from_tensor_slices(indices).batch(batch_size)
    if augment:
        if epoch_key is None:
            raise ValueError("augment draws from the epoch_key: pass one")
        keys = draws.integers(2**31, size=(math.ceil(len(indices) / batch_size), 2))
        order = tf.data.Dataset.zip(order, tf.data.Dataset.from_tensor_slices(keys))

    def gather(batch, key=None):
        x = tf.cast(tf.gather(images, batch)[..., tf.newaxis], tf.float32) / 255.0
        if augment:
            x = mirror_at_random(x, key)
        if halves:
            middle = tf.shape(batch)[0] // 2
            x = (x[:middle], x[middle:])
        return x, tf.gather(labels, batch)

    # A fixed prefetch, with tf.data's autotuning off: with it, each pass over the data ended
    # only at the autotuner's next round (its period doubles from 10 ms), so an epoch of 6 s
    # took 10.2 s. A pipeline this cheap has nothing to tune.
    options = tf.data.Options()
    options.autotune.enabled = False
    return order.map(gather).prefetch(2).with_options(options)


def mirror_at_random(images, key):
    """Each image mirrored left-right with probability 1/2: clothes look as right either way.

    The augmentation that measured best on the full data (benchmarks/README.md): shifts made
    the classic model worse, as Fashion-MNIST's items are centred and scaled alike. Stateless
    draws from the batch's key, made before a batch is cut in halves, so the same seed mirrors
    the same images whether it trains whole or in halves.
    """
    import tensorflow as tf

    mirror = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed=key) < 0.5
    return tf.where(mirror, tf.reverse(images, axis=[2]), images)


def scale_pixels(images):
    """uint8 -> float32 in [0, 1], what the models take: (N, 28, 28) gets its channel axis,
    colour photos (N, 224, 224, 3) have theirs."""
    images = images[..., np.newaxis] if images.ndim == 3 else images
    return images.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Compute: where the model runs and how. Every such choice is made here, from the devices and the
# CPU's features; the run's header line shows them and metrics.json records them with reasons.

# ONEDNN_MAX_CPU_ISA values that keep oneDNN from AVX-512, or from its bf16 instructions.
BELOW_AVX512 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
BELOW_BF16 = BELOW_AVX512 | {"AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_info(text=None, machine=None):
    """The CPU's model name and feature flags, less those that ONEDNN_MAX_CPU_ISA forbids
    oneDNN (so ONEDNN_MAX_CPU_ISA=AVX2 makes an AVX-512 CPU compute, and choose, as AVX2).

    text is /proc/cpuinfo's (read when None), machine platform.machine()'s: both can be faked.
    """
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""  # macOS, Windows
    machine = platform.machine() if machine is None else machine
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", fields.get("Features", "")).split())  # x86's, Arm's
    if machine.lower() in ("arm64", "aarch64"):
        flags.add("asimd")  # NEON, which every 64-bit Arm CPU has; macOS has no cpuinfo to say so
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in BELOW_AVX512:
        flags = {flag for flag in flags if not flag.startswith(("avx512", "amx"))}
    if cap in BELOW_BF16:
        flags -= {"avx512_bf16", "amx_bf16"}
    return fields.get("model name", machine or "unknown CPU"), flags


def cpu_class(flags):
    """The class of CPU that decides which kernels run fastest."""
    if "asimd" in flags:
        return "Arm with bf16" if "bf16" in flags else "Arm"
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 with bf16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "older than AVX2" if flags else "features unknown"


def cpu_cores():
    """The cores this process may use (os.cpu_count() where affinity is unknown, or 1)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_onednn(flags, bfloat16=False):
    """Turn on TensorFlow's oneDNN kernels wherever the CPU has AVX2: TensorFlow does so by
    default only with AVX-512-class features, leaving AVX2 CPUs on slower Eigen convolutions.
    But not for bf16 asked of a CPU below AVX-512: oneDNN has no bf16 convolutions there, and
    TensorFlow's own have. Must run before TensorFlow is imported; the user's
    TF_ENABLE_ONEDNN_OPTS still wins."""
    if "avx2" in flags:
        below_avx512 = bfloat16 and "avx512f" not in flags
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0" if below_avx512 else "1")


def onednn_setting():
    return {"1": "on", "0": "off"}.get(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "TF's default")


def find_gpus():
    """The GPUs TensorFlow will compute on: name and compute capability of each."""
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(
            {
                "name": details.get("device_name", gpu.name),
                "compute_capability": tuple(details.get("compute_capability", (0, 0))),
            }
        )
    return gpus


def native_bf16(gpus, flags):
    """Does this machine compute bf16 natively: its first GPU (from compute capability 8.0) or,
    without one, its CPU (AVX512_BF16 or AMX)?"""
    if gpus:
        return gpus[0]["compute_capability"] >= (8, 0)
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def choose_compute(args, n_fit, n_held_out, gpus, cpu, cores, onednn):
    """Where to train and how: device, precision, batches whole or in halves, threads.

    gpus as find_gpus() returns them, cpu as cpu_info(). Returns the choices and, under "why",
    the reason for each: the header line and metrics.json show both.
    """
    model_name, flags = cpu
    native = native_bf16(gpus, flags)
    if gpus:  # without a distribution strategy, TensorFlow computes on the first GPU
        capability = gpus[0]["compute_capability"]
        device = f"GPU ({gpus[0]['name']})"
        why_precision = f"compute capability {capability[0]}.{capability[1]}: bf16 is " + (
            "native" if native else "native only from 8.0, so float32"
        )
        split, why_split = False, "on a GPU a whole batch is one kernel per layer already"
        threads, why_threads = None, "TensorFlow's own on a GPU"
    else:
        device = f"CPU ({model_name}, {cpu_class(flags)}, {cores} cores)"
        why_precision = "the CPU " + (
            "computes bf16 natively" if native else "has no native bf16, so float32"
        )
        split, why_split = split_rule(args, n_fit, n_held_out, cores)
        threads = {"intra_op": cores // 2, "inter_op": 2} if split else None
        why_threads = "half the cores for each half" if split else "TensorFlow's own"
    precision = args.precision
    if precision == "auto":
        precision = "bfloat16" if native else "float32"
    else:
        why_precision = f"--precision {precision}"
    return {
        "device": device,
        "precision": precision,
        "split_batches": split,
        "threads": threads,
        "onednn": onednn,
        "why": {"precision": why_precision, "split_batches": why_split, "threads": why_threads},
    }


def split_rule(args, n_fit, n_held_out, cores):
    """Can each batch run as two halves side by side on the CPU, with the same results?

    Only where it was measured to pay: 2 cores (on 1 the halves could not run side by side;
    more are unmeasured, so TensorFlow's own threading). And only where nothing but rounding
    changes: the classic model (the improved one's BatchNorm normalises by its batch's
    statistics), and no batch of one image, as oneDNN's convolutions refuse the empty half.
    """
    rules = [
        (args.no_split, "--no-split"),
        (cores != 2, f"{cores} core(s), and halves are measured to pay on 2"),
        (args.arch != "seed", "--arch improved (BatchNorm needs the whole batch)"),
        (args.batch_size < 2, "batches of one image"),
        (n_fit % args.batch_size == 1 or n_held_out % EVAL_BATCH_SIZE == 1, "a batch of one image"),
    ]
    reasons = [reason for applies, reason in rules if applies]
    if reasons:
        return False, "whole batches: " + reasons[0]
    return True, "2 cores, the classic model: two halves side by side, the same results"


def apply_threads(threads):
    """Set TensorFlow's thread pools before its first operation; TF_NUM_INTRAOP_THREADS and
    TF_NUM_INTEROP_THREADS set by the user still win."""
    import tensorflow as tf

    if threads and "TF_NUM_INTRAOP_THREADS" not in os.environ:
        tf.config.threading.set_intra_op_parallelism_threads(threads["intra_op"])
    if threads and "TF_NUM_INTEROP_THREADS" not in os.environ:
        tf.config.threading.set_inter_op_parallelism_threads(threads["inter_op"])


# ----------------------------------------------------------------------------------------------
# Model


def seed_layers(layers):
    """The design's model, between the input and the 10-class output: 93,322 parameters."""
    return [
        layers.Conv2D(32, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
    ]


def improved_layers(layers):
    """A small CPU-friendly CNN with BatchNorm and Dropout (422,538 parameters), of the kind
    the Fashion-MNIST benchmark lists at about 93% ("2 Conv+pooling+BN": 0.934).

    Each convolution keeps its bias and ReLU, which oneDNN runs as one kernel, and BatchNorm
    follows the pooling, on a quarter of the values. Dropout is light (0.1, 0.3): heavier
    dropout (0.25, 0.5) scored lower in 10 epochs. BatchNorm's running statistics move with
    momentum 0.9, not Keras' 0.99, so that they settle within a short run too.
    """
    return [
        layers.Conv2D(32, (3, 3), padding="same", activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.BatchNormalization(momentum=0.9),
        layers.Conv2D(64, (3, 3), padding="same", activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.BatchNormalization(momentum=0.9),
        layers.Dropout(0.1),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.BatchNormalization(momentum=0.9),
        layers.Dropout(0.3),
    ]


ARCHITECTURES = {"seed": seed_layers, "improved": improved_layers}


def build_model(
    precision="float32", arch="seed", steps_per_execution=32, total_steps=None, mirrored=False
):
    """The CNN, compiled with Adam: by default exactly the design's (93,322 parameters).

    The improved model's rate falls from IMPROVED_LEARNING_RATE to zero over total_steps.
    steps_per_execution runs that many batches per call into TensorFlow, which cuts Python
    overhead per step; it changes nothing else about training. A model to be trained on mirror
    images too (--augment) says so in its name, so that predict shows it each photo both ways.
    """
    import keras
    from keras import layers

    previous_policy = keras.config.dtype_policy()
    if precision == "bfloat16":
        # Weights and Adam stay float32; only the arithmetic runs in bf16.
        keras.config.set_dtype_policy("mixed_bfloat16")
    name = "fashion_mnist_cnn" if arch == "seed" else f"fashion_mnist_cnn_{arch}"
    try:
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                *ARCHITECTURES[arch](layers),
                # Softmax and loss in float32 whatever the policy, for stable probabilities.
                layers.Dense(10, activation="softmax", dtype="float32"),
            ],
            name=name + MIRRORED * mirrored,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    learning_rate = 0.001  # Adam's default: the recipe's
    if arch == "improved":
        learning_rate = keras.optimizers.schedules.CosineDecay(IMPROVED_LEARNING_RATE, total_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def in_halves(model):
    """The same model and weights, fed each batch as two halves that run side by side.

    At batch 32 this network's operations are too short to share well among cores, and its
    layers run one after another; two independent halves keep two cores busy instead. Their
    outputs are joined before the loss, so loss, gradients, metrics and Adam's steps are the
    whole batch's, up to rounding. The model shares the optimizer, so it is saved with its state.
    """
    import keras

    first, second = keras.Input((28, 28, 1)), keras.Input((28, 28, 1))
    both = keras.layers.Concatenate(axis=0)([model(first), model(second)])
    trainer = keras.Model([first, second], both, name=f"{model.name}_in_halves")
    trainer.compile(
        optimizer=model.optimizer,
        loss=model.loss,
        metrics=["accuracy"],
        steps_per_execution=model.steps_per_execution,
    )
    return trainer


# ----------------------------------------------------------------------------------------------
# Train and evaluate


# Signals that stop training gracefully: Ctrl-C, and the SIGTERM of schedulers, `timeout` and
# container stops.
STOP_SIGNALS = {signal.SIGINT: "Interrupted", signal.SIGTERM: "Terminated"}


@contextlib.contextmanager
def stop_gracefully(model=None, then="finishing this step, then saving", file=None):
    """First Ctrl-C or SIGTERM: finish the current step, then stop training (what was learned
    is still evaluated and saved), or whatever `then` says the caller does when it sees
    state["signal"] set. A second: quit at once; files already written stay whole, being
    written atomically. state["signal"] says which signal stopped it, if any."""
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


def train(model, epoch_data, validation_data, epochs, out_dir, progress=None, back_up=None):
    """Fit the model one epoch at a time, each on epoch_data(epoch), from the epochs that
    `progress` (a backup's) has completed, calling back_up(progress) after each. Returns the
    progress (history, epochs completed, seconds) and the signal that cut it short, or None."""
    import keras

    progress = progress or new_progress()
    # A fit() per epoch, so that each epoch's batches are made for it (one data set of every
    # epoch with steps_per_epoch would not do: steps_per_execution would run whole executions of
    # 32 batches past each epoch's end). This callback ends each fit() after its epoch, while
    # the progress bar still counts to `epochs`.
    one_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", True)
    )
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
                # A progress bar for people, one line per epoch for logs and pipes.
                verbose=1 if sys.stdout.isatty() else 2,
                callbacks=[
                    one_epoch,
                    keras.callbacks.CSVLogger(out_dir / "history.csv", append=True),
                ],
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


def new_progress():
    return {
        "epochs_completed": 0,
        "history": {},
        "train_seconds": 0.0,
        "backup_seconds": 0.0,
        "continued_from_epoch": None,
    }


def evaluate(model, test_data, y_test):
    """Test loss and accuracy, the predicted probabilities, and accuracy per class.

    One pass over the test set: loss and accuracy are computed from the predictions, as Keras
    computes them (the loss agrees with model.evaluate to about 1e-7). Batch by batch, because
    model.predict would first trace a copy of the model for each of steps_per_execution's
    batches, which takes longer (about 2 s) than predicting the whole test set.
    """
    import keras

    probabilities = np.concatenate([model.predict_on_batch(x) for x, _ in test_data])
    predicted = probabilities.argmax(axis=1)
    losses = keras.losses.sparse_categorical_crossentropy(y_test, probabilities)
    confusion = confusion_matrix(y_test, predicted)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "test_loss": float(np.mean(losses)),
        "test_accuracy": float(np.mean(predicted == y_test)),
        "per_class_accuracy": dict(zip(CLASS_NAMES, per_class.round(4).tolist())),
        "probabilities": probabilities,
        "confusion": confusion,
    }


def confusion_matrix(true, predicted):
    """Counts of (true class, predicted class) pairs, true classes as rows."""
    return np.bincount(true.astype(int) * 10 + predicted, minlength=100).reshape(10, 10)


def print_per_class(per_class_accuracy):
    print("\nPer-class test accuracy:")
    for name, accuracy in per_class_accuracy.items():
        print(f"  {name:<12} {accuracy:7.2%}")


# ----------------------------------------------------------------------------------------------
# Figures


def display_available():
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def plot_predictions(images, labels, probabilities):
    """Each sample image with its predicted class and confidence, beside all ten probabilities."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(
        len(images),
        2,
        figsize=(10, 3 * len(images) + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1.6]},
    )
    for row, (image, label, probs) in zip(axes, zip(images, labels, probabilities)):
        predicted = int(np.argmax(probs))
        colour = "tab:green" if predicted == label else "tab:red"
        row[0].imshow(image, cmap="binary")
        row[0].set_xticks([])
        row[0].set_yticks([])
        row[0].set_title(
            f"Predicted: {CLASS_NAMES[predicted]} ({probs[predicted]:.1%})\n"
            f"True: {CLASS_NAMES[label]}",
            color=colour,
        )
        bars = row[1].barh(range(10), probs, color="lightgrey")
        bars[predicted].set_color(colour)
        row[1].set_yticks(range(10), CLASS_NAMES)
        row[1].invert_yaxis()
        row[1].set_xlim(0, 1)
        row[1].xaxis.set_major_formatter(PercentFormatter(1.0))
    fig.suptitle("Predictions on test images (green: right, red: wrong)")
    fig.tight_layout()
    return fig


def most_confident_mistakes(labels, probabilities):
    """Indices of the wrongly predicted images, the most confident first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]


def plot_mistakes(images, labels, probabilities, count=16):
    """The test images the model gets most confidently wrong, with true and predicted class:
    where to look for confusable classes (shirt or T-shirt?) and for doubtful labels."""
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(axis=1)
    worst = most_confident_mistakes(labels, probabilities)[:count]
    columns = 4
    rows = max(1, math.ceil(len(worst) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(10, 2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, worst):
        ax.imshow(images[index], cmap="binary")
        ax.set_title(
            f"#{index}: {CLASS_NAMES[predicted[index]]} "
            f"{probabilities[index, predicted[index]]:.0%}\ntrue: {CLASS_NAMES[labels[index]]}",
            fontsize=9,
            color="tab:red",
        )
    title = "Most confident mistakes on the test set: predicted (confidence), true class"
    fig.suptitle(title if len(worst) else "No mistakes on the test set")
    fig.tight_layout()
    return fig


def plot_training_curves(history):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ["accuracy", "loss"]):
        ax.plot(epochs, history[metric], "o-", label="training")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric.capitalize())
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(confusion):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion, cmap="Blues")
    threshold = confusion.max() / 2
    for (true, predicted), count in np.ndenumerate(confusion):
        colour = "white" if count > threshold else "black"
        ax.text(predicted, true, count, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix on the test set ({confusion.sum():,} images)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Save


def prepare_out_dir(out_dir, overwrite, suffix="", resume=False, command="training"):
    """Create the run folder, or find the one to continue (read_backup checks it): a default
    one is new per run, so no run overwrites another; --resume takes the newest unfinished."""
    unfinished = out_dir is not None and (out_dir / "backup" / "state.json").exists()
    if out_dir is None and resume:
        out_dir = newest_unfinished_run(command)
    elif resume and not unfinished:
        raise UserError(f"--resume: {out_dir} holds no unfinished run to continue")
    elif out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + suffix
        out_dir, n = Path("runs") / stamp, 1
        while out_dir.exists():
            n += 1
            out_dir = Path("runs") / f"{stamp}-{n}"
    elif (out_dir / "metrics.json").exists() and not (overwrite or unfinished):
        raise UserError(f"--out-dir {out_dir} holds a finished run; pass --overwrite to replace it")
    elif (out_dir / "model.keras").exists() and not (overwrite or unfinished):
        # A model put there by hand, perhaps the very one being fine-tuned.
        raise UserError(
            f"--out-dir {out_dir} holds a model.keras that this run would replace; give another "
            "--out-dir, or --overwrite to replace it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir}: a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({error.strerror})") from None
    return out_dir


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path`, renamed onto it once written, so that a crash or a
    second Ctrl-C never leaves half a file. It keeps the suffix, which Keras needs."""
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_json(data, path):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")  # str: paths


def save_figures(out_dir, history, results, x_test, y_test, samples):
    figures = {
        "predictions.png": plot_predictions(
            x_test[samples], y_test[samples], results["probabilities"][samples]
        ),
        "training_curves.png": plot_training_curves(history),
        "confusion_matrix.png": plot_confusion_matrix(results["confusion"]),
        "mistakes.png": plot_mistakes(x_test, y_test, results["probabilities"]),
    }
    for name, fig in figures.items():
        with atomic_path(out_dir / name) as temporary:
            fig.savefig(temporary, dpi=100)


# ----------------------------------------------------------------------------------------------
# Continue: a run stopped by anything (kill -9, the OOM killer, a preempted machine) goes on from
# its last completed epoch when started again. backup/ in the run folder holds, from the start
# and after each epoch, the weights with Adam's state, the random state and the history so far;
# state.json names the weights file and is replaced last, so a kill at any instant leaves the
# previous backup or the new one. The next epoch's batches depend on the seed and the epoch only.

BACKUP_FORMAT = 1  # what backup/ holds; a backup in another format is refused


def fingerprint(*arrays):
    """A short hash of the arrays' contents: a run continues only on the data it started on."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def file_sha256(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def state_checksum(state):
    """The checksum state.json carries of the rest of itself: a changed one is refused."""
    rest = {key: value for key, value in state.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


def random_state(model):
    """The model's variables beyond its weights: the Dropout layers' seed state, which decides
    the next dropout masks and which save_weights leaves out."""
    weights = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weights]


def save_backup(model, out_dir, command, options, progress):
    folder = out_dir / "backup"
    folder.mkdir(exist_ok=True)
    weights = folder / f"epoch-{progress['epochs_completed']}.weights.h5"
    # h5py cannot close a file the disk had no room for, and HDF5 then crashes the program as
    # it exits: room for the file (the weights and the optimizer's state) is made sure of first.
    variables = model.weights + list(getattr(model.optimizer, "variables", []))
    size = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    if shutil.disk_usage(folder).free < 2 * size + 2**20:
        raise OSError(errno.ENOSPC, "No space left on device", str(weights))
    model.save_weights(weights)  # with the optimizer's state
    state = {
        "format": BACKUP_FORMAT,
        "command": command,
        "options": options,
        "progress": progress,
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "random_state": [variable.numpy().tolist() for variable in random_state(model)],
    }
    save_json(state | {"checksum": state_checksum(state)}, folder / "state.json")
    for old in folder.glob("*.weights.h5"):
        if old != weights:
            old.unlink()


def newest_unfinished_run(command):
    """What --resume continues: the run folder under runs/ backed up last by `command`."""
    found = []
    for path in Path("runs").glob("*/backup/state.json"):
        try:
            ours = json.loads(path.read_text()).get("command", command) == command
        except (OSError, ValueError, AttributeError):
            ours = True  # damaged: read_backup says so
        if ours:
            found.append(path)
    if not found:
        raise UserError(f"--resume: no unfinished {command} run under runs/ to continue")
    return max(found, key=lambda path: path.stat().st_mtime).parent.parent


def read_backup(out_dir, command, options, epochs):
    """The backup of the run to continue in out_dir (None if it holds none), checked before
    anything is changed: one that is damaged, another version's, or made with other options
    than `options` is refused with one line."""
    path = out_dir / "backup" / "state.json"
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        weights = out_dir / "backup" / str(state.get("weights"))
        if state.get("format") != BACKUP_FORMAT:
            problem = "it was written by another version of this program"
        elif state.get("checksum") != state_checksum(state):
            problem = "backup/state.json has been changed or damaged"
        elif not weights.is_file() or file_sha256(weights) != state["weights_sha256"]:
            problem = f"{weights.name} is missing or damaged"
        else:
            problem = None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        problem = "backup/state.json cannot be read"
    if problem:
        raise UserError(f"{out_dir} cannot be continued: {problem}; to start over, add --overwrite")
    if state["command"] != command:
        raise UserError(
            f"{out_dir} holds an unfinished {state['command']} run, not a {command} one"
        )
    for name, value in options.items():
        started = state["options"].get(name)
        if started == value:
            continue
        if isinstance(value, bool):
            was = f"{'with' if started else 'without'} {name}"
        elif name.startswith("--"):
            was = f"with {name} {started}, not {value}"
        else:
            was = f"from another {name}"
        raise UserError(
            f"{out_dir} was started {was}: continue it with the same options, or start over "
            "with --overwrite"
        )
    done = state["progress"]["epochs_completed"]
    if epochs < done:
        raise UserError(f"--epochs {epochs}: {out_dir} has completed {done} epochs already")
    return state


def continuing_line(out_dir, backup, epochs):
    done = backup["progress"]["epochs_completed"]
    if done == epochs:
        return f"Continuing {out_dir}: its {epochs} epochs are done; evaluating and saving"
    return f"Continuing {out_dir} from epoch {done + 1} of {epochs}"


def restore_or_start(model, out_dir, command, options, backup):
    """The progress to train from: the backup's, with its weights, Adam's state and random
    state put back into the model; or, with no backup, none, and a first backup made."""
    if not model.optimizer.built:  # else Keras would skip the backup's optimizer state
        model.optimizer.build(model.trainable_variables)
    history = out_dir / "history.csv"
    if backup is None:
        remove_backup(out_dir)
        history.unlink(missing_ok=True)
        progress = new_progress()
        save_backup(model, out_dir, command, options, progress)
        return progress
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Keras only warns when it skips a part of the file
            model.load_weights(out_dir / "backup" / backup["weights"])
        for variable, value in zip(random_state(model), backup["random_state"], strict=True):
            variable.assign(value)
    except (ValueError, OSError, KeyError, Warning):  # Keras' reasons run to many lines
        raise UserError(
            f"{out_dir} cannot be continued: its backup does not fit this model; to start over, "
            "add --overwrite"
        ) from None
    done = backup["progress"]["epochs_completed"]
    if history.exists():  # back to its rows of the completed epochs; CSVLogger appends to it
        rows = history.read_text().splitlines(keepends=True)
        with atomic_path(history) as temporary:
            temporary.write_text("".join(rows[: 1 + done]))
    return backup["progress"] | {"continued_from_epoch": done}


def remove_backup(out_dir):
    # state.json first: without it there is no backup, whatever a kill leaves of the rest.
    (out_dir / "backup" / "state.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "backup", ignore_errors=True)


def finish_backup(out_dir, stop_signal, progress):
    """A finished run needs its backup no more; a stopped one keeps it, to be continued."""
    if stop_signal is None:
        remove_backup(out_dir)
    else:
        print(
            f"Run the same command again to continue from epoch {progress['epochs_completed'] + 1}."
        )


# ----------------------------------------------------------------------------------------------
# Predict: classify your own images


def load_trained_model(path):
    """A model.keras from a run, refused unless it maps 28x28x1 images (a training run's) or
    224x224 colour photos (finetune --backbone's) to 10 classes."""
    import keras

    if path.is_dir():
        inside = path / "model.keras"
        hint = f"; the run's model is {inside}" if inside.is_file() else ""
        raise UserError(f"{path}: a folder, not a model file{hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not is_model_file(path):  # Keras would say "File not found" of a photo or a cut file
        swapped = path.suffix.lower() in IMAGE_SUFFIXES
        hint = "; MODEL comes first, then the photos" if swapped else ""
        raise UserError(f"{path}: not a Keras model file, or a damaged one{hint}")
    try:
        # safe_mode (the default, stated here on purpose) never runs code stored in the file.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        first = (str(error).split(". ")[0].strip().splitlines() or [""])[0]  # its first sentence
        reason = first if 0 < len(first) <= 200 else type(error).__name__
        raise UserError(f"{path}: not a usable Keras model file ({reason})") from None
    input_shape = tuple(getattr(model, "input_shape", ()) or ())
    output_shape = tuple(getattr(model, "output_shape", ()) or ())
    if input_shape[1:] not in PREPARATIONS or output_shape[1:] != (10,):
        raise UserError(
            f"{path}: this model maps {input_shape[1:]} to {output_shape[1:]}, not a 28x28x1 "
            f"image or a {BACKBONE_SIZE}x{BACKBONE_SIZE} colour photo to 10 Fashion-MNIST classes"
        )
    if not native_bf16(find_gpus(), cpu_info()[1]):
        in_float32(model)
    return model


def is_model_file(path):
    """Is it whole enough to be a model file: a zip archive (.keras) or HDF5 (legacy .h5)? A
    file that cannot be read at all is one clear error."""
    try:
        with open(path, "rb") as file:
            hdf5 = file.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    return hdf5 or zipfile.is_zipfile(path)


def in_float32(model):
    """Make a model trained in bf16 (where that is native) compute in float32, as it must on
    a machine without native bf16: oneDNN has no bf16 convolutions for AVX2 CPUs (the model
    would fail there), and elsewhere they would be emulated. Mixed precision kept the weights
    float32, so only the rounding of what is computed changes."""
    layers = [model]
    while layers:
        layer = layers.pop()
        layers += getattr(layer, "layers", [])  # models within the model
        if layer.dtype_policy.compute_dtype == "bfloat16":
            layer.dtype_policy = "float32"


def declared_preparation(path):
    """How photos are prepared for a model.keras file, read from its config without TensorFlow
    (the input it takes, and its name), so that they are prepared while TensorFlow loads; None
    if it cannot be read (then load_trained_model says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))["config"]
        # Sequential and functional models alike list their InputLayer, with its shape.
        layers = (layer for layer in config["layers"] if layer["class_name"] == "InputLayer")
        inputs = (layer["config"] for layer in layers)
        return preparation(tuple(next(inputs)["batch_shape"][1:]), config["name"])
    except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError, StopIteration):
        return None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def open_picture(path, fit=None):
    """A PNG or JPEG as an upright RGB image (EXIF rotation honoured), or one clear error.

    With fit, the picture is first shrunk to fit in fit x fit pixels (Pillow's thumbnail: a
    JPEG is decoded at 1/2, 1/4 or 1/8 of its size, which its decoder does almost for free),
    and only that small image is turned and converted: a catalogue photo of 2,400 px is never
    copied at full size."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.is_dir():
        raise UserError(f"{path}: a folder with no PNG or JPEG images in it")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat any bomb as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in ("PNG", "JPEG"):
                    raise UserError(f"{path}: a {image.format} image, expected PNG or JPEG")
                picture = image
                if image.mode in ("I", "I;16", "I;16B"):  # 16-bit grey, which Pillow clips
                    picture = image.convert("I").point(lambda v: v / 257).convert("L")
                if fit:
                    if image.mode in ("1", "P"):  # shrinking these would pick, not average
                        picture = image.convert("RGBA" if image.has_transparency_data else "RGB")
                    # reducing_gap 1: decoded at the smallest scale of at least fit px (2 was
                    # slower and no better on the photo-like shots)
                    picture.thumbnail((fit, fit), Image.Resampling.BOX, reducing_gap=1.0)
                upright = ImageOps.exif_transpose(picture)
                if upright.has_transparency_data:  # a cut-out: put it on white, not black
                    white = Image.new("RGBA", upright.size, "white")
                    return Image.alpha_composite(white, upright.convert("RGBA")).convert("RGB")
                return upright.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: too many pixels to be a photo (Pillow's safety limit)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: damaged image ({error})") from None


ITEM_LEVEL = 13  # an item pixel stands out by 5% of full intensity, as Fashion-MNIST's were cut


def prepare_image(path, fashion_mnist_view=True):
    """A product photo -> uint8 28x28 as Fashion-MNIST's images were made from Zalando's: the
    item trimmed from its background, its longest edge resized to 28, sharpened, centred on
    28x28, negated to light on dark, grey. What photos add: the background is whatever colour
    the border has (light, dark or coloured), each pixel's value is its distance from that
    colour less the background's own noise, and the item's contrast is stretched to 0-255.
    With fashion_mnist_view, the item is first shown as Fashion-MNIST shows its items: a garment
    worn by a model taken off the model, a shoe or a bag shot at an angle turned level."""
    from PIL import Image, ImageFilter, ImageOps

    picture = open_picture(path, fit=224)  # BOX shrinking averages away sensor noise, too
    item = standing_out(path, np.asarray(picture, np.float32))
    box = median_box(item > ITEM_LEVEL)  # trimmed as Fashion-MNIST's items were
    face = find_face(picture, box) if box and fashion_mnist_view else None
    if face is not None:  # worn by a model: Fashion-MNIST shows the garment alone
        item = garment_only(item, picture, face)
        box = median_box(item > ITEM_LEVEL)
    elif box and fashion_mnist_view and box[2] - box[0] > box[3] - box[1]:
        # Wider than tall: a shoe or a bag (under 2% of Fashion-MNIST's garments are).
        item = levelled(item, box)
        box = median_box(item > ITEM_LEVEL)
    grey = Image.fromarray(item)
    if box:
        grey = grey.crop(box)
    if face is not None and 4 * grey.width > 3 * grey.height:
        # Worn, with the arms held down, a top is as wide as the model's shoulders and arms;
        # Fashion-MNIST's lie flat, 3/4 as wide as tall (their median). Narrowed to that, a
        # worn jacket stops looking like a bag (benchmarks/README.md).
        grey = grey.resize((3 * grey.height // 4, grey.height), Image.Resampling.BOX)
    # Longest edge to 28 (ImageOps.contain's rounding), and never under a pixel: a belt or a
    # strap may be 60 times longer than it is thick.
    longest = max(grey.size)
    size = tuple(max(1, round(side / longest * 28)) for side in grey.size)
    grey = grey.resize(size, Image.Resampling.LANCZOS)
    grey = grey.filter(ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0))
    top = max(float(np.percentile(np.asarray(grey), 99.5)), 1.0)
    grey = grey.point(lambda v: min(255, round(v * 255 / top)))
    if grey.width > grey.height:  # a shoe or a bag, as above
        grey = brightened(grey)
    return taller_end_right(np.asarray(ImageOps.pad(grey, (28, 28), color=0)))


SHOE_MEDIAN = 160  # the least median brightness of a prepared shoe or bag


def brightened(grey):
    """A prepared shoe or bag whose median (of pixels above 40) is below SHOE_MEDIAN, brightened
    by the gamma that puts it there. A white sneaker on white is a dim body between a bright sole
    and logos, which the model took for a sandal's straps; Fashion-MNIST's shoes and bags are lit
    (the median of their medians: 173). On clothes it cost the photo-like shots: not done there
    (benchmarks/README.md)."""
    pixels = np.asarray(grey)
    item = pixels[pixels > 40]
    median = np.median(item) if item.size else SHOE_MEDIAN
    if median >= SHOE_MEDIAN:
        return grey
    gamma = np.log(SHOE_MEDIAN / 255) / np.log(median / 255)
    return grey.point(lambda v: round(255 * (v / 255) ** gamma))


def levelled(item, box):
    """An item map turned so that the item stands level, as Fashion-MNIST's side views of shoes
    and bags do: the line through the lowest item pixel of each column (the middle 80% of them)
    made horizontal, when it slopes 3 to 30 degrees. Shops shoot shoes from above at an angle,
    their soles rising to one side (benchmarks/README.md)."""
    left, top, right, bottom = box
    mask = item[top:bottom, left:right] > ITEM_LEVEL
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size < 10:
        return item
    lowest = mask.shape[0] - 1 - np.argmax(mask[::-1, columns], axis=0)
    middle = slice(columns.size // 10, columns.size * 9 // 10)
    slope = np.polyfit(columns[middle], lowest[middle], 1)[0]
    angle = math.degrees(math.atan(slope))
    if not 3 <= abs(angle) <= 30:
        return item
    from PIL import Image

    return np.asarray(Image.fromarray(item).rotate(angle, Image.Resampling.BILINEAR, expand=True))


def taller_end_right(image):
    """The prepared item mirrored if its left third stands clearly taller than its right third.
    Fashion-MNIST's shoes all point left, heel and shaft on the right; shops show them either
    way. Clothes, nearly symmetric, are mirrored or not at no cost (benchmarks/README.md)."""
    heights = (image > 40).sum(axis=0)
    columns = np.flatnonzero(heights)
    if columns.size < 4:
        return image
    first, end = columns[0], columns[-1] + 1
    third = (end - first) // 3
    left, right = heights[first : first + third].mean(), heights[end - third : end].mean()
    return image[:, ::-1] if left > 1.15 * right else image


@functools.cache
def face_detector():
    """OpenCV's frontal-face Haar cascade, loaded once per process."""
    import cv2

    cv2.setNumThreads(1)  # one photo per process already keeps every core busy
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def find_face(picture, box):
    """The largest skin-coloured frontal face where a model's head is in a catalogue photo
    (x, y, width, height in the photo), or None. Searched only in an item at least about as tall
    as it is wide, in its box's top half less a tenth at each side, for faces a tenth to two
    fifths of its height (on the shop photos: 0.12-0.32 of it, 0.12-0.82 across), which makes
    the search cheap; the skin test keeps a face printed on a T-shirt or a bag from counting."""
    left, top, right, bottom = box
    height, width = bottom - top, right - left
    if 10 * height < 9 * width:  # a shoe or a bag, not a person
        return None
    area = (left + width // 10, top, right - width // 10, top + height // 2)
    grey = np.asarray(picture.crop(area).convert("L"))
    sizes = {"minSize": (max(16, height // 10),) * 2, "maxSize": (2 * height // 5,) * 2}
    found = face_detector().detectMultiScale(grey, 1.1, 5, **sizes)
    if not len(found):
        return None
    ycbcr = np.asarray(picture.convert("YCbCr"), np.float32)
    faces = [face + (area[0], area[1], 0, 0) for face in found]  # in the photo's coordinates
    skin = [face for face in faces if is_skin(ycbcr, face)]
    return tuple(int(v) for v in max(skin, key=lambda face: face[2] * face[3])) if skin else None


def is_skin(ycbcr, face):
    """Whether a face's middle has a skin colour: the usual YCbCr bounds for every skin tone."""
    x, y, w, h = face
    middle = ycbcr[y + h // 4 : y + 3 * h // 4, x + w // 4 : x + 3 * w // 4].reshape(-1, 3)
    blue, red = np.median(middle[:, 1:], axis=0)
    return 77 <= blue <= 127 and 133 <= red <= 173


def garment_only(item, picture, face):
    """The item map of a photo of a garment worn by a model, with the model taken out: the head
    and hair above the chin, then every pixel whose colour the chest below the face does not
    have (arms, legs, trousers under a top). Measured on real shop photos: benchmarks/README."""
    x, y, w, h = face
    item = item.copy()
    item[: y + h + h // 5, max(0, x - 3 * w // 10) : x + w + 3 * w // 10] = 0
    levels = np.moveaxis(np.asarray(picture) // 16, -1, 0)  # 16 levels a channel
    codes = np.ravel_multi_index(levels, (16, 16, 16))  # one number for each of 4,096 colours
    chest = codes[y + 13 * h // 10 : y + 3 * h, max(0, x - w // 4) : x + w + w // 4]
    in_chest = np.bincount(chest.ravel(), minlength=16**3) / max(1, chest.size)
    item[in_chest[codes] < 0.002] = 0
    return item


def background_of(pixels):
    """The colour of an (H, W, 3) photo's border (its background, mostly) and that colour's own
    noise: 2.5x the border's median distance from it, robust to an item that touches the border
    (for Gaussian noise, about its 99th percentile)."""
    border = border_pixels(pixels)
    background = np.median(border, axis=0)
    return background, 2.5 * np.median(colour_distance(border, background))


def standing_out(path, pixels):
    """How far each pixel of an (H, W, 3) photo stands out from its background, less the
    background's noise: uint8, 0-255 (for a dark item on white, exactly the negative). A blank
    photo (a shop's placeholder, say) is one clear error rather than a confident answer about
    nothing."""
    background, noise = background_of(pixels)
    item = np.clip(colour_distance(pixels, background) - noise, 0, 255).astype(np.uint8)
    if not item.any():
        raise UserError(f"{path}: a blank photo, nothing in it stands out from its background")
    return item


def refuse_blank(path, picture):
    """standing_out's refusal without its map, for an RGB picture on the colour route; returns
    the background colour. A channel whose extreme lies sqrt(3) x (noise + 1) from it puts that
    pixel past the noise, which settles almost every photo at under half the cost (the map cost
    5% of the catalogue's time with a --backbone model)."""
    pixels = np.asarray(picture, np.float32)
    background, noise = background_of(pixels)
    extremes = np.array(picture.getextrema(), np.float32).T  # Pillow's: 8x numpy's min, max
    if not (np.abs(extremes - background) > np.sqrt(3) * (noise + 1)).any():
        standing_out(path, pixels)  # near blank: measured pixel by pixel
    return background


def colour_distance(pixels, colour):
    """Each pixel's distance from a colour, 0-255 (einsum: twice as fast as np.linalg.norm)."""
    difference = pixels - colour
    return np.sqrt(np.einsum("...k,...k->...", difference, difference)) / np.sqrt(3)


def median_box(mask):
    """The (left, top, right, bottom) box of a mask after a 3x3 median filter, which drops specks
    of noise; None if nothing is left. The median of 9 on/off pixels is on where 5 or more are,
    so counting them (edges repeated, as Pillow's filter does) gives the filter's result
    exactly, five times faster."""
    padded = np.pad(mask, 1, mode="edge").view(np.uint8)
    height, width = mask.shape
    count = sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3))
    kept = count >= 5
    rows, columns = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    if not rows.size:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def border_pixels(pixels):
    """The colours of an (H, W, 3) photo's outer two rows and columns: its background, mostly."""
    edges = [pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:]]
    return np.concatenate([edge.reshape(-1, 3) for edge in edges])


def prepare_colour(path):
    """A product photo -> uint8 224x224x3 for a --backbone model: the whole photo in colour,
    as ImageNet's photos were seen, its longest side 224, made square with its own background
    colour rather than bars."""
    from PIL import Image, ImageOps

    picture = open_picture(path, fit=BACKBONE_SIZE)
    background = tuple(int(v) for v in refuse_blank(path, picture))
    size = (BACKBONE_SIZE, BACKBONE_SIZE)
    return np.asarray(ImageOps.pad(picture, size, Image.Resampling.BILINEAR, color=background))


def prepare_as_photographed(path):
    """prepare_image with garments left on their models and shoes as they were shot: what a
    model tuned on a shop's own photos learned from (the model's bare arms tell a T-shirt from
    a pullover: 2 points better than garments alone when tuned on them, benchmarks/README.md)."""
    return prepare_image(path, fashion_mnist_view=False)


# Each kind of model gets its photos prepared as it was trained on them.
PREPARATIONS = {(28, 28, 1): prepare_image, (BACKBONE_SIZE, BACKBONE_SIZE, 3): prepare_colour}
TUNED_NAME = "fashion_mnist_cnn_tuned"  # the name finetune gives the 28x28 models it tunes
MIRRORED = "_mirrored"  # ends the name of a model trained on mirror images too (--augment)


def preparation(input_shape, name):
    """The preparation for a model that takes input_shape and is called name; None if none."""
    if input_shape == (28, 28, 1) and name == TUNED_NAME:
        return prepare_as_photographed
    return PREPARATIONS.get(input_shape)


def find_images(paths):
    """The images named, each folder replaced by every PNG and JPEG under it, sorted, each image
    once; a folder with none stays, to be reported."""
    found = []
    for path in paths:
        inside = []
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        found += inside or [path]
    return list(dict.fromkeys(found))  # a folder given inside another: its photos once


# A catalogue of any size: photos are prepared on every core in order, a few batches ahead (so
# memory stays flat), classified a batch at a time, and their rows written as they are done.
PREDICT_BATCH = 64  # photos per model call and per flush of the CSV
PREPARE_CHUNK = 8  # photos per task sent to a preparing process: fewer, cheaper hand-overs
BATCHES_AHEAD = 16  # prepared or being prepared: at 784 bytes a photo, the window costs nothing
PROGRESS_EVERY = 10  # seconds between progress lines when stderr is not a terminal
CSV_HEADER = ["path", "class", "probability", "top3", "error"]
# A file name that is not UTF-8 (copied from an old system) goes into the CSV as its own bytes,
# as `ls` shows it, and --resume reads it back to the same path.
FILE_NAME_BYTES = "surrogateescape"


def prepare_chunk(paths, prepare):
    """In a preparing process: (image, None) or (None, error) for each path."""
    prepared = []
    for path in paths:
        try:
            prepared.append((prepare(path), None))
        except UserError as error:
            prepared.append((None, str(error)))
    return prepared


def leave_signals_to_the_main_process():
    # Ctrl-C reaches the whole process group; the main process decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def preparing(paths, prepare=prepare_image):
    """Start preparing the photos on every core now (before TensorFlow loads, so the two
    overlap); gives a generator of (path, image, error) in the order given. Processes, not
    threads: they measured faster, and TensorFlow's import holds the GIL meanwhile."""
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    chunks = (paths[i : i + PREPARE_CHUNK] for i in range(0, len(paths), PREPARE_CHUNK))
    # forkserver: workers forked from a clean process, never from one running TensorFlow.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    workers = max(1, min(cpu_cores(), math.ceil(len(paths) / PREPARE_CHUNK)))
    pool = ProcessPoolExecutor(workers, context, leave_signals_to_the_main_process)
    ahead = (BATCHES_AHEAD + 1) * PREDICT_BATCH // PREPARE_CHUNK
    pending = collections.deque()

    def submit_next():
        for chunk in itertools.islice(chunks, 1):
            pending.append((chunk, pool.submit(prepare_chunk, chunk, prepare)))

    def in_order():
        try:
            while pending:
                chunk, future = pending.popleft()
                submit_next()
                for path, (image, error) in zip(chunk, future.result()):
                    yield path, image, error
        except BrokenProcessPool:
            raise UserError(
                "a process preparing the photos was killed (out of memory?): run again; with "
                "--csv, add --resume to keep the rows done"
            ) from None

    try:
        for _ in range(ahead):
            submit_next()
        yield in_order()
    finally:
        # Always, and waiting here rather than at exit: a pool still closing down while Python
        # exits races it (CPython 3.11's _python_exit writes to a pipe the pool's thread may
        # just have closed, a "Bad file descriptor" traceback after the run's last line).
        pool.shutdown(wait=True, cancel_futures=True)


def top_three(probabilities):
    top = np.argsort(probabilities)[::-1][:3]
    return [{"class": CLASS_NAMES[i], "probability": float(probabilities[i])} for i in top]


def class_probabilities(model, images):
    """A model's class probabilities for a batch of prepared photos. A model trained on mirror
    images too (MIRRORED) answers for each photo and its mirror image, averaged: 1.5 points
    more of the real shop photos right for --augment models, where a model that saw only
    Fashion-MNIST's left-pointing shoes would do far worse (benchmarks/README.md)."""
    if not model.name.endswith(MIRRORED):
        return model.predict_on_batch(scale_pixels(images))
    both = model.predict_on_batch(scale_pixels(np.concatenate([images, images[:, :, ::-1]])))
    return (both[: len(images)] + both[len(images) :]) / 2


def classify_batches(model, prepared):
    """(path, image, error) -> lists of results, a batch at a time: {"image", "top3"} for each
    photo, {"image", "error"} for each that could not be read."""
    while batch := list(itertools.islice(prepared, PREDICT_BATCH)):
        images = [image for _, image, error in batch if error is None]
        probabilities = iter(class_probabilities(model, np.stack(images)) if images else [])
        yield [
            {"image": str(path), "error": error}
            if error
            else {"image": str(path), "top3": top_three(next(probabilities))}
            for path, _, error in batch
        ]


def predict_images(model, paths):
    """Top three classes per image; unreadable images are reported in place of a result."""
    prepare = preparation(tuple(model.input_shape[1:]), model.name)
    with preparing(paths, prepare) as prepared:
        return [result for batch in classify_batches(model, prepared) for result in batch]


def csv_row(result):
    top = result.get("top3", [])
    return [
        result["image"],
        top[0]["class"] if top else "",
        f"{top[0]['probability']:.4f}" if top else "",
        "; ".join(f"{c['class']} {c['probability']:.1%}" for c in top),
        result.get("error", ""),
    ]


def print_result(result, each_line):
    """An error on stderr (returns 1), or the top three on stdout if each_line (returns 0)."""
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    if each_line:
        top = ", ".join(f"{c['class']} {c['probability']:.1%}" for c in result["top3"])
        print(f"{result['image']}: {top}", flush=True)
    return 0


def read_rows_done(path, paths):
    """The rows that an interrupted run left in the CSV at path, checked against the photos to
    classify now; (rows, bytes that hold them whole). A row cut off by the stop is left out."""
    import csv
    import io

    def refuse(reason):
        raise UserError(
            f"--resume: {path} {reason}; give another --csv, or leave out --resume to replace it"
        )

    if not path.exists():
        return [], 0  # stopped before its first row: nothing to skip
    if not path.is_file():  # a folder, or a device that never ends (/dev/zero)
        refuse("cannot be read as a CSV (not a file)")
    try:
        data = path.read_bytes()
    except OSError as error:
        refuse(f"cannot be read as a CSV ({error.strerror or error})")
    rows_end = data.rfind(b"\n") + 1  # a row cut off after its last newline is left out
    try:
        text = data[:rows_end].decode(errors=FILE_NAME_BYTES)
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        refuse(f"is damaged ({error})")
    if rows[:1] != [CSV_HEADER]:
        refuse("was not written by predict (its first line is not " + ",".join(CSV_HEADER) + ")")
    rows, wanted, seen = rows[1:], {str(p) for p in paths}, set()
    for number, row in enumerate(rows, start=2):
        whole = len(row) == len(CSV_HEADER) and (
            (row[1] in CLASS_NAMES and not row[4]) or (row[1] == "" and row[4])
        )  # a class, or an error
        if not whole:
            refuse(f"is damaged at line {number}")
        if row[0] not in wanted:
            refuse(f"lists {row[0]}, which is not among the photos given: it is another run's")
        if row[0] in seen:
            refuse(f"lists {row[0]} twice")
        seen.add(row[0])
    return rows, rows_end


def refuse_to_replace_other_files(path):
    """--csv replaces its file; refused if that file holds anything but predict's rows (a photo
    or the model, named by a slip of the shell: `--csv *.jpg`)."""
    header = ",".join(CSV_HEADER).encode()
    if not path.is_file():
        return  # nothing to lose (a folder is reported when the CSV is opened; /dev/null is fine)
    try:
        with path.open("rb") as file:
            first_line = file.readline(len(header) + 2).rstrip(b"\r\n")
    except OSError as error:
        raise UserError(f"--csv {path}: cannot be read ({error.strerror})") from None
    if first_line and first_line != header:
        raise UserError(
            f"--csv {path}: not a CSV written by predict, so it is left as it is; give another "
            "--csv, or remove that file first"
        )


@contextlib.contextmanager
def predictions_csv(path, resume_from=None):
    """A CSV writer that rows go to as they are done, flushed by the caller after each batch.
    resume_from: bytes of an interrupted run's rows to keep (anything after them, a row cut
    off by the stop, is dropped); otherwise the file is replaced."""
    import csv

    try:
        if resume_from:
            file = path.open("r+", newline="", encoding="utf-8", errors=FILE_NAME_BYTES)
            file.truncate(resume_from)
            file.seek(resume_from)
        else:
            file = path.open("w", newline="", encoding="utf-8", errors=FILE_NAME_BYTES)
    except OSError as error:
        raise UserError(f"--csv {path}: cannot write there ({error.strerror})") from None
    writer = csv.writer(file)

    def write_rows(rows):
        try:
            writer.writerows(rows)
            file.flush()
        except OSError as error:  # the disk is full, say: the rows written so far stay whole
            raise UserError(
                f"--csv {path}: cannot write there ({error.strerror}); once there is room, add "
                "--resume to classify the rest"
            ) from None

    try:
        if not resume_from:
            write_rows([CSV_HEADER])
        yield write_rows
    finally:
        with contextlib.suppress(OSError):  # what could not be written has been reported
            file.close()


def classify_catalogue(model, prepared, args, rows_bytes, each_line, progress):
    """Classify the prepared photos a batch at a time, writing each batch's rows to --csv and
    printing its lines as it is done, until the last batch or a stop signal (which lets the
    batch under way finish). Returns the results (kept for --json only), the photos done, how
    many of them could not be read, and the signal that stopped it, if any."""
    results, done, errors = [], 0, 0
    write = predictions_csv(args.csv, rows_bytes) if args.csv else contextlib.nullcontext()
    stopping = stop_gracefully(then="finishing this batch, then stopping", file=sys.stderr)
    with write as write_rows, stopping as state:
        for batch in classify_batches(model, prepared):
            if write_rows:
                write_rows(csv_row(result) for result in batch)
            errors += sum(print_result(result, each_line) for result in batch)
            results += batch if args.json else []
            done += len(batch)
            if progress:
                progress(done)
            if state["signal"]:
                break
    return results, done, errors, state["signal"]


def per_second(done, seconds):
    """'145 a second', or '0.5 a second' for a few photos (TensorFlow's start dominates)."""
    rate = done / seconds if seconds > 0 else 0.0
    return f"{rate:,.{0 if rate >= 10 else 1}f} a second"


def progress_text(done, total, seconds):
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate else 0.0
    clock = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    when = f"{clock.removeprefix('0:')} left" if done < total else f"done in {seconds:.0f} s"
    return f"{done:,}/{total:,} photos, {per_second(done, seconds)}, {when}"


def show_progress(total, on_terminal, start):
    """A function to call with the photos done so far: on a terminal, a bar rewritten in place;
    elsewhere (a log), a line every PROGRESS_EVERY seconds and one at the end. Keras' Progbar
    writes only to stdout, which holds the results."""
    last = [start]

    def update(done):
        now = time.perf_counter()
        seconds = now - start
        if on_terminal:
            filled = round(30 * done / max(total, 1))
            bar = "=" * filled + " " * (30 - filled)
            end = "\n" if done == total else ""
            print(f"\r[{bar}] {progress_text(done, total, seconds)}", end=end, file=sys.stderr)
        elif now - last[0] >= PROGRESS_EVERY or (done == total and last[0] > start):
            last[0] = now  # (a run too short for a line does not get a last one either)
            print(progress_text(done, total, seconds), file=sys.stderr)
        sys.stderr.flush()

    return update


# ----------------------------------------------------------------------------------------------
# Fine-tune: adapt the model to your own labelled photos


def class_key(name):
    """A class or folder name without case, spaces or punctuation: "T-shirt/top" -> "tshirttop"."""
    return "".join(c for c in name.lower() if c.isalnum())


def folder_names(name):
    """The folder names, as keys, that mean a class: its name, plural too ("Sneakers", "Ankle
    boots", "Dresses"), and for T-shirt/top either half ("T-shirts", "Tops")."""
    keys = {class_key(part) for part in (name, *name.split("/"))}
    return {word for key in keys for word in (key, key + ("es" if key.endswith("s") else "s"))}


def find_labelled_photos(folder):
    """(path, class index) of every photo in FOLDER's class subfolders, sorted; anything that
    could mislabel or silently drop a photo is refused with one line."""
    if not folder.is_dir():
        problem = "not a folder" if folder.exists() else "no such folder"
        raise UserError(f"{folder}: {problem}")
    classes = {word: index for index, name in enumerate(CLASS_NAMES) for word in folder_names(name)}
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if p.is_file()]
    if loose:
        raise UserError(f"{loose[0]}: a file outside the class subfolders has no label")
    if not entries:
        raise UserError(
            f"{folder}: no class subfolders; put each class's photos in a subfolder named after "
            f"it, e.g. {folder / 'sneaker'}"
        )
    photos = []
    for subfolder in entries:
        if class_key(subfolder.name) not in classes:
            raise UserError(
                f"{subfolder}: names no class; the class folders are (case, spaces, "
                f"punctuation and plurals ignored): {', '.join(CLASS_NAMES)}"
            )
        files = sorted(
            p for p in subfolder.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise UserError(
                f"{others[0]}: not a PNG or JPEG; fine-tuning refuses it rather than skip it "
                "(move it out of the class folders)"
            )
        if not files:
            raise UserError(f"{subfolder}: no PNG or JPEG photos in this class folder")
        photos += [(path, classes[class_key(subfolder.name)]) for path in files]
    return photos


def hold_out_photos(labels, holdout, seed):
    """Indices to fine-tune on and to measure on: each class's share held out, fixed by the
    seed, at least one photo of each class on each side (none held out with holdout 0)."""
    if holdout == 0:
        return np.arange(len(labels)), np.array([], int)
    rng = np.random.default_rng(seed)
    tune, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            raise UserError(
                f"too few photos for the hold-out: {CLASS_NAMES[label]} has "
                f"{len(members)}; each class folder needs 2 or more (more than 10 to learn much)"
            )
        n_held = min(max(1, round(len(members) * holdout)), len(members) - 1)
        held_out += members[:n_held].tolist()
        tune += members[n_held:].tolist()
    return np.array(sorted(tune)), np.array(sorted(held_out))


def photo_accuracy(model, images, labels):
    """Accuracy overall and per class present, and the confusion matrix, on prepared photos,
    classified as predict does."""
    predicted = np.concatenate(
        [
            class_probabilities(model, images[i : i + PREDICT_BATCH]).argmax(axis=1)
            for i in range(0, len(images), PREDICT_BATCH)
        ]
    )
    confusion = confusion_matrix(labels, predicted)
    per_class = {
        CLASS_NAMES[c]: round(float(confusion[c, c] / confusion[c].sum()), 4)
        for c in range(10)
        if confusion[c].sum()
    }
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "per_class": per_class,
        "confusion": confusion,
    }


def photo_batches(images, labels, seed, epoch):
    """An epoch of the photos in an order drawn from (seed, epoch), each mirrored at random:
    shops show shoes pointing either way, Fashion-MNIST only left."""
    return batches(images, labels, BATCH_SIZE, epoch_key=(seed, epoch), augment=True)


def accuracy_report(result):
    """What metrics.json keeps of photo_accuracy's result (None: nothing was measured)."""
    return result and {key: result[key] for key in ("accuracy", "per_class")}


def compile_for_finetuning(model, learning_rate):
    """Adam for what learns from the photos: the whole model, trained further from what it
    learned on Fashion-MNIST, or a new last layer on a frozen ImageNet network."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


# ----------------------------------------------------------------------------------------------
# Transfer learning: a network pre-trained on ImageNet sees the photos (finetune --backbone)

# Keras Applications' two smallest: name -> (network, width, weights file, its sha256). Keras
# checks no hash for these files, so we pass one; we fetch the file as Keras would.
BACKBONES = {
    "mobilenet_v2": (
        "MobileNetV2",
        0.35,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
        "df1c3db1d0d9193719c4c70f707c56f7021f999f825bdc57454c275cf6def19f",
    ),
    "mobilenet": (
        "MobileNet",
        0.25,
        "mobilenet/mobilenet_2_5_224_tf_no_top.h5",
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
    ),
}
KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def backbone_weights(name):
    """The ImageNet weights file, downloaded once into the Keras cache and checked."""
    import keras

    _, _, file, sha256 = BACKBONES[name]
    file_name = file.rpartition("/")[2]
    try:
        return keras.utils.get_file(
            file_name, KERAS_APPLICATIONS + file, file_hash=sha256, cache_subdir="models"
        )
    except Exception as error:  # get_file raises bare Exceptions for network failures
        reason = str(error).splitlines()[0].rpartition(" -- ")[2]
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise UserError(
            f"could not download {file_name} ({reason}). Without internet, put that file "
            f"(from {KERAS_APPLICATIONS + file}) in {cache}/"
        ) from None


def build_transfer_model(name):
    """(model, head): the ImageNet network, frozen, and a new 10-class layer on what it sees.
    The model takes [0, 1] colour photos like the other models; the backbone wants [-1, 1]."""
    import keras

    network, alpha, _, _ = BACKBONES[name]
    size = (BACKBONE_SIZE, BACKBONE_SIZE, 3)
    backbone = getattr(keras.applications, network)(
        input_shape=size, alpha=alpha, include_top=False, weights=backbone_weights(name),
        pooling="avg",
    )  # fmt: skip
    backbone.trainable = False  # tuning its top measured no better (benchmarks/README.md)
    head = keras.Sequential(
        [
            keras.Input(backbone.output_shape[1:]),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="head",
    )
    model = keras.Sequential(
        [keras.Input(size), keras.layers.Rescaling(2.0, offset=-1.0), backbone, head],
        name=f"{name}_fashion",
    )
    return model, head


def photo_features(model, images):
    """What the frozen backbone sees in each photo and then in each mirror image (so the new
    layer learns shoes pointing either way), computed once: the new layer trains in seconds."""
    import keras

    extractor = keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers[:-1]])
    return np.concatenate(
        [
            extractor.predict_on_batch(scale_pixels(x[i : i + PREDICT_BATCH]))
            for x in (images, images[:, :, ::-1])
            for i in range(0, len(x), PREDICT_BATCH)
        ]
    )


def feature_batches(features, labels, seed, epoch):
    """An epoch of (features, labels) batches in an order drawn from (seed, epoch) alone."""
    import tensorflow as tf

    order = np.random.default_rng((seed, epoch)).permutation(len(labels))
    return tf.data.Dataset.from_tensor_slices((features[order], labels[order])).batch(BATCH_SIZE)


# ----------------------------------------------------------------------------------------------
# Main


def start_tensorflow_quietly():
    """Import Keras and TensorFlow and find the devices, with TensorFlow's C++ notes hidden.

    TensorFlow 2.21 writes those (oneDNN, CUDA, absl) before TF_CPP_MIN_LOG_LEVEL is read, so
    the only way to hide them is to point stderr elsewhere meanwhile. If that fails, what it
    wrote is shown after all. TF_CPP_MIN_LOG_LEVEL=0 shows everything.
    """
    choose_onednn(cpu_info()[1])
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import keras

        return keras
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import keras
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved_stderr, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
    return keras


def run_training(args):
    """arguments -> data -> model -> train -> evaluate -> figures -> save."""
    # Before anything imports TensorFlow (the download does); the first choice stands.
    choose_onednn(cpu_info()[1], bfloat16=args.precision == "bfloat16")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    fit, held_out = split_validation(len(x_train), args.validation_split, args.seed)
    if max(args.samples) >= len(x_test):
        raise UserError(f"--samples: the test set has images 0 to {len(x_test) - 1} only")
    # What a continued run must share with the run it continues; --epochs may grow.
    options = {
        "data set": fingerprint(x_train, y_train, x_test, y_test),
        "--arch": args.arch,
        "--batch-size": args.batch_size,
        "--validation-split": args.validation_split,
        "--seed": args.seed,
        "--augment": args.augment,
    }
    out_dir = prepare_out_dir(args.out_dir, args.overwrite, resume=args.resume)
    backup = None if args.overwrite else read_backup(out_dir, "training", options, args.epochs)
    if backup:
        print(continuing_line(out_dir, backup, args.epochs))
    show = not args.no_show and display_available()
    if not show:
        import matplotlib

        matplotlib.use("Agg")  # no window: works on servers and in CI

    keras = start_tensorflow_quietly()
    compute = choose_compute(
        args, len(fit), len(held_out), find_gpus(), cpu_info(), cpu_cores(), onednn_setting()
    )
    apply_threads(compute["threads"])
    keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow in one go
    precision, split = compute["precision"], compute["split_batches"]
    steps = math.ceil(len(fit) / args.batch_size) * args.epochs
    model = build_model(precision, args.arch, total_steps=steps, mirrored=args.augment)
    model.summary()
    print(
        f"Training for {args.epochs} epoch{'s' * (args.epochs > 1)} on {len(fit):,} images, "
        f"validating on {len(held_out):,}, testing on {len(x_test):,}\n"
        f"On {compute['device']}: {precision}, "
        f"{'batches in halves' if split else 'whole batches'}, oneDNN {compute['onednn']}"
    )

    progress = restore_or_start(model, out_dir, "training", options, backup)

    x_train = keras.ops.convert_to_tensor(x_train)  # one copy, shared by both pipelines
    progress, stop_signal = train(
        in_halves(model) if split else model,
        lambda epoch: batches(
            x_train,
            y_train,
            args.batch_size,
            fit,
            epoch_key=(args.seed, epoch),
            halves=split,
            augment=args.augment,
        ),
        batches(x_train, y_train, EVAL_BATCH_SIZE, held_out, halves=split),
        args.epochs,
        out_dir,
        progress,
        lambda progress: save_backup(model, out_dir, "training", options, progress),
    )

    results = evaluate(model, batches(x_test, y_test, EVAL_BATCH_SIZE), y_test)
    print(f"\nTest accuracy: {results['test_accuracy']:.4f}")
    print(f"Test loss: {results['test_loss']:.4f}")
    print_per_class(results["per_class_accuracy"])

    save_figures(out_dir, progress["history"], results, x_test, y_test, args.samples)
    with atomic_path(out_dir / "model.keras") as temporary:
        model.save(temporary)
    metrics = {
        key: results[key] for key in ("test_accuracy", "test_loss", "per_class_accuracy")
    } | {
        "epochs_completed": progress["epochs_completed"],
        "interrupted": stop_signal is not None,
        "continued_from_epoch": progress["continued_from_epoch"],
        "train_seconds": round(progress["train_seconds"], 1),
        "backup_seconds": round(progress["backup_seconds"], 2),
        "history": progress["history"],
        "config": vars(args)
        | {"precision": precision, "split_batches": split, "keras": keras.__version__},
        "compute": compute,
    }
    save_json(metrics, out_dir / "metrics.json")
    print(f"\nSaved model.keras, metrics.json, history.csv and figures to {out_dir}/")
    finish_backup(out_dir, stop_signal, progress)
    if stop_signal:
        return 128 + stop_signal  # the shell's code: 130 for Ctrl-C, 143 for SIGTERM
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return 0


def run_predict(args):
    """photos -> prepared on every core while TensorFlow loads -> classified a batch at a time
    -> rows written and progress shown as they are done -> a summary."""
    start = time.perf_counter()
    paths = find_images(args.paths)
    if args.csv and not args.resume:
        refuse_to_replace_other_files(args.csv)
    rows, rows_bytes = read_rows_done(args.csv, paths) if args.resume else ([], 0)
    done_before = {row[0] for row in rows}
    todo = [path for path in paths if str(path) not in done_before]
    each_line = not (args.json or args.csv)  # a line per photo on stdout, as without a CSV
    on_terminal = sys.stderr.isatty()
    quiet = each_line and on_terminal and sys.stdout.isatty()  # the lines show the progress
    prepare = declared_preparation(args.model) or prepare_image
    with preparing(todo, prepare) as prepared:
        start_tensorflow_quietly()
        model = load_trained_model(args.model)
        if preparation(tuple(model.input_shape[1:]), model.name) is not prepare:
            raise UserError(f"{args.model}: its config and its model disagree on the input")
        progress = show_progress(len(todo), on_terminal, start) if todo and not quiet else None
        results, done, errors, stop_signal = classify_catalogue(
            model, prepared, args, rows_bytes, each_line, progress
        )
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        before = f"; {len(rows):,} were in it already" if rows else ""
        print(
            f"Classified {done - errors:,} of {done:,} photos in {seconds:.1f} s "
            f"({per_second(done, seconds)}), {errors:,} could not be read; "
            f"rows in {args.csv}{before}"
        )
    if stop_signal:
        line = f"Stopped after {done:,} of {len(todo):,} photos"
        if args.csv:
            line += f": rows so far are in {args.csv}; add --resume to classify the rest"
        print(f"{line}.", file=sys.stderr)
        return 128 + stop_signal
    return 1 if errors or any(row[4] for row in rows) else 0


def run_finetune(args):
    """photos -> hold-out -> model (yours, or an ImageNet network with a new last layer) ->
    accuracy before -> fine-tune -> accuracy after -> save."""
    photos = find_labelled_photos(args.folder)
    prepare = prepare_colour if args.backbone else prepare_as_photographed
    images = np.stack([prepare(path) for path, _ in photos])  # a bad photo stops us here
    labels = np.array([label for _, label in photos])
    tune, held_out = hold_out_photos(labels, args.holdout, args.seed)
    keras = start_tensorflow_quietly()
    keras.utils.set_random_seed(args.seed)
    if args.backbone:
        model, learner = build_transfer_model(args.backbone)
    else:
        model = learner = load_trained_model(args.model)
        if model.input_shape[1:] != (28, 28, 1):
            raise UserError(
                f"{args.model}: a model from finetune --backbone; to add photos, run finetune "
                "--backbone again on all of them (it takes a minute)"
            )
    options = {  # what a continued run must share with the run it continues
        "model": args.backbone or file_sha256(args.model),
        "photo folder": fingerprint(images, labels),
        "--learning-rate": args.learning_rate,
        "--holdout": args.holdout,
        "--seed": args.seed,
    }
    out_dir = prepare_out_dir(args.out_dir, args.overwrite, "-finetune", args.resume, "finetune")
    backup = None if args.overwrite else read_backup(out_dir, "finetune", options, args.epochs)
    if backup:
        print(continuing_line(out_dir, backup, args.epochs))
    import matplotlib

    matplotlib.use("Agg")  # the confusion matrix is saved, never shown
    what = f"a new last layer on {args.backbone} (ImageNet)" if args.backbone else "the model"
    print(
        f"Fine-tuning {what} on {len(tune)} photos, measuring on {len(held_out)} held out, "
        f"{len(np.unique(labels))} classes"
    )
    measure = len(held_out) > 0
    before = None  # a new last layer knows nothing yet: nothing to measure
    if measure and not args.backbone:  # the photos as predict shows them to this model
        as_predicted = preparation((28, 28, 1), model.name)
        shown = images[held_out]  # a model tuned before sees them as they were prepared
        if as_predicted is not prepare:
            shown = np.stack([as_predicted(photos[i][0]) for i in held_out])
        before = photo_accuracy(model, shown, labels[held_out])
        print(f"Accuracy on the held-out photos before: {before['accuracy']:.4f}")
    compile_for_finetuning(learner, args.learning_rate)
    progress = restore_or_start(learner, out_dir, "finetune", options, backup)
    if args.backbone:  # what the backbone sees in each photo, then in each mirror image
        features = photo_features(model, images[tune])
        epoch_data = functools.partial(
            feature_batches, features, np.tile(labels[tune], 2), args.seed
        )
    else:
        epoch_data = functools.partial(photo_batches, images[tune], labels[tune], args.seed)
    progress, stop_signal = train(
        learner,
        epoch_data,
        None,
        args.epochs,
        out_dir,
        progress,
        lambda progress: save_backup(learner, out_dir, "finetune", options, progress),
    )
    if not args.backbone:  # so that predict, and "after", show it photos as it was tuned on
        model.name = TUNED_NAME
    after = photo_accuracy(model, images[held_out], labels[held_out]) if measure else None
    if after:
        print(f"Accuracy on the held-out photos after:  {after['accuracy']:.4f}")
        with atomic_path(out_dir / "confusion_matrix.png") as temporary:
            plot_confusion_matrix(after["confusion"]).savefig(temporary, dpi=100)
    else:
        print("No photos held out (--holdout 0): nothing measured")
    with atomic_path(out_dir / "model.keras") as temporary:
        model.save(temporary)
    counts = np.bincount(labels, minlength=10)
    metrics = {
        "before": accuracy_report(before),
        "after": accuracy_report(after),
        "photos": {CLASS_NAMES[c]: int(counts[c]) for c in range(10) if counts[c]},
        "photos_tuned_on": len(tune),
        "photos_held_out": len(held_out),
        "epochs_completed": progress["epochs_completed"],
        "interrupted": stop_signal is not None,
        "continued_from_epoch": progress["continued_from_epoch"],
        "train_seconds": round(progress["train_seconds"], 1),
        "history": progress["history"],
        "config": vars(args) | {"keras": keras.__version__},
    }
    save_json(metrics, out_dir / "metrics.json")
    figure = ", history.csv and confusion_matrix.png" if after else " and history.csv"
    print(f"\nSaved model.keras, metrics.json{figure} to {out_dir}/")
    finish_backup(out_dir, stop_signal, progress)
    return 128 + stop_signal if stop_signal else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8, printed as ls does
        sys.stdout.reconfigure(errors=FILE_NAME_BYTES)
    try:
        if argv[:1] == ["predict"]:
            return run_predict(parse_predict_args(argv[1:]))
        if argv[:1] == ["finetune"]:
            return run_finetune(parse_finetune_args(argv[1:]))
        return run_training(parse_train_args(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whatever reads our output stopped reading (`| head`): stop quietly, as `cat` does, with
        # the shell's code for SIGPIPE. stdout goes to /dev/null first, or Python's final flush
        # of it fails again (the docs' recipe: "Note on SIGPIPE" in the signal module).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 141, as for a process that SIGPIPE ended
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written whole or not at all: the same command continues once there
        # is room.
        print(
            "error: the disk is full; free some space and run the same command again: it continues",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    code = main()
    # TensorFlow leaves hundreds of thousands of objects; the collector's last passes over them
    # took 0.6 s of every exit. Every file is closed by now, so they are left to the OS.
    gc.freeze()
    sys.exit(code)
