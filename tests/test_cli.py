"""The program as users run it: arguments, whole runs, outputs, and every refusal."""

import argparse
import ast
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PROGRAM,
    SHARED,
    assert_clean_failure,
    make_dataset,
    program_env,
    run_program,
    start_program,
    wait_for_line,
)
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import finetune

OPTIONS = [
    "--epochs",
    "--batch-size",
    "--validation-split",
    "--seed",
    "--data-dir",
    "--out-dir",
    "--resume",
    "--no-show",
    "--samples",
    "--precision",
    "--overwrite",
    "--arch",
    "--augment",
]


def imports_tensorflow(result):
    """Run with -X importtime, stderr lists every module imported."""
    return "tensorflow" in result.stderr


def run_with_importtime(*args):
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(PROGRAM), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=program_env(),
    )


def test_help_lists_every_option_with_defaults_without_tensorflow():
    result = run_with_importtime("--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option in result.stdout
    assert "(default: 10; 15 with --augment)" in result.stdout
    assert "(default: 32; 256 with --arch improved)" in result.stdout
    assert "(default: 0.2)" in result.stdout and "predict" in result.stdout
    assert not imports_tensorflow(result)
    assert "importtime" not in result.stdout


# An argparse group of the two: one line, training and finetune alike.
RESUME_AND_OVERWRITE = "argument --overwrite: not allowed with argument --resume (see --help)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--validation-split", "1"], "--validation-split"),
        (["--validation-split", "0"], "--validation-split"),
        (["--validation-split", "nan"], "--validation-split"),
        (["--samples", "-3"], "--samples"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "4294967296"], "--seed"),
        (["--precision", "float16"], "--precision"),
        (["--no-such-option"], "unrecognized"),
        (["predict"], "required"),
        (["finetune"], "required"),
        (["finetune", "m.keras", "photos", "--holdout", "1"], "--holdout"),
        (["finetune", "m.keras", "photos", "--learning-rate", "-1"], "--learning-rate"),
        (["finetune", "m.keras", "photos", "--epochs", "0"], "--epochs"),
        (["--resume", "--overwrite"], RESUME_AND_OVERWRITE),
        (["finetune", "m.keras", "photos", "--resume", "--overwrite"], RESUME_AND_OVERWRITE),
        (["finetune", "--holdout", "-0.1", "m.keras", "photos"], "--holdout"),
        (["finetune", "photos"], "give the MODEL to adapt and the FOLDER"),
        (["finetune", "--backbone", "mobilenet_v2", "m.keras", "photos"], "leave out MODEL"),
        (["finetune", "--backbone", "resnet50", "photos"], "invalid choice: 'resnet50'"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(run_main, args, message):
    result = run_main(*args)
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize(
    "args", [["--epochs", "0"], ["finetune", "photos"], ["--resume", "--overwrite"]]
)
def test_a_fresh_start_refuses_bad_arguments_without_tensorflow(args):
    result = run_with_importtime(*args)
    assert result.returncode == 2 and not imports_tensorflow(result)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command, shown",
    [
        ("predict", "--json"),
        (
            "finetune",
            f"(default: {finetune.FINETUNE_EPOCHS}, or {finetune.BACKBONE_EPOCHS} with --backbone)",
        ),
        ("export", "{savedmodel,litert,onnx,all}"),
    ],
)
def test_subcommand_help_without_tensorflow(command, shown):
    result = run_with_importtime(command, "--help")
    assert result.returncode == 0 and not imports_tensorflow(result)
    assert shown in result.stdout


def test_bad_data_dir_is_refused_before_tensorflow_loads(run_main, tmp_path):
    result = run_with_importtime("--data-dir", tmp_path / "nowhere")
    assert result.returncode == 1 and not imports_tensorflow(result)
    assert_clean_failure(
        run_main("--data-dir", tmp_path / "nowhere"), "--data-dir", "no such folder"
    )


def test_empty_data_dir(run_main, tmp_path):
    assert_clean_failure(run_main("--data-dir", tmp_path), "is missing")


