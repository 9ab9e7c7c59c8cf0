"""fashion_shop/photos.py: product photos prepared as each kind of model was trained, every
way a picture can arrive, and the module's independence from TensorFlow."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, distinct_images, program_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from photo_helpers import SHOP_PHOTOS, worn_photo, write_photo
from PIL import Image, ImageDraw

from fashion_shop.photos import (
    ITEM_LEVEL,
    PREPARATIONS,
    SHOE_MEDIAN,
    PhotoError,
    brightened,
    colour_distance,
    face_detector,
    find_face,
    levelled,
    median_box,
    open_picture,
    prepare_as_photographed,
    prepare_colour,
    prepare_image,
    taller_end_right,
)

WITHOUT_TENSORFLOW = """
import sys
from pathlib import Path
from fashion_shop import photos
def loaded():
    return [name for name in ("tensorflow", "keras") if name in sys.modules]
print(loaded())
for name in photos.PREPARATIONS:  # preparing photos, too, as each preparing process does
    (image, error), = photos.prepare_chunk([Path(sys.argv[1])], name)
    assert error is None, error
print(loaded())
"""


def test_the_photo_module_imports_no_tensorflow(tmp_path):
    """The processes that prepare a catalogue's photos import this module alone (and the
    training script's file writer): TensorFlow there would cost seconds and memory in each."""
    photo = write_photo(tmp_path / "photo.jpg", distinct_images(np.array([3]))[0])
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, str(photo)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=program_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "[]"], result.stdout


# How an item is cut from its photo: background, trimming, size, contrast.


def test_prepare_image_makes_a_centred_light_on_dark_28x28(tmp_path):
    picture = np.full((300, 200, 3), 250, np.uint8)  # white background, portrait
    picture[100:200, 80:120] = 20  # a dark object, off to one side of centre
    Image.fromarray(picture).save(tmp_path / "p.png")
    image = prepare_image(tmp_path / "p.png")
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
    image = prepare_image(tmp_path / "belt.png")
    rows, cols = np.nonzero(image > 128)
    long_side, thickness = (cols, rows) if width > height else (rows, cols)
    assert np.ptp(long_side) >= 26 and np.ptp(thickness) <= 1


def test_a_grey_on_a_grey_is_its_whole_distance_in_any_precision():
    """The item map truncates distances to whole numbers: one that is whole in exact arithmetic
    must come out whole, in float32 here as in an app's float64 (export's written steps)."""
    levels = np.arange(256, dtype=np.float32)
    for background in (0.0, 12.5, 255.0):
        greys = np.stack([levels] * 3, axis=-1)
        exact = np.abs(levels - background)
        for dtype in (np.float32, np.float64):
            found = colour_distance(greys.astype(dtype), np.full(3, background, dtype))
            assert (found == exact).all(), (background, dtype)


def test_preparation_removes_any_background_and_stretches_the_item(tmp_path):
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 10:18] = 230  # a tall item
    image[8:12, 12:16] = 90  # with a lighter patch (in the photo), which must keep its shade
    prepared = []
    for background, item in [((240, 240, 240), (60, 60, 60)), ((20, 20, 30), (200, 190, 170)),
                             ((40, 120, 200), (230, 200, 40))]:  # fmt: skip
        prepared.append(prepare_image(write_photo(tmp_path / "p.jpg", image, background, item)))
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
    prepared = prepare_image(tmp_path / "c.png").astype(int)
    # On white, as a product shot: the dark half stands out most, as in Fashion-MNIST.
    assert prepared[6:22, 4:12].mean() > prepared[6:22, 16:24].mean() + 50


@pytest.mark.parametrize("step", [0, 2, 5])  # 2: as faint as an item gets
def test_both_routes_call_the_same_photos_blank(tmp_path, step):
    photo = np.full((120, 90, 3), 200, np.uint8)
    photo[40:80, 30:60] += np.uint8(step)
    Image.fromarray(photo).save(tmp_path / "p.png")
    outcomes = []
    for prepare in (prepare_image, prepare_colour):
        try:
            prepare(tmp_path / "p.png")
            outcomes.append("prepared")
        except PhotoError as error:
            assert "a blank photo" in str(error)
            outcomes.append("blank")
    assert outcomes == ["blank" if step == 0 else "prepared"] * 2


# How a picture is opened: EXIF, large photos, 16 bits, and any picture at all.


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
    rows, cols = np.nonzero(prepare_image(tmp_path / "s.jpg") > 128)
    assert rows.max() - rows.min() > 2 * (cols.max() - cols.min())  # tall, as meant


