"""fashion_shop/finetune.py: a model adapted to a shop's labelled photos: class folders, the
hold-out, accuracy before and after, the photos each model is shown, and every refusal."""

import json
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import distinct_images, main_here, start_program, wait_for_line
from photo_helpers import (
    HEAVY_WORK,
    colour_model,
    photo_folder,
    product_folder,
    refused_at_once,
    sharpened_model,
    worn_photo,
    write_photo,
)
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import finetune, folders, sorting
from fashion_shop.models import Kind, declared_kind, load_trained_model, scale_pixels
from fashion_shop.photos import PREPARATIONS, prepare_as_photographed, prepare_image
from fashion_shop.predict import predict_images, top_three

keras = fm.start_tensorflow_quietly()


def trained_model_path(tmp_path_factory, arch):
    """A model that knows the generated items as 28x28 images, but has never seen a photo."""
    labels = np.random.default_rng(0).integers(0, 10, 1200)
    keras.utils.set_random_seed(0)
    epochs, steps_per_epoch = 3, -(-len(labels) // 32)  # the improved model's rate needs both
    model = fm.build_model("float32", arch, total_steps=epochs * steps_per_epoch)
    fm.train(
        model,
        lambda epoch: fm.batches(distinct_images(labels, seed=1), labels, 32, epoch_key=(0, epoch)),
        None,
        epochs,
        tmp_path_factory.mktemp("log"),
    )
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return trained_model_path(tmp_path_factory, "seed")


@pytest.fixture(scope="module")
def improved_model_path(tmp_path_factory):
    """An --arch improved model: the README's advice for real photos, so tuned from too."""
    return trained_model_path(tmp_path_factory, "improved")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["seed", "improved"])
def test_finetune_learns_from_a_few_photos_and_predict_uses_it(arch, request, tmp_path):
    model_path = request.getfixturevalue("model_path" if arch == "seed" else "improved_model_path")
    photos = photo_folder(tmp_path / "photos", per_class=12, relabel=3)
    out = tmp_path / "tuned"
    result = main_here(
        "finetune", model_path, photos, "--epochs", "15", "--learning-rate", "0.01",
        "--out-dir", out, "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos_held_out"] == 20 and metrics["photos_tuned_on"] == 100  # 12 x 0.2
    assert metrics["photos"] == {name: 12 for name in fm.CLASS_NAMES}
    assert metrics["backup_seconds"] >= 0  # the time its backups took, as training's says
    assert metrics["before"]["accuracy"] <= 0.2  # the model knew these items as other classes
    assert metrics["after"]["accuracy"] >= 0.7, metrics  # chance is 0.1
    assert set(metrics["after"]["per_class"]) == set(fm.CLASS_NAMES)
    # Which photos it was tuned on, for export to leave out: one fingerprint each.
    assert len(set(metrics["tuned_photos"])) == 100
    assert {"model.keras", "metrics.json", "history.csv", "confusion_matrix.png"} <= {
        p.name for p in out.iterdir()
    }
    tuned = main_here("predict", out / "model.keras", photos / "Bag")
    assert tuned.returncode == 0 and tuned.stdout.count("\n") == 12, tuned.stderr


@pytest.mark.slow
def test_a_tuned_model_gets_photos_prepared_as_it_was_tuned_on(model_path, tmp_path):
    # Tuned on garments left on their models, it is shown them so; the Fashion-MNIST model is
    # shown the garment alone.
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    worn = worn_photo(tmp_path / "worn.png")
    out = tmp_path / "tuned"
    argv = ["finetune", str(model_path), str(photos), "--epochs", "1", "--holdout", "0"]
    assert fm.main([*argv, "--out-dir", str(out)]) == 0
    tuned = out / "model.keras"
    assert declared_kind(model_path) == Kind("fashion-mnist", mirrored=False)
    assert declared_kind(tuned) == Kind("as photographed", mirrored=False)
    assert PREPARATIONS[declared_kind(tuned).photos] is prepare_as_photographed
    as_photographed, alone = prepare_as_photographed(worn), prepare_image(worn)
    assert np.abs(as_photographed.astype(int) - alone).mean() > 40
    model = load_trained_model(tuned)
    answer = predict_images(model, [worn])[0]["top3"]
    shown = top_three(model.predict(scale_pixels(as_photographed[None]), verbose=0)[0])
    # The same, within rounding: predict asks for a whole batch, rounded a little otherwise.
    assert [a["class"] for a in answer] == [a["class"] for a in shown]
    assert [a["probability"] for a in answer] == pytest.approx(
        [a["probability"] for a in shown], abs=1e-5
    )


