"""The report command: a finished training run's figures, drawn again from its folder, and every
refusal (in this process: report.main raises the UserError that the script prints in one line)."""

import contextlib
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import ROOT, assert_clean_failure, main_here, make_dataset, program_env
from photo_helpers import colour_model
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import report


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny training run, trained once in this process: (its folder, its data)."""
    base = tmp_path_factory.mktemp("report")
    data = make_dataset(base / "data", n_train=100, n_test=50)
    out = base / "run"
    result = main_here("--data-dir", data, "--epochs", "1", "--no-show", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out, data


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the run as training leaves it (without the figures report draws)."""
    return shutil.copytree(trained_run[0], tmp_path / "run")


def report_here(*argv):
    """report.main in this process, its figures closed after (as main_here does)."""
    import matplotlib.pyplot as plt

    try:
        return report.main([str(arg) for arg in argv])
    finally:
        plt.close("all")


def refused(*argv):
    """The one line report refuses argv with."""
    with pytest.raises(fm.UserError) as refusal:
        report_here(*argv)
    line = str(refusal.value)
    assert line and "\n" not in line, line
    return line


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def no_heavy_work(monkeypatch):
    """A mistake answered before the test data is read or TensorFlow starts."""

    def too_late(*args, **kwargs):
        raise AssertionError("the mistake was not answered before the heavy work")

    for name in ("load_fashion_mnist", "start_tensorflow_quietly"):
        monkeypatch.setattr(report, name, too_late)


def test_mistakes_are_the_wrong_predictions_most_confident_first():
    labels = np.array([0, 1, 2, 3, 4])
    probabilities = np.full((5, 10), 0.01)
    probabilities[0, 0] = 0.9  # right
    probabilities[1, 5] = 0.6  # wrong, less sure
    probabilities[2, 7] = 0.95  # wrong, surest
    probabilities[3, 3] = 0.99  # right, however sure
    probabilities[4, 9] = 0.7  # wrong
    figure = report.plot_mistakes(np.zeros((5, 28, 28)), labels, probabilities)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["#2: Sneaker 95%\ntrue: Pullover", "#4: Ankle boot 70%\ntrue: Coat",
                      "#1: Sandal 60%\ntrue: Trouser"]  # fmt: skip


@pytest.mark.slow
def test_report_draws_the_three_figures_into_the_run(run, capsys):
    before = contents(run)
    assert report_here(run, "--no-show") == 0  # the test data from the run's own --data-dir
    metrics = json.loads((run / "metrics.json").read_text())
    line = capsys.readouterr().out.splitlines()[-1]  # after load_fashion_mnist's note
    assert line == (
        f"Saved training_curves.png, confusion_matrix.png and mistakes.png to {run}/ "
        f"(test accuracy {metrics['test_accuracy']:.4f}, as the run measured)"
    )
    for name in report.FIGURES:
        with Image.open(run / name) as image:
            image.verify()
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas
    after = contents(run)
    assert set(after) == set(before) | set(report.FIGURES)  # nothing else, no temporary
    assert all(after[name] == data for name, data in before.items())


@pytest.mark.slow
def test_the_figures_show_the_runs_history_and_test_answers(run, trained_run, monkeypatch):
    """What each figure is drawn from: the history in metrics.json, and the model's answers on
    the run's test images, as the script computed its test accuracy."""
    drawn = {}

    def recorded(name, plot):
        def record(*args):
            drawn[name] = args
            return plot(*args)

        return record

    for name in ("plot_training_curves", "plot_confusion_matrix", "plot_mistakes"):
        monkeypatch.setattr(report, name, recorded(name, getattr(report, name)))
    assert report_here(run, "--data-dir", trained_run[1], "--no-show") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    (history,) = drawn["plot_training_curves"]
    assert history == metrics["history"] and len(history["val_loss"]) == 1
    images, labels, probabilities = drawn["plot_mistakes"]
    (_, (x_test, y_test)) = fm.load_fashion_mnist(trained_run[1])
    assert np.array_equal(images, x_test) and np.array_equal(labels, y_test)
    predicted = probabilities.argmax(axis=1)
    assert (
        probabilities.shape == (50, 10) and np.mean(predicted == labels) == metrics["test_accuracy"]
    )
    (confusion,) = drawn["plot_confusion_matrix"]
    assert np.array_equal(confusion, fm.confusion_matrix(labels, predicted))


@pytest.mark.slow
def test_other_test_data_is_refused_and_nothing_written(run, tmp_path):
    other = make_dataset(tmp_path / "other", n_train=100, n_test=50, seed=1)
    before = contents(run)
    line = refused(run, "--data-dir", other, "--no-show")
    assert "other test data (pass the --data-dir the run was trained on)" in line
    assert contents(run) == before


def finetune_metrics(run):
    """A finetune run's metrics.json: its own scores, no test accuracy (fashion_shop/finetune)."""
    metrics = {"before": {"accuracy": 0.5}, "after": {"accuracy": 0.8}, "photos_tuned_on": 8}
    (run / "metrics.json").write_text(json.dumps(metrics | {"photos_held_out": 2}))


def metrics_without(key):
    def change(run):
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics[key]
        (run / "metrics.json").write_text(json.dumps(metrics))

    return change


def no_epoch(run):
    """A run stopped before its first epoch began (finish_run saves it, its history empty)."""
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(metrics | {"history": {}, "interrupted": True}))


def unfinished(run):  # killed: no metrics.json yet
    (run / "metrics.json").unlink()
    stopped(run)