@pytest.mark.slow
def test_a_large_photo_is_shrunk_first_and_prepared_as_its_full_size_copy(tmp_path):
    path = write_photo(tmp_path / "big.jpg", distinct_images(np.array([3]))[0], size=1800)
    with Image.open(path) as image:
        image.save(tmp_path / "big.png")  # the same pixels, which no decoder can shrink
        Image.open(tmp_path / "big.png").convert("P").save(tmp_path / "palette.png")
    for name in ["big.jpg", "big.png", "palette.png"]:
        shrunk = open_picture(tmp_path / name, fit=256)
        assert max(shrunk.size) == 256 and shrunk.mode == "RGB", name
    assert open_picture(tmp_path / "big.png").size == image.size  # no fit: as it is
    shrunk, whole = prepare_image(path), prepare_image(tmp_path / "big.png")
    assert np.abs(shrunk.astype(int) - whole).mean() < 3  # grey levels of 255


@pytest.mark.parametrize("size", [(150, 100), (600, 400)])  # kept as it is, and shrunk first
@pytest.mark.parametrize("prepare", [prepare_image, prepare_colour])
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
    prepare_image: (28, 28),
    prepare_as_photographed: (28, 28),
    prepare_colour: (224, 224, 3),
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
    assert set(PREPARED_SHAPES) == set(PREPARATIONS.values())  # every preparation
    for prepare, shape in PREPARED_SHAPES.items():
        try:
            prepared = prepare(path)
        except PhotoError as error:
            assert "a blank photo" in str(error)  # the only refusal a valid picture may get
            continue
        assert prepared.shape == shape and prepared.dtype == np.uint8


# Fashion-MNIST's view: shoes level and pointing left, garments off their models.


def test_shoes_are_turned_to_point_left_as_in_fashion_mnist(tmp_path):
    boot = np.zeros((28, 28), np.uint8)
    boot[4:24, 3:10] = 200  # the shaft, on the left
    boot[17:24, 3:25] = 200  # the foot, its toe to the right
    assert (taller_end_right(boot) == boot[:, ::-1]).all()
    assert (taller_end_right(boot[:, ::-1]) == boot[:, ::-1]).all()  # pointing left: kept
    shirt = np.zeros((28, 28), np.uint8)
    shirt[3:25, 2:26] = 180
    assert (taller_end_right(shirt) == shirt).all()
    # A photo of a boot pointing right comes out as the same boot pointing left.
    right = write_photo(tmp_path / "right.jpg", boot)
    left = write_photo(tmp_path / "left.jpg", np.ascontiguousarray(boot[:, ::-1]))
    prepared_right, prepared_left = prepare_image(right), prepare_image(left)
    assert np.abs(prepared_right.astype(int) - prepared_left).mean() < 3
    assert prepared_left[:, 18:].sum() > prepared_left[:, :10].sum()  # the shaft on the right


def test_a_shoe_shot_at_an_angle_is_turned_to_stand_level(tmp_path):
    boot = np.zeros((120, 200), np.uint8)
    boot[60:90, 20:180] = 200  # the foot
    boot[30:60, 120:180] = 200  # the shaft
    tilted = np.asarray(Image.fromarray(boot).rotate(-15, Image.Resampling.BILINEAR, expand=True))
    level = levelled(tilted, median_box(tilted > ITEM_LEVEL))
    left, top, right, bottom = median_box(level > ITEM_LEVEL)
    mask = level[top:bottom, left:right] > ITEM_LEVEL
    columns = np.flatnonzero(mask.any(axis=0))
    lowest = mask.shape[0] - 1 - np.argmax(mask[::-1, columns], axis=0)
    assert abs(np.polyfit(columns, lowest, 1)[0]) < 0.02  # its sole level again (0.18 tilted)
    level_already = levelled(boot, median_box(boot > ITEM_LEVEL))
    assert (level_already == boot).all()  # left as it is
    # Photographed tilted, it prepares as it does level: 8 apart (40 if not turned).
    photos = []
    for name, item in [("level.png", boot), ("tilted.png", tilted)]:
        Image.fromarray(255 - item).convert("RGB").save(tmp_path / name)
        photos.append(prepare_image(tmp_path / name).astype(int))
    assert np.abs(photos[0] - photos[1]).mean() < 15
    # A tuned model learned the shop's photos as they were shot: for it, the shoe stays tilted.
    as_shot = prepare_as_photographed(tmp_path / "tilted.png")
    assert np.abs(as_shot - photos[1]).mean() > 25