@pytest.mark.slow
def test_before_is_measured_on_the_photos_as_predict_shows_them(model_path, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos", per_class=5, classes=[1])
    (photos / "T-shirt-top").mkdir()
    for i in range(5):
        worn_photo(photos / "T-shirt-top" / f"{i}.png")
    paths, labels = zip(*folders.find_labelled_photos(photos))
    held_out = [paths[i] for i in finetune.hold_out_photos(np.array(labels), 0.4, seed=42)[1]]
    worn = [path for path in held_out if path.parent.name == "T-shirt-top"]
    assert len(worn) == 2 and (prepare_image(worn[0]) != prepare_as_photographed(worn[0])).any()
    shown, measure = [], finetune.photo_accuracy

    def measured(model, images, labels):
        shown.append(images)
        return measure(model, images, labels)

    monkeypatch.setattr(finetune, "photo_accuracy", measured)
    # The Fashion-MNIST model sees worn garments taken off their models; a tuned one as shot.
    model = model_path
    for expected, out in [(prepare_image, "first"), (prepare_as_photographed, "again")]:
        shown.clear()
        argv = ["finetune", str(model), str(photos), "--epochs", "1", "--holdout", "0.4"]
        assert fm.main([*argv, "--out-dir", str(tmp_path / out)]) == 0
        assert (shown[0] == np.stack([expected(path) for path in held_out])).all()  # before
        model = tmp_path / out / "model.keras"


def test_doubtful_csv_said_in_a_line_and_an_earlier_runs_removed_where_none_is_made(
    tmp_path, capsys
):
    run, folder = SimpleNamespace(out_dir=tmp_path / "run"), tmp_path / "shop"
    run.out_dir.mkdir()
    photos = [(folder / "Bag" / "a.jpg", 8), (folder / "Bag" / "b.jpg", 8)]
    photos += [(folder / "Trouser" / "c.jpg", 1), (folder / "Trouser" / "d.jpg", 1)]
    probabilities = np.full((4, 10), 0.01)
    probabilities[[0, 2, 3], [8, 1, 1]] = 0.91
    probabilities[1, 1] = 0.91  # b.jpg, in Bag, shows trousers
    assert finetune.list_doubtful(run, folder, photos, probabilities) == 1
    listed = run.out_dir / "doubtful.csv"
    assert capsys.readouterr().out == (
        f"1 photo whose folder the model doubts: {listed} (check them: review {folder} "
        f"--queue {listed})\n"
    )
    # A run that makes no list (too few photos, stopped) leaves none of an earlier run's.
    assert finetune.list_doubtful(run, folder, photos, None) is None
    assert not listed.exists()
    probabilities[1] = probabilities[0]
    assert finetune.list_doubtful(run, folder, photos, probabilities) == 0
    assert (
        capsys.readouterr().out == f"No photos whose folder the model doubts: {listed} lists none\n"
    )


def test_finetune_holds_out_the_same_photos_for_the_same_seed():
    labels = np.repeat(np.arange(3), [5, 10, 2])
    tune, held = finetune.hold_out_photos(labels, 0.2, seed=3)
    again, held_again = finetune.hold_out_photos(labels, 0.2, seed=3)
    assert (tune == again).all() and (held == held_again).all()
    assert sorted([*tune, *held]) == list(range(17))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [1, 2, 1]
    # --holdout 0: every photo tuned on, even a class's only one.
    tune, held = finetune.hold_out_photos(np.array([0, 1, 1]), 0, seed=3)
    assert tune.tolist() == [0, 1, 2] and held.size == 0
    # Unchecked guesses (--include-unsure) are tuned on, never held out: they measure nothing.
    guesses = np.zeros(17, bool)
    guesses[[0, 5, 6, 12]] = True
    tune, held = finetune.hold_out_photos(labels, 0.2, seed=3, tune_only=guesses)
    assert sorted([*tune, *held]) == list(range(17)) and not guesses[held].any()
    assert [int((labels[held] == c).sum()) for c in range(3)] == [1, 1, 1]  # of 4, 7, 2
    # The same photos held out as without guesses, where there are none.
    none = finetune.hold_out_photos(labels, 0.2, seed=3, tune_only=np.zeros(17, bool))
    assert (none[1] == finetune.hold_out_photos(labels, 0.2, seed=3)[1]).all()


def write_bad_folder(root, case):
    """One bad input for finetune, as a folder under root."""
    image = distinct_images(np.array([0]))[0]
    folder = root / case
    if case == "none":
        folder.mkdir(parents=True)
    elif case == "unknown":
        write_photo(folder / "Hats" / "a.jpg", image)
        write_photo(folder / "Bag" / "a.jpg", image)
    elif case == "empty":
        write_photo(folder / "Bag" / "a.jpg", image)
        (folder / "Coat").mkdir()
    elif case == "text":
        write_photo(folder / "Bag" / "a.jpg", image)
        (folder / "Bag" / "b.txt").write_text("notes")
    elif case == "damaged":
        write_photo(folder / "Bag" / "a.jpg", image)
        (folder / "Bag" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    elif case == "blank":
        write_photo(folder / "Bag" / "a.jpg", image)
        Image.new("RGB", (300, 400), "white").save(folder / "Bag" / "b.jpg")
    elif case == "few":
        for n in range(3):
            write_photo(folder / "Bag" / f"{n}.jpg", image)
        write_photo(folder / "Coat" / "a.jpg", image)
    elif case == "unchecked":  # a sorted catalogue's unsure folders, none checked yet
        for n, name in enumerate(["Bag", "Bag", "Coat"]):
            write_photo(folder / name / "unsure" / f"{n}.jpg", image)
    elif case == "loose":
        write_photo(folder / "Bag" / "a.jpg", image)
        write_photo(folder / "stray.jpg", image)
    elif case == "file":
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("not a folder")
    return folder


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("none", ["no class subfolders"]),
        ("unknown", ["Hats: names no class", "Ankle boot"]),  # and lists the names it takes
        ("empty", ["Coat: no png or jpeg photos"]),
        ("text", ["b.txt", "refuses it rather than skip"]),
        ("damaged", ["b.jpg", "damaged image"]),
        ("blank", ["b.jpg", "a blank photo"]),
        ("few", ["too few photos for the hold-out", "Coat has 1", "or --holdout 0"]),
        ("unchecked", ["all 3 photos are unchecked guesses in unsure/", "--include-unsure"]),
        ("loose", ["stray.jpg", "has no label"]),
        ("file", ["not a folder"]),
        ("nowhere", ["no such folder"]),
    ],
)
def test_finetune_bad_folder_one_line_at_once_nothing_written(
    model_path, tmp_path, monkeypatch, capsys, case, fragments
):
    folder = write_bad_folder(tmp_path / "bad", case) if case != "nowhere" else tmp_path / "x"
    out = tmp_path / "out"
    line = refused_at_once(monkeypatch, capsys, "finetune", model_path, folder, "--out-dir", out)
    assert all(fragment.lower() in line.lower() for fragment in fragments), line
    assert not out.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.keras", "no such model file"),
        (lambda d: write_photo(d / "photo.jpg", distinct_images(np.array([1]))[0]), "comes first"),
    ],
    ids=["a missing model", "a photo for the model"],
)
def test_a_model_file_that_is_no_model_is_refused_before_the_photos_are_prepared(
    tmp_path, monkeypatch, capsys, make, message
):
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    argv = ["finetune", make(tmp_path), photos, "--out-dir", tmp_path / "out"]
    heavy = (*HEAVY_WORK, "prepare_photos")
    assert message in refused_at_once(monkeypatch, capsys, *argv, heavy=heavy)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "out, message",
    [("/proc/no-such/run", "cannot write there"), ("{photo}", "a file, not a folder")],
    ids=["not writable", "a file"],
)
def test_an_out_dir_that_cannot_be_written_is_refused_before_the_photos_are_prepared(
    model_path, tmp_path, monkeypatch, capsys, out, message
):
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    out = out.format(photo=photos / "Trouser" / "002.jpg")
    argv = ["finetune", model_path, photos, "--out-dir", out]
    line = refused_at_once(monkeypatch, capsys, *argv, heavy=(*HEAVY_WORK, "prepare_photos"))
    assert f"--out-dir {out}: {message}" in line