def stopped(run):  # Ctrl-C: metrics.json of the epochs so far, and the backup that continues it
    (run / "backup").mkdir()
    (run / "backup" / "state.json").write_text("{}")


def history_changed(**changes):
    def change(run):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["history"] |= changes
        (run / "metrics.json").write_text(json.dumps(metrics))

    return change


def half_of(name):
    def cut(run):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])

    return cut


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda run: shutil.rmtree(run), "run: no such folder"),
        (lambda run: shutil.rmtree(run) or run.write_text("x"), "run: not a folder"),
        (unfinished, "run: an unfinished run: the command that started it finishes it"),
        (stopped, "run: an unfinished run: the command that started it finishes it"),
        (lambda run: (run / "metrics.json").unlink(), "no metrics.json, so not a training run's"),
        (half_of("metrics.json"), "metrics.json: damaged, not a training run's metrics"),
        (metrics_without("test_accuracy"), "metrics.json: damaged, not a training run's metrics"),
        (metrics_without("history"), "(no history)"),
        (no_epoch, "stopped before its first epoch: nothing to draw"),
        (history_changed(accuracy=None), "its history does not hold accuracy, loss, val_accuracy"),
        (history_changed(val_loss=[0.5, 0.4]), "as numbers, one per epoch"),
        (history_changed(loss=["low"]), "as numbers, one per epoch"),
        (finetune_metrics, "a finetune run, which draws its own figures (its confusion_matrix"),
        (lambda run: (run / "model.keras").unlink(), "model.keras: no such model file"),
        (half_of("model.keras"), "model.keras: not a Keras model file, or a damaged one"),
        (lambda run: (run / "mistakes.png").mkdir(), "mistakes.png: in the way of the figure"),
    ],
)
def test_what_is_not_a_finished_training_run_is_refused_at_once(
    run, change, message, no_heavy_work
):
    change(run)
    before = contents(run) if run.is_dir() else None
    assert message in refused(run, "--no-show")
    assert (contents(run) if run.is_dir() else None) == before


def no_model_in_it(path):
    with zipfile.ZipFile(path, "w") as archive:  # a zip, as a .keras file is
        archive.writestr("config.json", "{}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "replace, message",
    [
        (no_model_in_it, "model.keras: not a usable Keras model file"),
        (colour_model, "model.keras: not a training run's model (28x28 images to 10 classes)"),
    ],
)
def test_a_model_keras_that_is_not_the_runs_is_refused(run, replace, message):
    replace(run / "model.keras")
    before = contents(run)
    assert message in refused(run, "--no-show")
    assert contents(run) == before


@pytest.mark.slow
def test_a_run_whose_data_is_gone_asks_for_data_dir(run, tmp_path, no_heavy_work):
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["data_dir"] = str(tmp_path / "moved")
    (run / "metrics.json").write_text(json.dumps(metrics))
    line = refused(run, "--no-show")
    assert f"trained on --data-dir {tmp_path / 'moved'}, which is not a folder here" in line


@contextlib.contextmanager
def read_only(folder):
    """folder made read-only for this process: by its mode, or for root by the immutable
    attribute where the file system has one; else the test is skipped."""
    folder.chmod(0o555)
    immutable = False
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            yield
            return
        (folder / "probe").unlink()
        attribute = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        immutable = attribute.returncode == 0
        if not immutable:
            pytest.skip("no way to make a folder read-only for this user here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.slow
def test_a_run_folder_that_cannot_be_written_is_refused_at_once(run, no_heavy_work):
    before = contents(run)
    with read_only(run):
        line = refused(run, "--no-show")
    assert line.startswith(f"{run}: cannot write there (")
    assert contents(run) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: RUN"),
        (["runs/x", "--bogus"], "unrecognized arguments: --bogus"),
        (["runs/x", "runs/y"], "unrecognized arguments: runs/y"),
    ],
)
def test_bad_arguments_are_one_line_before_anything(argv, message, capsys, no_heavy_work):
    with pytest.raises(SystemExit) as exit:
        report.main(argv)
    errors = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_help_and_mistakes_are_answered_without_tensorflow():
    """In a fresh process, where TensorFlow is not imported yet."""
    command = "import sys; from fashion_shop import report; sys.exit(report.main(sys.argv[1:]))"
    for argv, code in ([["--help"], 0], [["--bogus"], 2]):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", command, *argv],
            capture_output=True, text=True, cwd=ROOT, env=program_env(), timeout=60,
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        assert "tensorflow" not in result.stderr and "Traceback" not in result.stderr
        assert code or "--data-dir DIR" in result.stdout


@pytest.mark.slow
def test_the_script_runs_report(run):
    result = main_here("report", run, "--no-show")
    assert result.returncode == 0, result.stderr
    assert all((run / name).is_file() for name in report.FIGURES)
    assert_clean_failure(main_here("report", run / "nowhere"), "nowhere: no such folder")


@pytest.mark.slow
def test_training_names_report_and_a_run_started_over_drops_the_old_figures(trained_run, tmp_path):
    folder = shutil.copytree(trained_run[0], tmp_path / "a run")  # a space, to be quoted
    for name in report.FIGURES:  # drawn by report for the model about to be replaced
        (folder / name).write_bytes(b"an earlier model's figure")
    result = main_here("--data-dir", trained_run[1], "--epochs", "1", "--no-show",
                       "--out-dir", folder, "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not any((folder / name).exists() for name in report.FIGURES)
    hint = "Training curves, confusion matrix and mistakes: python fashion_mnist_cnn.py report"
    assert f"{hint} '{folder}'\n" in result.stdout