def test_sample_index_beyond_the_test_set(run_main, data_dir, tmp_path):
    result = run_main("--data-dir", data_dir, "--samples", "0", "50", "--out-dir", tmp_path / "o")
    assert_clean_failure(result, "--samples", "0 to 49")
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.slow
def test_no_network_points_to_data_dir(tmp_path):
    # An empty Keras cache and a proxy that refuses connections: a machine with no internet.
    refuse = "http://127.0.0.1:9"
    env = {
        "KERAS_HOME": str(tmp_path / "keras"),
        "HTTPS_PROXY": refuse,
        "HTTP_PROXY": refuse,
        "https_proxy": refuse,
        "http_proxy": refuse,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    result = run_program("--epochs", "1", "--no-show", "--out-dir", tmp_path / "o", env=env)
    assert_clean_failure(result, "could not download", "--data-dir")
    assert result.returncode == 1


# The training script alone: copied without the fashion_shop package, it still trains.


@pytest.fixture(scope="module")
def lone_copy(tmp_path_factory):
    """fashion_mnist_cnn.py copied alone into an empty folder."""
    folder = tmp_path_factory.mktemp("lone")
    return Path(shutil.copy(PROGRAM, folder / PROGRAM.name))


def run_lone_copy(copy, *args):
    """Run the lone copy from its folder, with nothing on the path that holds fashion_shop."""
    env = {key: value for key, value in program_env().items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(copy), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env, cwd=copy.parent,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.slow
def test_the_script_copied_alone_trains(lone_copy, tmp_path):
    assert [p.name for p in lone_copy.parent.iterdir()] == [PROGRAM.name]
    data = make_dataset(tmp_path / "data", n_train=200, n_test=50)
    result = run_lone_copy(lone_copy, "--data-dir", data, "--epochs", "1", "--no-show")
    assert result.returncode == 0, result.stderr
    (run,) = (lone_copy.parent / "runs").iterdir()
    assert {"model.keras", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "metrics.json").read_text())["epochs_completed"] == 1
    assert not (lone_copy.parent / "fashion_shop").exists()


@pytest.mark.parametrize("command", ["predict", "finetune", "export"])
def test_the_shop_commands_of_the_script_alone_name_the_package_it_needs(
    lone_copy, tmp_path, command
):
    result = run_lone_copy(lone_copy, command, tmp_path / "model.keras", tmp_path / "photos")
    assert_clean_failure(result, f"{command} needs the fashion_shop package")
    assert result.returncode == 1


def test_the_script_imports_nothing_beyond_tensorflow_keras_numpy_matplotlib():
    """The training script runs wherever its requirements are installed: every import, at the
    top and inside functions, is the standard library's or one of theirs."""
    imported = set()
    for node in ast.walk(ast.parse(PROGRAM.read_text(), str(PROGRAM))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, ast.unparse(node)  # no relative import
            imported.add(node.module.partition(".")[0])
    allowed = {"tensorflow", "keras", "numpy", "matplotlib"}
    assert {"numpy", "keras", "tensorflow", "matplotlib", "argparse"} <= imported  # all found
    foreign = {name for name in imported if name not in sys.stdlib_module_names} - allowed
    assert not foreign, foreign


# One real training run, shared by the tests that check what it wrote.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    data = make_dataset(base / "data", n_train=1000, n_test=100)
    out = base / "out"
    result = run_program("--data-dir", data, "--epochs", "2", "--no-show", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return result, out, data


@pytest.mark.slow
def test_run_prints_summary_progress_and_test_accuracy(finished_run):
    result, _, _ = finished_run
    assert "93,322" in result.stdout
    assert "Epoch 1/2" in result.stdout and "Epoch 2/2" in result.stdout
    line = [x for x in result.stdout.splitlines() if x.startswith("Test accuracy: ")]
    # Ten classes whose items are plain to see: chance is 0.1, two epochs learn them.
    assert len(line) == 1 and float(line[0].split(": ")[1]) > 0.6
    assert "Per-class test accuracy" in result.stdout and "Ankle boot" in result.stdout
    # TensorFlow's start-up notes stay hidden; nothing else goes to stderr on success.
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.slow
def test_run_writes_loadable_model_and_honest_metrics(finished_run):
    import keras

    _, out, _ = finished_run
    model = keras.models.load_model(out / "model.keras")
    assert model.count_params() == 93_322
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.6 < metrics["test_accuracy"] <= 1 and 0 < metrics["test_loss"] < 2.3  # chance: ln 10
    assert metrics["epochs_completed"] == 2 and metrics["interrupted"] is False
    assert list(metrics["per_class_accuracy"]) == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip
    config = metrics["config"]
    for key in [
        "epochs",
        "batch_size",
        "validation_split",
        "seed",
        "data_dir",
        "out_dir",
        "no_show",
        "samples",
        "precision",
        "arch",
        "augment",
        "no_split",
        "split_batches",
    ]:
        assert key in config
    assert config["arch"] == "seed" and config["augment"] is False
    assert (
        config["epochs"] == 2
        and config["batch_size"] == 32
        and config["precision"] in ("float32", "bfloat16")
    )
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].split(",") == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert len(history) == 3
    assert not [p for p in out.iterdir() if ".partial" in p.name]  # no temporary left over


@pytest.mark.slow
def test_the_predictions_figure_is_a_real_image(finished_run):
    _, out, _ = finished_run
    with Image.open(out / "predictions.png") as image:
        image.verify()
    with Image.open(out / "predictions.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas


@pytest.mark.slow
def test_finished_run_is_not_overwritten(run_main, finished_run, data_dir):
    _, out, _ = finished_run
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.iterdir()}
    result = run_main("--data-dir", data_dir, "--out-dir", out, "--no-show")
    assert_clean_failure(result, "holds a finished run", "--overwrite")
    after = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert before == after


@pytest.mark.slow
def test_a_model_put_in_the_out_dir_by_hand_is_not_overwritten(
    run_main, finished_run, data_dir, tmp_path
):
    _, out, _ = finished_run
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(out / "model.keras", models)
    result = run_main("--data-dir", data_dir, "--out-dir", models, "--no-show")
    assert_clean_failure(result, "holds a model.keras that this run would replace")
    assert (models / "model.keras").read_bytes() == (out / "model.keras").read_bytes()
    assert [p.name for p in models.iterdir()] == ["model.keras"]


def damage(folder, name, how):
    path = folder / name
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not-gzip":
        path.write_bytes(b"\x1f\x8b" + b"not really gzip")
    elif how == "wrong-magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x07" + bytes(100)))
    elif how == "label-12":
        labels = gzip.decompress(data)
        path.write_bytes(gzip.compress(labels[:-1] + bytes([12])))
    elif how == "official-size":
        path.write_bytes(bytes(fm.OFFICIAL_FILES[name][0]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, how, message",
    [
        ("train-images-idx3-ubyte.gz", "truncate", "gzip"),
        ("t10k-images-idx3-ubyte.gz", "not-gzip", "not a valid gzip file"),
        ("train-labels-idx1-ubyte.gz", "wrong-magic", "not an IDX label file"),
        ("t10k-labels-idx1-ubyte.gz", "label-12", "label 12 found"),
        ("train-labels-idx1-ubyte.gz", "official-size", "checksum mismatch"),
    ],
)
def test_bad_data_is_refused_and_leaves_earlier_results_alone(
    run_main, finished_run, tmp_path, name, how, message
):
    _, out, data = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    damage(broken, name, how)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_main("--data-dir", broken, "--out-dir", out, "--overwrite", "--no-show")
    assert_clean_failure(result, name, message)
    assert result.returncode == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_data_dir_that_is_a_file(run_main, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_failure(run_main("--data-dir", tmp_path / "file"), "not a folder")


def test_out_dir_that_cannot_be_written(run_main, data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_main("--data-dir", data_dir, "--out-dir", blocker / "run", "--no-show")
    assert_clean_failure(result, "--out-dir", "cannot write")
    assert blocker.read_text() == "not a folder"
    result = run_main("--data-dir", data_dir, "--out-dir", blocker, "--no-show")
    assert_clean_failure(result, "--out-dir", "a file, not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
@pytest.mark.parametrize(
    "n_train, args, reason",
    [
        (200, ["--no-split"], "--no-split"),
        (200, ["--arch", "improved"], "BatchNorm"),
        (162, [], "a batch of one image"),  # 162 images: 129 to fit, the last batch holds one
    ],
)
def test_whole_batches_when_asked_or_when_halves_cannot_be(
    run_main, tmp_path, n_train, args, reason
):
    data = make_dataset(tmp_path / "data", n_train=n_train, n_test=20)
    out = tmp_path / "out"
    result = run_main(
        "--data-dir", data, "--epochs", "1", "--no-show", "--out-dir", out, *args
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "halves" not in result.stdout
    compute = json.loads((out / "metrics.json").read_text())["compute"]
    assert compute["split_batches"] is False
    if len(os.sched_getaffinity(0)) >= 2:  # else the machine's one core is the reason
        assert reason in compute["why"]["split_batches"], compute["why"]


@pytest.mark.slow
def test_bf16_asked_of_an_avx2_cpu_trains_on_tensorflows_own_kernels(data_dir, tmp_path):
    # oneDNN has no bf16 convolutions below AVX-512: with it on, the first step would fail.
    # The cap makes any machine's oneDNN an AVX2 CPU's.
    result = run_program(
        "--data-dir", data_dir, "--epochs", "1", "--no-show", "--out-dir", tmp_path / "out",
        "--precision", "bfloat16", env={"ONEDNN_MAX_CPU_ISA": "AVX2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bfloat16" in result.stdout and "oneDNN off" in result.stdout, result.stdout


@pytest.mark.slow
def test_augment_trains_the_classic_model_and_saves_it_without_augmentation(
    run_main, data_dir, tmp_path
):
    out = tmp_path / "out"
    result = run_main(
        "--data-dir", data_dir, "--epochs", "1", "--no-show", "--out-dir", out, "--augment"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["augment"] is True
    # The mirroring happens in the data pipeline: halves stay on where they are used (2 cores),
    # and the saved model is the classic one, named so that predict shows it photos both ways.
    if len(os.sched_getaffinity(0)) >= 2:
        assert metrics["compute"]["split_batches"] is True, metrics["compute"]["why"]
    import keras

    model = keras.models.load_model(out / "model.keras")
    assert model.count_params() == 93_322 and model.name == "fashion_mnist_cnn_mirrored"
    assert not [layer for layer in model.layers if type(layer).__name__.startswith("Random")]


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fm.time, "strftime", lambda format: "20261125-160000")
    args = argparse.Namespace(out_dir=None, overwrite=False, resume=False, epochs=1)
    folders = [fm.open_run(args, "training", {}).out_dir for _ in range(3)]
    assert [str(f) for f in folders] == [
        "runs/20261125-160000", "runs/20261125-160000-2", "runs/20261125-160000-3"
    ]  # fmt: skip
    assert all(folder.is_dir() for folder in folders)


def test_validation_split_that_leaves_nothing(run_main, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=2, n_test=10)
    out = tmp_path / "o"
    result = run_main("--data-dir", data, "--validation-split", "0.6", "--out-dir", out)
    assert_clean_failure(result, "--validation-split 0.6 leaves no training")
    assert not out.exists()


@pytest.mark.slow
def test_default_out_dir_is_new_per_run(run_main, data_dir, tmp_path):
    for _ in range(2):
        result = run_main("--data-dir", data_dir, "--epochs", "1", "--no-show", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "metrics.json").is_file() for run in runs)


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="halves need 2 cores")
@pytest.mark.parametrize("options, halves", [([], True), (["--no-split"], False)])
def test_same_seed_same_numbers_to_the_last_bit(run_main, data_dir, tmp_path, options, halves):
    metrics = []
    # One run in a process of its own, one in this one: nothing a process carries (its hash
    # seed, TensorFlow's global state, thread pools) may change a number.
    for name, run in (("a", run_program), ("b", run_main)):
        out = tmp_path / name
        result = run(
            "--data-dir", data_dir, "--epochs", "2", "--no-show", "--seed", "7",
            "--out-dir", out, *options
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        metrics.append(json.loads((out / "metrics.json").read_text()))
        metrics[-1]["history.csv"] = (out / "history.csv").read_text()
    assert metrics[0]["compute"]["split_batches"] is halves
    for key in ("test_accuracy", "test_loss", "per_class_accuracy", "history", "history.csv"):
        assert metrics[0][key] == metrics[1][key], key


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_what_was_learned(tmp_path, stop_signal, code):
    data = make_dataset(tmp_path / "data", n_train=3000, n_test=100)
    out = tmp_path / "out"
    process = start_program(
        "--data-dir", data, "--epochs", "200", "--no-show", "--out-dir", out
    )  # fmt: skip
    try:
        wait_for_line(process, "Epoch 2/200")  # one epoch is complete and the second begins
        time.sleep(0.5)
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # if the signal was ignored, the very bug this looks for
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert 1 <= metrics["epochs_completed"] < 200
    assert "Test accuracy: " in stdout
    import keras

    assert keras.models.load_model(out / "model.keras").count_params() == 93_322


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once(tmp_path):
    # A large test set, so that the first Ctrl-C's evaluation and saving are still under way.
    data = make_dataset(tmp_path / "data", n_train=3000, n_test=30_000)
    out = tmp_path / "out"
    process = start_program("--data-dir", data, "--epochs", "200", "--no-show", "--out-dir", out)
    try:
        wait_for_line(process, "Epoch 2/200")
        process.send_signal(signal.SIGINT)
        wait_for_line(process, "Interrupted: finishing this step")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGINT  # ended by the signal itself, at once
    assert "Saved model.keras" not in process.stdout.read()
    # What it had written under its real names is whole (files are written atomically).
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and all(line.count(",") == 4 for line in history)
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/fashion-mnist absent")
def test_real_sample_end_to_end(run_main, tmp_path):
    out = tmp_path / "out"
    result = run_main(
        "--data-dir", SHARED / "sample", "--epochs", "3", "--no-show", "--out-dir", out
    )
    assert result.returncode == 0, result.stderr
    assert "not the official Fashion-MNIST" in result.stdout
    accuracy = float(result.stdout.split("Test accuracy: ")[1].split()[0])
    assert accuracy > 0.3  # ten classes: chance is 0.1; three epochs on 480 real images
    assert {"model.keras", "metrics.json", "predictions.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "real-subset").is_dir(), reason="../shared/fashion-mnist/real-subset absent"
)
def test_one_epoch_on_real_images_clearly_learns(run_main, tmp_path):
    out = tmp_path / "out"
    result = run_main(
        "--data-dir", SHARED / "real-subset", "--epochs", "1", "--no-show", "--out-dir", out
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # 6,580 real training images, 4,443 real test images; chance is 0.1, 10 epochs give ~0.86.
    assert metrics["test_accuracy"] > 0.65, metrics["test_accuracy"]
    # Nearly every class, not a few; Shirt, the hardest, can still lag after one epoch (2%).
    assert sum(a > 0.3 for a in metrics["per_class_accuracy"].values()) >= 9


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "full").is_dir(), reason="../shared/fashion-mnist/full absent")
def test_one_epoch_on_the_full_data_from_the_keras_cache_clearly_learns(tmp_path):
    # As a user runs it: no --data-dir, the official files already in the Keras cache, so the
    # download finds them, checks their md5 and fetches nothing.
    cache = tmp_path / "keras" / "datasets" / "fashion-mnist"
    cache.mkdir(parents=True)
    for name in fm.OFFICIAL_FILES:
        shutil.copy(SHARED / "full" / name, cache / name)
    out = tmp_path / "out"
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_program("--epochs", "1", "--no-show", "--out-dir", out, env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "Training for 1 epoch on 48,000 images, validating on 12,000, testing on 10,000"
        in result.stdout
    )
    assert "not the official" not in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    # One epoch on all 48,000: about 0.86 (the subset's bar is 0.65; ten epochs give ~0.90).
    assert metrics["test_accuracy"] > 0.83, metrics["test_accuracy"]
    # Every class learned something; Shirt, the hardest, is at about 0.37 after one epoch.
    assert min(metrics["per_class_accuracy"].values()) > 0.2


def test_an_out_dir_that_cannot_be_written_is_answered_before_the_download(run_main, monkeypatch):
    monkeypatch.setattr(fm, "download_data_files", lambda: pytest.fail("downloaded first"))
    result = run_main("--out-dir", "/proc/no-such/run", "--no-show")
    assert_clean_failure(result, "--out-dir /proc/no-such/run: cannot write there")


def test_the_usage_line_lists_the_commands_and_a_mistyped_one_is_named(run_main):
    usage = run_main("--help").stdout.split("\n\n")[0]
    assert "{predict,finetune,export,review,report}" in usage
    for args, says in [
        (["pridict", "m.keras"], "invalid choice: 'pridict' (choose from 'predict', 'finetune'"),
        (["--epochs", "2", "predict"], "predict comes first: fashion_mnist_cnn.py predict ..."),
    ]:
        result = run_main(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert says in result.stderr


@pytest.mark.parametrize("stop, shown", [(KeyboardInterrupt, False), (ImportError, True)])
def test_tensorflows_notes_stay_hidden_when_ctrl_c_stops_its_start(capfd, stop, shown):
    with pytest.raises(stop), fm.tensorflow_notes_hidden():
        os.write(2, b"I0000 cpu_feature_guard.cc: a note\n")
        raise stop
    assert ("cpu_feature_guard" in capfd.readouterr().err) is shown
