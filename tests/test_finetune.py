"""Your own products: folders of photos, predictions to CSV, fine-tuning on labelled photos."""

import csv
import json
import signal
import time

import numpy as np
import pytest
from conftest import (
    assert_clean_failure,
    distinct_images,
    photo_folder,
    run_program,
    start_program,
    wait_for_line,
    worn_photo,
    write_photo,
)
from PIL import Image

import fashion_mnist_cnn as fm

keras = fm.start_tensorflow_quietly()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("T-shirt-top", "T-shirt/top"),
        ("t_shirt_top", "T-shirt/top"),
        ("tshirt top", "T-shirt/top"),
        ("ankle boot", "Ankle boot"),
        ("ANKLE_BOOT", "Ankle boot"),
        ("Sneaker", "Sneaker"),
        ("Sneakers", "Sneaker"),  # a catalogue's folders are plural as often as not
        ("Dresses", "Dress"),
        ("ankle boots", "Ankle boot"),
        ("T-shirts", "T-shirt/top"),  # either half of T-shirt/top
        ("Tops", "T-shirt/top"),
        ("Shirts", "Shirt"),
    ],
)
def test_class_folders_match_ignoring_case_spaces_punctuation_and_plurals(tmp_path, name, expected):
    (tmp_path / name).mkdir()
    write_photo(tmp_path / name / "a.jpg", distinct_images(np.array([0]))[0])
    [(_, label)] = fm.find_labelled_photos(tmp_path)
    assert fm.CLASS_NAMES[label] == expected


def test_preparation_removes_any_background_and_stretches_the_item(tmp_path):
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 10:18] = 230  # a tall item
    image[8:12, 12:16] = 90  # with a lighter patch (in the photo), which must keep its shade
    prepared = []
    for background, item in [((240, 240, 240), (60, 60, 60)), ((20, 20, 30), (200, 190, 170)),
                             ((40, 120, 200), (230, 200, 40))]:  # fmt: skip
        prepared.append(fm.prepare_image(write_photo(tmp_path / "p.jpg", image, background, item)))
    for result in prepared:
        assert result.shape == (28, 28) and result.dtype == np.uint8
        assert result.max() >= 250  # contrast stretched to the full range
        assert np.median(result[:, :2]) == 0 and np.median(result[:, -2:]) == 0  # background
        assert result[7:10, 12:16].mean() < result[18:24, 12:16].mean() - 60
    # Whatever the colours, the same item comes out alike.
    a, b, c = (p.astype(float) / 255 for p in prepared)
    assert np.abs(a - b).mean() < 0.08 and np.abs(a - c).mean() < 0.08


def test_transparent_cutout_is_seen_on_white(tmp_path):
    cutout = np.zeros((120, 120, 4), np.uint8)  # transparent, black underneath
    cutout[20:100, 20:60] = (40, 40, 40, 255)  # a dark half
    cutout[20:100, 60:100] = (200, 200, 200, 255)  # a light half
    Image.fromarray(cutout, "RGBA").save(tmp_path / "c.png")
    prepared = fm.prepare_image(tmp_path / "c.png").astype(int)
    # On white, as a product shot: the dark half stands out most, as in Fashion-MNIST.
    assert prepared[6:22, 4:12].mean() > prepared[6:22, 16:24].mean() + 50


@pytest.mark.parametrize("scale", [1, 12])  # 12: a 2400 px photo, decoded at a reduced scale
def test_exif_rotation_is_honoured(tmp_path, scale):
    upright = np.full((200, 100, 3), 240, np.uint8)
    upright[20:180, 40:60] = 30  # a tall dark bar
    upright = upright.repeat(scale, axis=0).repeat(scale, axis=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "s.jpg", exif=exif
    )
    rows, cols = np.nonzero(fm.prepare_image(tmp_path / "s.jpg") > 128)
    assert rows.max() - rows.min() > 2 * (cols.max() - cols.min())  # tall, as meant


