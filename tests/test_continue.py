"""Continuing a run after a hard stop: kill -9 at any point, then the same command, gives the
numbers of an unbroken run; a damaged, foreign or mismatched backup is refused in one line."""

import errno
import hashlib
import json
import os
import shutil
import signal

import numpy as np
import pytest
from conftest import (
    assert_clean_failure,
    distinct_images,
    main_here,
    make_dataset,
    start_program,
    wait_for_line,
)
from photo_helpers import photo_folder

import fashion_mnist_cnn as fm
from fashion_shop.models import load_trained_model

keras = fm.start_tensorflow_quietly()

# Two cores where there are two or more, so that the default run trains in halves.
CORES = 2 if len(os.sched_getaffinity(0)) >= 2 else None
SAME = ("test_accuracy", "test_loss", "per_class_accuracy", "history", "epochs_completed")


def training(data, out, *options):
    return ("--data-dir", data, "--epochs", "4", "--seed", "3", "--no-show", "--out-dir", out,
            *options)  # fmt: skip


def finished(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics | {"history.csv": (out / "history.csv").read_text()}


def kill_at(command, line, cwd=None):
    """Start the program, SIGKILL it as soon as it prints a line starting with `line`."""
    process = start_program(*command, cwd=cwd, cores=CORES)
    try:
        wait_for_line(process, line)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL


def folder_state(folder):
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 3,000 images: an epoch lasts long enough (~90 steps) to be killed in the middle.
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=3000, n_test=200)


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "out"
    result = main_here(*training(data, out))
    assert result.returncode == 0, result.stderr
    if CORES:
        assert json.loads((out / "metrics.json").read_text())["compute"]["split_batches"]
    return finished(out) | {"out": out}


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, says, epochs_done",
    [
        ("Epoch 1/4", " from epoch 1 of 4", 0),  # before the first epoch ends
        ("Epoch 3/4", " from epoch 3 of 4", 2),  # in the middle of a run
        ("Test accuracy", ": its 4 epochs are done; evaluating and saving", 4),  # while saving
    ],
)
def test_killed_run_continues_to_the_unbroken_runs_numbers(
    data, unbroken, killed_run, tmp_path, line, says, epochs_done
):
    out = tmp_path / "out"
    if line == "Epoch 3/4":  # killed_run was killed there already
        shutil.copytree(killed_run, out)
    else:
        kill_at(training(data, out), line)
    assert not (out / "metrics.json").exists()
    result = main_here(*training(data, out))
    assert result.returncode == 0, result.stderr
    # Said at once, after the data's note (generated data is not the official files).
    assert result.stdout.splitlines()[1] == f"Continuing {out}{says}"
    continued = finished(out)
    for key in (*SAME, "history.csv"):
        assert continued[key] == unbroken[key], key
    assert continued["continued_from_epoch"] == epochs_done
    assert unbroken["continued_from_epoch"] is None
    assert not (out / "backup").exists()  # a finished run keeps no backup


