"""predict: classifying people's own pictures, and refusing what is not a picture or a model."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, SHOP_PHOTOS, assert_clean_failure, run_program, worn_photo, write_photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import fashion_mnist_cnn as fm

keras = fm.start_tensorflow_quietly()


def train_model(x_train, y_train, epochs, path):
    keras.utils.set_random_seed(0)
    fit, held_out = fm.split_validation(len(x_train), 0.2, seed=0)
    model = fm.build_model("float32")
    fm.train(
        model,
        lambda epoch: fm.batches(x_train, y_train, 32, fit, epoch_key=(0, epoch)),
        fm.batches(x_train, y_train, 256, held_out),
        epochs,
        path.parent,
    )
    model.save(path)
    return path


def framed_items(labels, seed=0):
    """Items whose class survives predict's trimming: an outline 2 px in from the edge around
    1 to 5 bars, across for classes 0-4, down for 5-9, of varying brightness; placed alike in
    the mirror image, as clothes are (predict also looks at each photo mirrored)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for image, label in zip(images, labels):
        image[2:26, 2:26], image[3:25, 3:25] = 255, 0
        bars = label % 5 + 1
        for n in range(bars):
            at = 4 + round(n * 18 / (bars - 1)) if bars > 1 else 13
            if label < 5:
                image[at : at + 2, 5:23] = rng.integers(150, 256)
            else:
                image[5:23, at : at + 2] = rng.integers(150, 256)
    return images


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model trained on items as predict prepares them, as a real one is on Fashion-MNIST."""
    labels = np.random.default_rng(0).integers(0, 10, 1200)
    folder = tmp_path_factory.mktemp("items")
    prepared = []
    for n, image in enumerate(framed_items(labels, seed=1)):
        Image.fromarray(image).save(folder / f"{n}.png")
        prepared.append(fm.prepare_image(folder / f"{n}.png"))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    return train_model(np.stack(prepared), labels, 3, path)


def as_picture_files(image, folder, stem):
    """The same item as a 28x28 grey PNG and as a large dark-on-light RGB photo-like JPEG."""
    small = folder / f"{stem}-small.png"
    Image.fromarray(image).save(small)
    large = np.kron(255 - image, np.ones((12, 12), np.uint8))  # 336x336, inverted
    large = np.pad(large, ((40, 40), (90, 90)), constant_values=255)  # white margins, wide
    big = folder / f"{stem}-large.jpg"
    Image.fromarray(large).convert("RGB").save(big, quality=95)
    return small, big


def predict_json(capsys, *args):
    code = fm.main(["predict", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_small_grey_and_large_light_rgb_of_one_item_agree(model_path, tmp_path, capsys):
    labels = np.arange(10)
    images = framed_items(labels, seed=5)
    files = []
    for label, image in zip(labels, images):
        files += as_picture_files(image, tmp_path, f"item{label}")
    code, results, err = predict_json(capsys, model_path, *files)
    assert code == 0 and err == ""
    classes = [r["top3"][0]["class"] for r in results]
    assert classes[0::2] == classes[1::2]  # small and large versions agree, item by item
    assert sum(c == fm.CLASS_NAMES[label] for c, label in zip(classes[0::2], labels)) >= 8


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/fashion-mnist absent")
def test_real_test_images_as_photos_keep_their_class(tmp_path, capsys):
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(SHARED / "sample")
    model = train_model(x_train, y_train, 8, tmp_path / "real.keras")
    capsys.readouterr()  # the loader's note about unofficial data
    picks = [0, 35, 65, 95, 125, 155, 185, 215, 245, 275]  # one item of each class
    files = []
    for index in picks:
        files += as_picture_files(x_test[index], tmp_path, f"real{index}")
    code, results, _ = predict_json(capsys, model, *files)
    classes = [r["top3"][0]["class"] for r in results]
    agree = sum(a == b for a, b in zip(classes[0::2], classes[1::2]))
    assert code == 0 and agree >= 8, classes


def test_prepare_image_makes_a_centred_light_on_dark_28x28(tmp_path):
    picture = np.full((300, 200, 3), 250, np.uint8)  # white background, portrait
    picture[100:200, 80:120] = 20  # a dark object, off to one side of centre
    Image.fromarray(picture).save(tmp_path / "p.png")
    image = fm.prepare_image(tmp_path / "p.png")
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert image[14, 14] > 200 and image[0, 0] < 20  # light object, dark background
    rows, cols = np.nonzero(image > 128)
    assert rows.min() <= 1 and rows.max() >= 26  # the object's long side fills the frame
    assert abs(cols.mean() - 13.5) < 1.5  # centred, aspect kept (narrow object stays narrow)
    assert cols.max() - cols.min() < 16


@pytest.mark.parametrize("size", [(600, 4), (4, 600)])  # a belt, lying or hanging
def test_an_item_far_longer_than_thick_keeps_a_pixel_of_thickness(tmp_path, size):
    width, height = size
    picture = np.full((height + 100, width + 100, 3), 245, np.uint8)
    picture[50 : 50 + height, 50 : 50 + width] = (60, 40, 30)
    Image.fromarray(picture).save(tmp_path / "belt.png")
    image = fm.prepare_image(tmp_path / "belt.png")
    rows, cols = np.nonzero(image > 128)
    long_side, thickness = (cols, rows) if width > height else (rows, cols)
    assert np.ptp(long_side) >= 26 and np.ptp(thickness) <= 1


@pytest.mark.parametrize("size", [(150, 100), (600, 400)])  # kept as it is, and shrunk first
@pytest.mark.parametrize("prepare", [fm.prepare_image, fm.prepare_colour])
def test_a_16_bit_grey_png_is_prepared_as_its_8_bit_copy(tmp_path, size, prepare):
    height, width = size
    picture = np.full(size, 240, np.uint16)
    picture[height // 6 : -height // 6, width // 3 : -width // 3] = 40
    picture[height // 4 : height // 3, width // 3 : width // 2] = 90
    Image.fromarray(picture.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(picture * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    assert (prepare(tmp_path / "16.png") == prepare(tmp_path / "8.png")).all()


# Fuzzing: whatever picture arrives, each preparation returns its array or one clear error.
PREPARED_SHAPES = {
    fm.prepare_image: (28, 28),
    fm.prepare_as_photographed: (28, 28),
    fm.prepare_colour: (224, 224, 3),
}
colours = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.tuples(st.integers(1, 640), st.integers(1, 640)),
    background=colours,
    items=st.lists(st.tuples(st.integers(0, 640), st.integers(0, 640), colours), max_size=3),
    thickness=st.integers(1, 640),
    mode=st.sampled_from(["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "CMYK"]),
    jpeg=st.booleans(),
)
def test_fuzz_any_picture_is_prepared_or_refused(
    tmp_path, size, background, items, thickness, mode, jpeg
):
    picture = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(picture)
    for x, y, colour in items:  # from thin strips to blocks: a belt, a shoe, a coat
        draw.rectangle([x, y, x + thickness, y + max(1, 640 // thickness)], fill=colour)
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257)
    else:
        picture = picture.convert(mode)
    jpeg = mode == "CMYK" or (jpeg and mode in ("RGB", "L"))  # PNG has no CMYK
    path = tmp_path / ("fuzz.jpg" if jpeg else "fuzz.png")
    picture.save(path, "JPEG" if jpeg else "PNG")
    for prepare, shape in PREPARED_SHAPES.items():
        try:
            prepared = prepare(path)
        except fm.UserError as error:
            assert "a blank photo" in str(error)  # the only refusal a valid picture may get
            continue
        assert prepared.shape == shape and prepared.dtype == np.uint8


def test_shoes_are_turned_to_point_left_as_in_fashion_mnist(tmp_path):
    boot = np.zeros((28, 28), np.uint8)
    boot[4:24, 3:10] = 200  # the shaft, on the left
    boot[17:24, 3:25] = 200  # the foot, its toe to the right
    assert (fm.taller_end_right(boot) == boot[:, ::-1]).all()
    assert (fm.taller_end_right(boot[:, ::-1]) == boot[:, ::-1]).all()  # pointing left: kept
    shirt = np.zeros((28, 28), np.uint8)
    shirt[3:25, 2:26] = 180
    assert (fm.taller_end_right(shirt) == shirt).all()
    # A photo of a boot pointing right comes out as the same boot pointing left.
    right = write_photo(tmp_path / "right.jpg", boot)
    left = write_photo(tmp_path / "left.jpg", np.ascontiguousarray(boot[:, ::-1]))
    prepared_right, prepared_left = fm.prepare_image(right), fm.prepare_image(left)
    assert np.abs(prepared_right.astype(int) - prepared_left).mean() < 3
    assert prepared_left[:, 18:].sum() > prepared_left[:, :10].sum()  # the shaft on the right


def test_a_shoe_shot_at_an_angle_is_turned_to_stand_level(tmp_path):
    boot = np.zeros((120, 200), np.uint8)
    boot[60:90, 20:180] = 200  # the foot
    boot[30:60, 120:180] = 200  # the shaft
    tilted = np.asarray(Image.fromarray(boot).rotate(-15, Image.Resampling.BILINEAR, expand=True))
    level = fm.levelled(tilted, fm.median_box(tilted > fm.ITEM_LEVEL))
    left, top, right, bottom = fm.median_box(level > fm.ITEM_LEVEL)
    mask = level[top:bottom, left:right] > fm.ITEM_LEVEL
    columns = np.flatnonzero(mask.any(axis=0))
    lowest = mask.shape[0] - 1 - np.argmax(mask[::-1, columns], axis=0)
    assert abs(np.polyfit(columns, lowest, 1)[0]) < 0.02  # its sole level again (0.18 tilted)
    level_already = fm.levelled(boot, fm.median_box(boot > fm.ITEM_LEVEL))
    assert (level_already == boot).all()  # left as it is
    # Photographed tilted, it prepares as it does level: 8 apart (40 if not turned).
    photos = []
    for name, item in [("level.png", boot), ("tilted.png", tilted)]:
        Image.fromarray(255 - item).convert("RGB").save(tmp_path / name)
        photos.append(fm.prepare_image(tmp_path / name).astype(int))
    assert np.abs(photos[0] - photos[1]).mean() < 15
    # A tuned model learned the shop's photos as they were shot: for it, the shoe stays tilted.
    as_shot = fm.prepare_as_photographed(tmp_path / "tilted.png")
    assert np.abs(as_shot - photos[1]).mean() > 25


def test_a_dim_shoe_is_lit_as_fashion_mnist_shoes_are(tmp_path):
    # A white sneaker on white: a faint body, a sole and stripes that stand out.
    shoe = np.zeros((28, 28), np.uint8)
    shoe[10:20, 1:27] = 70
    shoe[20:23, 1:27] = 230
    shoe[12:18, 9:11] = shoe[12:18, 15:17] = 230
    lying = fm.prepare_image(write_photo(tmp_path / "shoe.jpg", shoe))
    standing = fm.prepare_image(write_photo(tmp_path / "garment.jpg", np.ascontiguousarray(shoe.T)))
    # Wider than tall it is a shoe, brightened (149); standing, a garment, left as it is (64).
    assert np.median(lying[lying > 40]) > 135 and np.median(standing[standing > 40]) < 80
    # brightened puts the median where Fashion-MNIST's is, and leaves a lit item alone.
    dim = Image.fromarray(np.linspace(41, 120, 280).reshape(10, 28).astype(np.uint8))
    assert abs(np.median(np.asarray(fm.brightened(dim))) - fm.SHOE_MEDIAN) <= 1
    lit = Image.fromarray(np.full((10, 28), 200, np.uint8))
    assert fm.brightened(lit) is lit


def test_a_garment_worn_by_a_model_is_prepared_as_the_garment_alone(tmp_path):
    worn = worn_photo(tmp_path / "worn.png")
    alone = worn_photo(tmp_path / "alone.png", worn=False)
    # The T-shirt alone, laid out as Fashion-MNIST's tops are: 3/4 as wide as tall (156 x 150 px).
    laid_flat = tmp_path / "laid_flat.png"
    with Image.open(alone) as photo:
        photo.resize((round(photo.width * 112.5 / 156), photo.height)).save(laid_flat)
    picture = fm.open_picture(worn, fit=224)
    left, top, right, bottom = fm.median_box(np.asarray(picture.convert("L")) < 240)
    x, y, w, h = fm.find_face(picture, (left, top, right, bottom))
    assert top <= y and y + h < top + (bottom - top) / 3 and abs(x + w / 2 - 112 * 224 / 300) < 6
    # Head, forearms and trousers gone, the shoulders narrowed: 12 from the T-shirt laid flat (56
    # with the model left in, 45 not narrowed).
    prepared = fm.prepare_image(worn)
    assert np.abs(prepared - fm.prepare_image(laid_flat).astype(int)).mean() < 18
    assert fm.find_face(fm.open_picture(alone, fit=224), (0, 0, 168, 224)) is None
    # Only a worn garment is narrowed: the T-shirt alone keeps its width.
    assert np.count_nonzero(prepared.any(axis=0)) == 21
    assert np.count_nonzero(fm.prepare_image(alone).any(axis=0)) == 28


def test_a_face_that_is_not_skin_coloured_is_not_a_model(tmp_path):
    # A grey face printed on a T-shirt or a bag: found by the detector, refused by the skin test.
    grey_face = worn_photo(tmp_path / "print.png", skin=(150, 150, 150))
    picture = fm.open_picture(grey_face, fit=224)
    found = fm.face_detector().detectMultiScale(np.asarray(picture.convert("L")), 1.1, 5)
    assert len(found) == 1
    assert fm.find_face(picture, (0, 0, *picture.size)) is None


@pytest.mark.skipif(not SHOP_PHOTOS.is_dir(), reason="../shared/product-photos absent")
def test_models_faces_are_found_in_real_shop_photos_and_nowhere_else():
    def faces(folder):
        found = []
        for path in sorted((SHOP_PHOTOS / folder).iterdir()):
            picture = fm.open_picture(path, fit=224)
            box = fm.median_box(np.asarray(picture.convert("L")) < 235)
            found.append(fm.find_face(picture, box) is not None)
        return np.mean(found)

    assert faces("Shirt") > 0.7  # nearly every shirt is worn by a model (88% found)
    assert faces("Sneaker") == faces("Bag") == faces("Ankle boot") == 0


def test_median_box_is_pillows_median_filter_exactly():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    for density in [0.0, 0.05, 0.3, 0.5, 0.7]:
        for _ in range(40):
            shape = tuple(rng.integers(1, 40, 2))
            mask = rng.random(shape) < density
            mask[: rng.integers(0, 3)] = True  # items touching the edge, now and then
            pillow = Image.fromarray(mask.astype(np.uint8) * 255).filter(
                ImageFilter.MedianFilter(3)
            )
            assert fm.median_box(mask) == pillow.getbbox(), (density, mask.astype(int))


def test_prints_top_three_per_image(model_path, tmp_path, capsys):
    small, _ = as_picture_files(framed_items(np.array([3]))[0], tmp_path, "x")
    assert fm.main(["predict", str(model_path), str(small)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{small}: ") and line.count("%") == 3


def test_json_has_three_probabilities_per_image(model_path, tmp_path, capsys):
    small, big = as_picture_files(framed_items(np.array([7]))[0], tmp_path, "x")
    code, results, _ = predict_json(capsys, model_path, small, big)
    assert code == 0 and [r["image"] for r in results] == [str(small), str(big)]
    for result in results:
        probabilities = [c["probability"] for c in result["top3"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(c["class"] in fm.CLASS_NAMES for c in result["top3"])


def png_claiming_size(path, width, height):
    """A tiny PNG whose header claims width x height pixels: a decompression bomb."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def bad_images(folder):
    (folder / "notes.png").write_text("this is text, not a picture")
    Image.new("L", (64, 64), 128).save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    Image.new("L", (40, 40)).save(folder / "picture.gif")
    Image.new("RGB", (300, 400), (230, 225, 220)).save(folder / "blank.jpg")  # a placeholder
    return {
        "missing.png": "no such image file",
        "notes.png": "not a png or jpeg",
        "truncated.png": "damaged image",
        "bomb.png": "pillow's safety limit",
        "half-bomb.png": "pillow's safety limit",
        "picture.gif": "expected png or jpeg",
        "blank.jpg": "a blank photo",
    }