def test_a_large_photo_is_shrunk_first_and_prepared_as_its_full_size_copy(tmp_path):
    path = write_photo(tmp_path / "big.jpg", distinct_images(np.array([3]))[0], size=1800)
    with Image.open(path) as image:
        image.save(tmp_path / "big.png")  # the same pixels, which no decoder can shrink
        Image.open(tmp_path / "big.png").convert("P").save(tmp_path / "palette.png")
    for name in ["big.jpg", "big.png", "palette.png"]:
        shrunk = fm.open_picture(tmp_path / name, fit=256)
        assert max(shrunk.size) == 256 and shrunk.mode == "RGB", name
    assert fm.open_picture(tmp_path / "big.png").size == image.size  # no fit: as it is
    shrunk, whole = fm.prepare_image(path), fm.prepare_image(tmp_path / "big.png")
    assert np.abs(shrunk.astype(int) - whole).mean() < 3  # grey levels of 255


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


def test_predict_takes_folders_recursively_in_sorted_order_and_writes_csv(model_path, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=1, classes=[1, 7])
    (tmp_path / "photos" / "notes.txt").write_text("not an image: not picked up from a folder")
    (tmp_path / "empty").mkdir()
    table = tmp_path / "out.csv"
    result = run_program("predict", model_path, photos, tmp_path / "empty", "--csv", table)
    expected = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert result.returncode == 1  # the empty folder is reported
    assert result.stdout.startswith("Classified 2 of 3 photos in ")  # the rows are in the CSV
    empty = f"error: {tmp_path / 'empty'}: a folder with no PNG or JPEG images in it"
    assert result.stderr.strip() == empty
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == [*expected, str(tmp_path / "empty")]
    for row in rows[:2]:
        assert row["class"] in fm.CLASS_NAMES and 0 < float(row["probability"]) <= 1
        assert row["top3"].count("%") == 3 and row["error"] == ""
    assert rows[2]["class"] == "" and "no PNG or JPEG" in rows[2]["error"]


def test_predict_csv_that_cannot_be_written(model_path, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=1, classes=[2])
    result = run_program("predict", model_path, photos, "--csv", tmp_path / "no" / "such.csv")
    assert_clean_failure(result, "--csv", "cannot write there")


@pytest.mark.parametrize("arch", ["seed", "improved"])
def test_finetune_learns_from_a_few_photos_and_predict_uses_it(arch, request, tmp_path):
    model_path = request.getfixturevalue("model_path" if arch == "seed" else "improved_model_path")
    photos = photo_folder(tmp_path / "photos", per_class=12, relabel=3)
    out = tmp_path / "tuned"
    result = run_program(
        "finetune", model_path, photos, "--epochs", "40", "--learning-rate", "0.003",
        "--out-dir", out, "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos_held_out"] == 20 and metrics["photos_tuned_on"] == 100  # 12 x 0.2
    assert metrics["photos"] == {name: 12 for name in fm.CLASS_NAMES}
    assert metrics["before"]["accuracy"] <= 0.2  # the model knew these items as other classes
    assert metrics["after"]["accuracy"] >= 0.7, metrics  # chance is 0.1
    assert set(metrics["after"]["per_class"]) == set(fm.CLASS_NAMES)
    assert {"model.keras", "metrics.json", "history.csv", "confusion_matrix.png"} <= {
        p.name for p in out.iterdir()
    }
    tuned = run_program("predict", out / "model.keras", photos / "Bag")
    assert tuned.returncode == 0 and tuned.stdout.count("\n") == 12, tuned.stderr


def test_a_tuned_model_gets_photos_prepared_as_it_was_tuned_on(model_path, tmp_path):
    # Tuned on garments left on their models, it is shown them so; the Fashion-MNIST model is
    # shown the garment alone.
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    worn = worn_photo(tmp_path / "worn.png")
    out = tmp_path / "tuned"
    argv = ["finetune", str(model_path), str(photos), "--epochs", "1", "--holdout", "0"]
    assert fm.main([*argv, "--out-dir", str(out)]) == 0
    tuned = out / "model.keras"
    assert fm.declared_preparation(model_path) is fm.prepare_image
    assert fm.declared_preparation(tuned) is fm.prepare_as_photographed
    as_photographed, alone = fm.prepare_as_photographed(worn), fm.prepare_image(worn)
    assert np.abs(as_photographed.astype(int) - alone).mean() > 40
    model = fm.load_trained_model(tuned)
    assert fm.predict_images(model, [worn])[0]["top3"] == fm.top_three(
        model.predict(fm.scale_pixels(as_photographed[None]), verbose=0)[0]
    )