@pytest.mark.slow
def test_options_continue_exactly_and_resume_finds_the_newest_unfinished_run(data, tmp_path):
    """--arch improved --augment: dropout, mirroring and batch order all continue as in an
    unbroken run; --resume with no --out-dir takes the newest unfinished run under runs/."""
    options = ("--data-dir", data, "--epochs", "3", "--seed", "3", "--no-show", "--arch",
               "improved", "--augment", "--batch-size", "64")  # fmt: skip
    result = main_here(*options, "--out-dir", tmp_path / "unbroken")
    assert result.returncode == 0, result.stderr
    kill_at(options, "Epoch 2/3", cwd=tmp_path)
    (killed,) = (tmp_path / "runs").iterdir()
    # Newer, but neither an unfinished training run: a finished one, an unfinished fine-tuning.
    shutil.copytree(tmp_path / "unbroken", tmp_path / "runs" / "finished")
    (tmp_path / "runs" / "tuning" / "backup").mkdir(parents=True)
    (tmp_path / "runs" / "tuning" / "backup" / "state.json").write_text('{"command": "finetune"}')
    result = main_here(*options, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Continuing {killed.relative_to(tmp_path)} from epoch 2 of 3" in result.stdout
    continued, whole = finished(killed), finished(tmp_path / "unbroken")
    for key in (*SAME, "history.csv"):
        assert continued[key] == whole[key], key


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_with_more_epochs_trains_on(data, tmp_path):
    out = tmp_path / "out"
    process = start_program(*training(data, out))
    try:
        wait_for_line(process, "Epoch 2/4")
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Run the same command again to continue from epoch 2." in stdout
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is True
    result = main_here(*training(data, out)[:-2], "--out-dir", out, "--epochs", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == f"Continuing {out} from epoch 2 of 5"
    metrics = finished(out)
    assert metrics["interrupted"] is False and metrics["epochs_completed"] == 5
    assert len(metrics["history"]["loss"]) == 5 and metrics["history.csv"].count("\n") == 6


@pytest.fixture(scope="module")
def killed_run(data, tmp_path_factory):
    """A run killed during its third epoch: a backup of epoch 2."""
    out = tmp_path_factory.mktemp("killed") / "out"
    kill_at(training(data, out), "Epoch 3/4")
    return out


@pytest.fixture
def unfinished(killed_run, tmp_path):
    """A copy of killed_run for each test."""
    return shutil.copytree(killed_run, tmp_path / "out")


def edit_state(out, change, keep_checksum=False):
    path = out / "backup" / "state.json"
    state = json.loads(path.read_text())
    change(state)
    if not keep_checksum:
        state["checksum"] = fm.state_checksum(state)
    path.write_text(json.dumps(state))


def truncate_weights(out):
    (weights,) = (out / "backup").glob("*.weights.h5")
    weights.write_bytes(weights.read_bytes()[:1000])


def foreign_weights(out):
    """Another model's weights, with the checksums made to match: only loading can tell."""
    (weights,) = (out / "backup").glob("*.weights.h5")
    fm.build_model("float32", "improved", total_steps=1).save_weights(weights)
    edit_state(out, lambda state: state.update(weights_sha256=fm.file_sha256(weights)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, fragments",
    [
        (truncate_weights, ["epoch-2.weights.h5 is missing or damaged"]),
        (lambda out: next((out / "backup").glob("*.h5")).unlink(), ["missing or damaged"]),
        (lambda out: (out / "backup" / "state.json").write_text('{"form'), ["cannot be read"]),
        (lambda out: (out / "backup" / "state.json").write_text("[]"), ["cannot be read"]),
        (
            lambda out: edit_state(
                out, lambda s: s["progress"].update(epochs_completed=3), keep_checksum=True
            ),
            ["state.json has been changed or damaged"],
        ),
        (lambda out: edit_state(out, lambda s: s.update(format=0)), ["another version"]),
        (lambda out: edit_state(out, lambda s: s.update(command="finetune")), ["finetune run"]),
        (foreign_weights, ["its backup does not fit this model"]),
    ],
)
def test_damaged_or_foreign_backup_is_refused_and_left_alone(
    run_main, data, unfinished, damage, fragments
):
    damage(unfinished)
    before = folder_state(unfinished)
    result = run_main(*training(data, unfinished))
    assert_clean_failure(result, *fragments)
    if "finetune" not in fragments[0]:
        assert "to start over, add --overwrite" in result.stderr
    assert folder_state(unfinished) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--batch-size", "64"], "was started with --batch-size 32, not 64"),
        (["--seed", "4"], "was started with --seed 3, not 4"),
        (["--arch", "improved"], "was started with --arch seed, not improved"),
        (["--validation-split", "0.3"], "was started with --validation-split 0.2, not 0.3"),
        (["--augment"], "was started without --augment"),
        (["--epochs", "1"], "--epochs 1: {out} has completed 2 epochs already"),
        (["--data-dir", "OTHER"], "was started from another data set"),
    ],
)
def test_continuing_with_other_options_is_refused_and_changes_nothing(
    run_main, data, unfinished, tmp_path, options, fragment
):
    if "OTHER" in options:
        options = ["--data-dir", make_dataset(tmp_path / "other", n_train=3000, n_test=200, seed=1)]
    before = folder_state(unfinished)
    result = run_main(*training(data, unfinished), *options)
    assert_clean_failure(result, fragment.format(out=unfinished))
    assert folder_state(unfinished) == before


@pytest.mark.slow
def test_overwrite_starts_over_and_resume_needs_an_unfinished_run(
    run_main, data, unfinished, tmp_path
):
    result = run_main(*training(data, unfinished), "--epochs", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "Continuing" not in result.stdout
    assert finished(unfinished)["epochs_completed"] == 1
    result = run_main(*training(data, unfinished), "--resume")
    assert_clean_failure(result, f"--resume: {unfinished} holds no unfinished run")
    result = run_main("--data-dir", data, "--resume", cwd=tmp_path)
    assert_clean_failure(result, "--resume: no unfinished training run under runs/")


@pytest.mark.slow
def test_a_backup_holds_weights_adam_and_dropout_state_and_restores_them(tmp_path):
    """In process: what is saved after an epoch comes back into a freshly built model, and a
    failure between writing the weights and state.json leaves the previous backup usable."""
    labels = np.arange(64) % 10
    images = distinct_images(labels)
    keras.utils.set_random_seed(0)
    model = fm.build_model("float32", "improved", total_steps=4)
    run = fm.Run(tmp_path, "training", {"--seed": 0}, None)
    epoch = lambda epoch: fm.batches(images, labels, 32, epoch_key=(0, epoch))  # noqa: E731
    fm.train_run(model, run, epoch, None, 1)
    state = [v.numpy() for v in model.variables + model.optimizer.variables]

    def crash(*args):
        raise OSError("the machine went away")

    original, fm.save_json = fm.save_json, crash
    try:  # epoch 2's weights are written, its state.json never is
        with pytest.raises(OSError):
            backup = fm.read_backup(tmp_path, "training", run.options, 2)
            fm.train_run(model, run._replace(backup=backup), epoch, None, 2)
    finally:
        fm.save_json = original
    keras.utils.set_random_seed(0)
    fresh = fm.build_model("float32", "improved", total_steps=4)
    backup = fm.read_backup(tmp_path, "training", run.options, 2)
    assert backup["progress"]["epochs_completed"] == 1
    fm.train_run(fresh, run._replace(backup=backup), epoch, None, 1)  # puts it back, trains none
    restored = [v.numpy() for v in fresh.variables + fresh.optimizer.variables]
    assert len(restored) == len(state) and int(fresh.optimizer.iterations) == 2
    for a, b in zip(state, restored):
        assert np.array_equal(a, b)
    assert len(fm.random_state(fresh)) == 2  # the two Dropout layers' seed state


@pytest.mark.slow
def test_finetune_killed_continues_to_the_unbroken_runs_numbers(unbroken, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=12, relabel=1)
    model = unbroken["out"] / "model.keras"
    command = ("finetune", model, photos, "--epochs", "8", "--out-dir")
    result = main_here(*command, tmp_path / "whole")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "killed"
    kill_at((*command, out), "Epoch 5/8")
    shutil.copytree(out, tmp_path / "other")  # unfinished, for another model below
    result = main_here(*command, out)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"Continuing {out} from epoch ") and first.endswith(" of 8")
    whole, continued = finished(tmp_path / "whole"), finished(out)
    assert continued["continued_from_epoch"] >= 4
    for key in ("before", "after", "history", "epochs_completed", "history.csv"):
        assert continued[key] == whole[key], key
    assert not (out / "backup").exists()
    # The same folder, another model: refused, nothing changed.
    before = folder_state(tmp_path / "other")
    load_trained_model(model).save(tmp_path / "copy.keras")  # the same, saved anew: another file
    result = main_here("finetune", tmp_path / "copy.keras", photos, "--out-dir", tmp_path / "other")
    assert_clean_failure(result, "was started from another model")
    assert folder_state(tmp_path / "other") == before


def test_no_room_for_a_backup_is_found_before_h5py_starts_writing(tmp_path, monkeypatch):
    """h5py cannot close a file the disk had no room for, and HDF5 then crashes at exit."""
    real = shutil.disk_usage
    monkeypatch.setattr(fm.shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    with pytest.raises(OSError) as raised:
        run = fm.Run(tmp_path, "training", {}, None)
        fm.save_backup(fm.build_model("float32"), run, {"epochs_completed": 0})
    assert raised.value.errno == errno.ENOSPC
    assert list((tmp_path / "backup").iterdir()) == []


def test_a_full_disk_is_one_line_that_says_the_same_command_continues(monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.keras")

    monkeypatch.setattr(fm, "run_training", full)
    assert fm.main(["--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and "same command" in err[0], err


@pytest.mark.slow
def test_the_same_command_continues_a_killed_run_without_out_dir(
    data, unbroken, killed_run, tmp_path
):
    """kill -9 prints nothing: the very same command, with no --out-dir, must find the run."""
    killed = shutil.copytree(killed_run, tmp_path / "runs" / "20261207-120000")
    command = training(data, tmp_path)[:-2]  # as killed_run's, less --out-dir
    result = main_here(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = "Continuing runs/20261207-120000 from epoch 3 of 4 (an unfinished run with the same"
    assert said in result.stdout
    for key in (*SAME, "history.csv"):
        assert finished(killed)[key] == unbroken[key], key
    # Finished now: the same command starts a new run.
    assert main_here(*command, "--epochs", "1", cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_the_same_command_leaves_alone_a_run_still_going_or_one_further_along():
    """Two identical commands at once must not train into one folder; nor is a run that has
    done more epochs than asked continued (and refused) when no --out-dir names it."""
    state = {"progress": {"epochs_completed": 2}}
    assert fm.can_go_on(state | {"pid": os.getpid()}, 4)  # stopped in this very process
    assert not fm.can_go_on(state | {"pid": os.getppid()}, 4)  # still going
    assert fm.can_go_on(state | {"pid": 2**22 + 7}, 4)  # past Linux's largest pid: no one's
    assert fm.can_go_on(state, 2) and not fm.can_go_on(state, 1)
    assert not fm.can_go_on(None, 4)


def test_a_run_stopped_with_overwrite_says_to_leave_it_out_to_continue(tmp_path, capsys):
    model = fm.build_model("float32")
    run = fm.Run(tmp_path, "training", {}, None, " without --overwrite")
    progress = fm.new_progress() | {"epochs_completed": 1}
    assert fm.finish_run(run, model, progress, signal.SIGINT, {}, {}, "it") == 130
    said = "Run the same command without --overwrite again to continue from epoch 2."
    assert said in capsys.readouterr().out