def test_a_dim_shoe_is_lit_as_fashion_mnist_shoes_are(tmp_path):
    # A white sneaker on white: a faint body, a sole and stripes that stand out.
    shoe = np.zeros((28, 28), np.uint8)
    shoe[10:20, 1:27] = 70
    shoe[20:23, 1:27] = 230
    shoe[12:18, 9:11] = shoe[12:18, 15:17] = 230
    lying = prepare_image(write_photo(tmp_path / "shoe.jpg", shoe))
    standing = prepare_image(write_photo(tmp_path / "garment.jpg", np.ascontiguousarray(shoe.T)))
    # Wider than tall it is a shoe, brightened (149); standing, a garment, left as it is (64).
    assert np.median(lying[lying > 40]) > 135 and np.median(standing[standing > 40]) < 80
    # brightened puts the median where Fashion-MNIST's is, and leaves a lit item alone.
    dim = Image.fromarray(np.linspace(41, 120, 280).reshape(10, 28).astype(np.uint8))
    assert abs(np.median(np.asarray(brightened(dim))) - SHOE_MEDIAN) <= 1
    lit = Image.fromarray(np.full((10, 28), 200, np.uint8))
    assert brightened(lit) is lit


def test_a_garment_worn_by_a_model_is_prepared_as_the_garment_alone(tmp_path):
    worn = worn_photo(tmp_path / "worn.png")
    alone = worn_photo(tmp_path / "alone.png", worn=False)
    # The T-shirt alone, laid out as Fashion-MNIST's tops are: 3/4 as wide as tall (156 x 150 px).
    laid_flat = tmp_path / "laid_flat.png"
    with Image.open(alone) as photo:
        photo.resize((round(photo.width * 112.5 / 156), photo.height)).save(laid_flat)
    picture = open_picture(worn, fit=224)
    left, top, right, bottom = median_box(np.asarray(picture.convert("L")) < 240)
    x, y, w, h = find_face(picture, (left, top, right, bottom))
    assert top <= y and y + h < top + (bottom - top) / 3 and abs(x + w / 2 - 112 * 224 / 300) < 6
    # Head, forearms and trousers gone, the shoulders narrowed: 12 from the T-shirt laid flat (56
    # with the model left in, 45 not narrowed).
    prepared = prepare_image(worn)
    assert np.abs(prepared - prepare_image(laid_flat).astype(int)).mean() < 18
    assert find_face(open_picture(alone, fit=224), (0, 0, 168, 224)) is None
    # Only a worn garment is narrowed: the T-shirt alone keeps its width.
    assert np.count_nonzero(prepared.any(axis=0)) == 21
    assert np.count_nonzero(prepare_image(alone).any(axis=0)) == 28


def test_a_face_that_is_not_skin_coloured_is_not_a_model(tmp_path):
    # A grey face printed on a T-shirt or a bag: found by the detector, refused by the skin test.
    grey_face = worn_photo(tmp_path / "print.png", skin=(150, 150, 150))
    picture = open_picture(grey_face, fit=224)
    found = face_detector().detectMultiScale(np.asarray(picture.convert("L")), 1.1, 5)
    assert len(found) == 1
    assert find_face(picture, (0, 0, *picture.size)) is None


@pytest.mark.skipif(not SHOP_PHOTOS.is_dir(), reason="../shared/product-photos absent")
def test_models_faces_are_found_in_real_shop_photos_and_nowhere_else():
    def faces(folder):
        found = []
        for path in sorted((SHOP_PHOTOS / folder).iterdir()):
            picture = open_picture(path, fit=224)
            box = median_box(np.asarray(picture.convert("L")) < 235)
            found.append(find_face(picture, box) is not None)
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
            assert median_box(mask) == pillow.getbbox(), (density, mask.astype(int))


# The colour route, for --backbone models.


def test_colour_preparation_keeps_the_whole_photo_square_on_its_background(tmp_path):
    photo = np.full((300, 150, 3), (30, 90, 160), np.uint8)  # tall, on a blue background
    photo[100:200, 50:100] = (250, 240, 10)
    Image.fromarray(photo).save(tmp_path / "tall.png")
    prepared = prepare_colour(tmp_path / "tall.png")
    assert prepared.shape == (224, 224, 3) and prepared.dtype == np.uint8
    assert (prepared[:, :40] == (30, 90, 160)).all()  # the sides: the photo's own background
    assert np.abs(prepared[112, 112].astype(int) - (250, 240, 10)).max() < 10  # item centred