def test_finetune_into_the_folder_of_the_model_it_tunes_leaves_the_model_alone(
    model_path, tmp_path, monkeypatch, capsys
):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.keras").write_bytes(model_path.read_bytes())  # put there by hand
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    argv = ["finetune", models / "model.keras", photos, "--out-dir", models]
    line = refused_at_once(monkeypatch, capsys, *argv, heavy=(*HEAVY_WORK, "prepare_photos"))
    assert "holds a model.keras that this run would replace" in line and "--overwrite" in line
    assert (models / "model.keras").read_bytes() == model_path.read_bytes()
    assert [p.name for p in models.iterdir()] == ["model.keras"]
    # --resume with an --out-dir that holds no unfinished run: said at once, too.
    argv = ["finetune", model_path, photos, "--out-dir", tmp_path / "new", "--resume"]
    line = refused_at_once(monkeypatch, capsys, *argv, heavy=(*HEAVY_WORK, "prepare_photos"))
    assert "--resume: " in line and "holds no unfinished run" in line


def test_folder_then_model_is_told_the_order(model_path, tmp_path, monkeypatch, capsys):
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    argv = ["finetune", photos, model_path, "--out-dir", tmp_path / "out"]
    line = refused_at_once(monkeypatch, capsys, *argv, heavy=(*HEAVY_WORK, "prepare_photos"))
    assert "MODEL comes first, then FOLDER" in line, line
    assert f"finetune {model_path} {photos}" in line
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_a_model_of_another_shape(tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    rgb = tmp_path / "rgb.keras"
    layers = [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    keras.Sequential(layers).save(rgb)
    out = tmp_path / "out-model"
    result = main_here("finetune", rgb, photos, "--out-dir", out)
    assert result.returncode == 1 and "not a 28x28x1" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def colour_model_path(tmp_path_factory):
    """A small untrained model of a --backbone model's shape: photos 224x224x3 -> 10 classes."""
    return colour_model(tmp_path_factory.mktemp("colour") / "model.keras")


def test_finetune_without_backbone_refuses_a_colour_model_at_once(
    colour_model_path, tmp_path, monkeypatch, capsys
):
    photos = product_folder(tmp_path / "photos", per_class=2)
    out = tmp_path / "out"
    argv = ["finetune", colour_model_path, photos, "--out-dir", out]
    line = refused_at_once(monkeypatch, capsys, *argv, heavy=(*HEAVY_WORK, "prepare_photos"))
    assert "a model from finetune --backbone" in line and "run finetune --backbone" in line
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_during_finetune_saves_what_was_learned(model_path, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=6)
    out = tmp_path / "out"
    process = start_program(
        "finetune", model_path, photos, "--epochs", "100000", "--out-dir", out
    )  # fmt: skip
    try:
        wait_for_line(process, "Epoch 2/")  # training has begun once an epoch is done
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # if the signal was ignored, the very bug this looks for
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "after:" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and 1 <= metrics["epochs_completed"] < 100000
    assert load_trained_model(out / "model.keras").count_params() == 93_322


@pytest.fixture(scope="module")
def sure_of_some(tmp_path_factory):
    """A model sure of some photos and not of others, named as a calibrated one is: predict
    --sort-into marks the unsure by default."""
    return sharpened_model(tmp_path_factory.mktemp("sure-of-some") / "model.keras")


@pytest.mark.slow
def test_a_sorted_catalogue_is_learned_from_what_a_person_checked(sure_of_some, tmp_path):
    """Point 5 of issue 47: the photos still in unsure/ are the model's unchecked guesses;
    finetune says what it learns from and leaves them out unless --include-unsure."""
    photos = photo_folder(tmp_path / "photos", per_class=3)
    out = tmp_path / "sorted"
    assert main_here("predict", sure_of_some, photos, "--sort-into", out).returncode == 0
    unsure = sorted(rel for rel in sorting.scan(out) if sorting.UNSURE in rel.parts)
    assert 4 <= len(unsure) <= 26, unsure  # some sure, some not: else this proves little
    # A person checks two: one the model had right, one it had wrong.
    confirmed, corrected = unsure[0], unsure[1]
    (out / confirmed).rename(out / confirmed.parts[0] / confirmed.name)
    other = next(f for f in ("Bag", "Coat") if f != corrected.parts[0])
    (out / other).mkdir(exist_ok=True)
    (out / corrected).rename(out / other / corrected.name)
    left, sure = len(unsure) - 2, 30 - len(unsure)

    argv = ["finetune", sure_of_some, out, "--epochs", "1", "--holdout", "0"]
    result = main_here(*argv, "--out-dir", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    assert (
        f"A sorted catalogue: 2 checked by a person (1 of them corrected), {sure} sure answers "
        f"as predict sorted them, {left} unchecked guesses in unsure/ left out (--include-unsure "
        "tunes on them too)"
    ) in result.stdout
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["photos_tuned_on"] == 2 + sure and metrics["unchecked_in_unsure"] == left
    assert metrics["checked_by_a_person"] == 2 and metrics["corrected_by_a_person"] == 1
    assert metrics["sure_as_sorted"] == sure and not metrics["unchecked_tuned_on"]

    result = main_here(*argv, "--include-unsure", "--out-dir", tmp_path / "all")
    assert result.returncode == 0, result.stderr
    assert f"{left} unchecked guesses in unsure/ tuned on too (--include-unsure)" in result.stdout
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["photos_tuned_on"] == 30 and metrics["unchecked_tuned_on"]
    # Every class folder emptied by a person: one line, not a traceback.
    for photo in sorting.scan(out):
        (out / photo).unlink()
    result = main_here(*argv, "--out-dir", tmp_path / "none")
    assert result.returncode == 1 and "no PNG or JPEG photos in its class folders" in result.stderr