def test_before_is_measured_on_the_photos_as_predict_shows_them(model_path, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos", per_class=5, classes=[1])
    (photos / "T-shirt-top").mkdir()
    for i in range(5):
        worn_photo(photos / "T-shirt-top" / f"{i}.png")
    paths, labels = zip(*fm.find_labelled_photos(photos))
    held_out = [paths[i] for i in fm.hold_out_photos(np.array(labels), 0.4, seed=42)[1]]
    worn = [path for path in held_out if path.parent.name == "T-shirt-top"]
    assert (
        len(worn) == 2 and (fm.prepare_image(worn[0]) != fm.prepare_as_photographed(worn[0])).any()
    )
    shown, measure = [], fm.photo_accuracy

    def measured(model, images, labels):
        shown.append(images)
        return measure(model, images, labels)

    monkeypatch.setattr(fm, "photo_accuracy", measured)
    # The Fashion-MNIST model sees worn garments taken off their models; a tuned one as shot.
    model = model_path
    for expected, out in [(fm.prepare_image, "first"), (fm.prepare_as_photographed, "again")]:
        shown.clear()
        argv = ["finetune", str(model), str(photos), "--epochs", "1", "--holdout", "0.4"]
        assert fm.main([*argv, "--out-dir", str(tmp_path / out)]) == 0
        assert (shown[0] == np.stack([expected(path) for path in held_out])).all()  # before
        model = tmp_path / out / "model.keras"


def test_finetune_holds_out_the_same_photos_for_the_same_seed():
    labels = np.repeat(np.arange(3), [5, 10, 2])
    tune, held = fm.hold_out_photos(labels, 0.2, seed=3)
    again, held_again = fm.hold_out_photos(labels, 0.2, seed=3)
    assert (tune == again).all() and (held == held_again).all()
    assert sorted([*tune, *held]) == list(range(17))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [1, 2, 1]
    # --holdout 0: every photo tuned on, even a class's only one.
    tune, held = fm.hold_out_photos(np.array([0, 1, 1]), 0, seed=3)
    assert tune.tolist() == [0, 1, 2] and held.size == 0


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
        ("few", ["too few photos for the hold-out", "Coat has 1"]),
        ("loose", ["stray.jpg", "has no label"]),
        ("file", ["not a folder"]),
        ("nowhere", ["no such folder"]),
    ],
)
def test_finetune_bad_folder_one_line_nothing_written(model_path, tmp_path, case, fragments):
    folder = write_bad_folder(tmp_path / "bad", case) if case != "nowhere" else tmp_path / "x"
    out = tmp_path / "out"
    result = run_program("finetune", model_path, folder, "--out-dir", out)
    assert_clean_failure(result, *fragments)
    assert not out.exists()


def test_finetune_into_the_folder_of_the_model_it_tunes_leaves_the_model_alone(
    model_path, tmp_path
):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.keras").write_bytes(model_path.read_bytes())  # put there by hand
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    result = run_program("finetune", models / "model.keras", photos, "--out-dir", models)
    assert_clean_failure(result, "holds a model.keras that this run would replace", "--overwrite")
    assert (models / "model.keras").read_bytes() == model_path.read_bytes()
    assert [p.name for p in models.iterdir()] == ["model.keras"]


def test_finetune_refuses_a_model_of_another_shape(tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=2, classes=[0, 1])
    rgb = tmp_path / "rgb.keras"
    layers = [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    keras.Sequential(layers).save(rgb)
    out = tmp_path / "out-model"
    assert_clean_failure(run_program("finetune", rgb, photos, "--out-dir", out), "not a 28x28x1")
    assert not out.exists()


def test_sigterm_during_finetune_saves_what_was_learned(model_path, tmp_path):
    photos = photo_folder(tmp_path / "photos", per_class=30)
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
    assert fm.load_trained_model(out / "model.keras").count_params() == 93_322