def test_a_model_trained_on_mirror_images_sees_each_photo_both_ways(model_path, tmp_path, capsys):
    model = fm.load_trained_model(model_path)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), np.uint8)
    plain, mirror = (
        model.predict(fm.scale_pixels(x), verbose=0) for x in (images, images[..., ::-1])
    )
    assert np.allclose(fm.class_probabilities(model, images), plain, atol=1e-6)
    assert not np.allclose(plain, mirror, atol=1e-3)  # so the test can tell the two apart
    model.name = "fashion_mnist_cnn" + fm.MIRRORED  # as an --augment run names it
    averaged = fm.class_probabilities(model, images)
    assert np.allclose(averaged, (plain + mirror) / 2, atol=1e-6)
    assert np.allclose(fm.class_probabilities(model, images[..., ::-1]), averaged, atol=1e-6)
    # and predict, given that model's file, answers so
    model.save(tmp_path / "mirrored.keras")
    small, _ = as_picture_files(framed_items(np.array([2]))[0], tmp_path, "x")
    code, (result,), _ = predict_json(capsys, tmp_path / "mirrored.keras", small)
    image = fm.prepare_image(small)[np.newaxis]
    expected = (
        sum(model.predict(fm.scale_pixels(x), verbose=0) for x in (image, image[..., ::-1])) / 2
    )[0]
    top3 = fm.top_three(expected)
    assert code == 0 and [c["class"] for c in result["top3"]] == [c["class"] for c in top3]
    for got, want in zip(result["top3"], top3):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_bad_images_are_reported_and_the_rest_still_classified(model_path, tmp_path, capsys):
    expected = bad_images(tmp_path)
    png_claiming_size(tmp_path / "bomb.png", 30_000, 30_000)  # past 2x Pillow's limit: error
    png_claiming_size(tmp_path / "half-bomb.png", 10_000, 10_000)  # past 1x: only a warning
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    names = [
        "missing.png",
        "notes.png",
        str(good),
        "truncated.png",
        "bomb.png",
        "half-bomb.png",
        "picture.gif",
        "blank.jpg",
    ]
    code = fm.main(["predict", str(model_path), *[str(tmp_path / n) for n in names]])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip().startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    errors = err.strip().splitlines()
    assert len(errors) == len(expected)
    for line, (name, message) in zip(errors, expected.items()):
        assert name in line and message in line.lower(), line


def text_file(path):
    path.write_text("not a model")
    return path


def cut_short(path):
    path.write_bytes(path.read_bytes()[:1000])  # as a copy stopped midway leaves it
    return path


def save_model(path, input_shape, classes, lambda_layer=False):
    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    if lambda_layer:
        layers.append(keras.layers.Lambda(lambda x: x * 2))  # code stored in the file
    model = keras.Sequential([*layers, keras.layers.Dense(classes, activation="softmax")])
    path.parent.mkdir(exist_ok=True)
    model.save(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.keras", "no such model file"),
        (lambda d: save_model(d / "run" / "model.keras", (28, 28, 1), 10).parent, "run's model is"),
        (lambda d: text_file(d / "text.keras"), "not a keras model file, or a damaged one"),
        (lambda d: cut_short(save_model(d / "cut.keras", (28, 28, 1), 10)), "or a damaged one"),
        (lambda d: as_picture_files(framed_items(np.array([1]))[0], d, "photo")[0], "comes first"),
        (lambda d: save_model(d / "rgb.keras", (32, 32, 3), 10), "not a 28x28x1 image"),
        (lambda d: save_model(d / "five.keras", (28, 28, 1), 5), "to 10 fashion-mnist classes"),
        (lambda d: save_model(d / "code.keras", (28, 28, 1), 10, True), "not a usable"),
    ],
)
def test_unusable_models_are_refused(tmp_path, capsys, make, message):
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", str(make(tmp_path)), str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0].lower(), err


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Bad layer. Details follow.\nMore.", "(Bad layer)"),
        (". Odd", "(ValueError)"),
        ("\n. Odd", "(ValueError)"),
        ("", "(ValueError)"),
        ("x" * 300, "(ValueError)"),
    ],
)
def test_keras_reasons_for_refusing_a_model_are_one_short_line(
    model_path, tmp_path, capsys, monkeypatch, text, reason
):
    def refuse(*args, **kwargs):
        raise ValueError(text)

    monkeypatch.setattr(keras.models, "load_model", refuse)
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", str(model_path), str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {model_path}: not a usable Keras model file {reason}"], err


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc")
def test_a_model_file_that_cannot_be_read_is_one_line(tmp_path, capsys):
    # Reading the start of /proc/self/mem fails (EIO), as root too, as a bad disk would.
    good, _ = as_picture_files(framed_items(np.array([1]))[0], tmp_path, "good")
    assert fm.main(["predict", "/proc/self/mem", str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/self/mem: cannot be read (" in err[0], err


def in_bf16(model_path, path):
    """The model as the default run saves it where the CPU or GPU computes bf16 natively."""
    model = fm.build_model("bfloat16")
    model.set_weights(keras.models.load_model(model_path).get_weights())
    model.save(path)
    return path


def compute_dtypes(model):
    return {layer.dtype_policy.compute_dtype for layer in [model, *model.layers]}


def test_a_bf16_model_computes_in_float32_where_bf16_is_not_native(
    model_path, tmp_path, monkeypatch
):
    bf16 = in_bf16(model_path, tmp_path / "bf16.keras")
    monkeypatch.setattr(fm, "find_gpus", lambda: [])
    monkeypatch.setattr(fm, "cpu_info", lambda: ("CPU", {"avx2", "avx512f", "avx512_bf16"}))
    kept = fm.load_trained_model(bf16)  # the model and its softmax layer compute in float32
    assert compute_dtypes(kept) == {"bfloat16", "float32"}
    monkeypatch.setattr(fm, "cpu_info", lambda: ("CPU", {"avx2", "avx512f"}))
    assert compute_dtypes(fm.load_trained_model(bf16)) == {"float32"}


def test_a_model_trained_in_bf16_predicts_on_an_avx2_cpu(model_path, tmp_path):
    # A model from a machine with native bf16, used on a laptop: oneDNN has no bf16 convolutions
    # for AVX2 CPUs, so in bf16 it would fail; in float32 it answers as a float32 model does.
    bf16 = in_bf16(model_path, tmp_path / "bf16.keras")
    small, _ = as_picture_files(framed_items(np.array([3]))[0], tmp_path, "x")
    avx2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # any machine's oneDNN then computes as an AVX2 CPU's
    result = run_program("predict", bf16, small, env=avx2)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout == run_program("predict", model_path, small, env=avx2).stdout


def test_predict_as_a_command(model_path, tmp_path):
    small, _ = as_picture_files(framed_items(np.array([2]))[0], tmp_path, "x")
    result = run_program("predict", model_path, small)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"{small}: ")
    assert_clean_failure(run_program("predict", model_path, tmp_path / "gone.png"), "no such image")
