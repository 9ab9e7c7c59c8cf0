"""Photo helpers for the tests (not a test file): generated product photos, worn garments,
class folders, colour product shots, and a model that knows the generated items."""

import numpy as np
from conftest import ROOT, distinct_images
from PIL import Image, ImageDraw, ImageFilter

import fashion_mnist_cnn as fm
from fashion_shop import backbone, export, finetune, models, photos, predict
from fashion_shop.folders import class_folder

SHOP_PHOTOS = ROOT.parent / "shared" / "product-photos" / "shop"  # real shop photos


def write_photo(path, image, background=(235, 230, 225), item=(150, 30, 40), size=140):
    """A 28x28 item (light on dark) as a coloured product photo on a coloured background."""
    darkness = np.asarray(Image.fromarray(image).resize((size, size)), np.float32)[..., None] / 255
    canvas = np.ones((size + 40, size + 60, 3), np.float32) * background
    patch = canvas[20 : 20 + size, 30 : 30 + size]
    canvas[20 : 20 + size, 30 : 30 + size] = patch * (1 - darkness) + np.array(item) * darkness
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.astype(np.uint8)).save(path, quality=90)
    return path


SKIN, SHIRT = (224, 172, 140), (200, 30, 30)


def draw_shirt(draw, cx):
    """A red T-shirt: body and short sleeves, on a 225x300 photo."""
    draw.rectangle([cx - 55, 95, cx + 55, 245], fill=SHIRT)
    for side in (-1, 1):
        sleeve = [(cx + side * 55, 95), (cx + side * 78, 150), (cx + side * 66, 156)]
        draw.polygon(sleeve + [(cx + side * 52, 125)], fill=SHIRT)


def draw_face(draw, cx, skin=SKIN):
    """Hair, a face with eyes, brows, nose and mouth: enough for OpenCV's face detector."""
    draw.ellipse([cx - 27, 8, cx + 27, 55], fill=(40, 30, 20))
    draw.ellipse([cx - 21, 18, cx + 21, 82], fill=skin)
    for side in (-1, 1):
        eye = cx + side * 10
        draw.ellipse([eye - 5, 40, eye + 5, 45], fill=(50, 35, 30))
        draw.line([eye - 7, 35, eye + 7, 35], fill=(60, 40, 30), width=2)
    draw.line([cx, 45, cx, 58], fill=(200, 150, 120), width=2)
    draw.ellipse([cx - 8, 65, cx + 8, 70], fill=(170, 90, 90))


def worn_photo(path, worn=True, skin=SKIN):
    """A catalogue photo of the red T-shirt, alone or worn by a model (head, neck, bare
    forearms, blue trousers), softened as a camera's photo is."""
    picture = Image.new("RGB", (225, 300), "white")
    draw, cx = ImageDraw.Draw(picture), 112
    draw_shirt(draw, cx)
    if worn:
        for side in (-1, 1):
            forearm = sorted([cx + side * 66, cx + side * 78])
            draw.rectangle([forearm[0], 156, forearm[1], 230], fill=skin)
        draw.rectangle([cx - 50, 245, cx + 50, 300], fill=(40, 60, 140))
        draw.rectangle([cx - 9, 78, cx + 9, 96], fill=skin)
        draw_face(draw, cx, skin)
    picture.filter(ImageFilter.GaussianBlur(1.2)).save(path)
    return path


def photo_folder(folder, per_class, classes=range(10), seed=0, relabel=0):
    """FOLDER/<class name>/NN.jpg: per_class photos of each class, of generated items. With
    relabel, each class's photos show the item the model knows as class + relabel: products
    that look unlike what the model learned, which only fine-tuning can teach it."""
    labels = np.repeat(list(classes), per_class)
    items = distinct_images((labels + relabel) % 10, seed=seed)
    for n, (label, image) in enumerate(zip(labels, items)):
        write_photo(folder / class_folder(fm.CLASS_NAMES[label]) / f"{n:03d}.jpg", image)
    return folder


# A mistake answered at once.

HEAVY_WORK = ("start_tensorflow_quietly", "load_trained_model", "download", "preparing")


def refused_at_once(monkeypatch, capsys, *argv, heavy=HEAVY_WORK):
    """fm.main(argv) in this process, with TensorFlow's start, a model's load, a download and
    predict's preparing processes (and whatever else heavy names) made to fail the test: the
    mistake must be answered before them. Returns the one line on stderr; the code must be 1."""

    def too_late(*args, **kwargs):
        raise AssertionError("the mistake was not answered before the heavy work")

    for module in (fm, predict, finetune, export, backbone):
        for name in heavy:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, too_late)
    code = fm.main([str(arg) for arg in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    return err[0]


# Items whose class survives predict's trimming, and a model that knows them.


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


def as_picture_files(image, folder, stem):
    """The same item as a 28x28 grey PNG and as a large dark-on-light RGB photo-like JPEG."""
    small = folder / f"{stem}-small.png"
    Image.fromarray(image).save(small)
    large = np.kron(255 - image, np.ones((12, 12), np.uint8))  # 336x336, inverted
    large = np.pad(large, ((40, 40), (90, 90)), constant_values=255)  # white margins, wide
    big = folder / f"{stem}-large.jpg"
    Image.fromarray(large).convert("RGB").save(big, quality=95)
    return small, big


def train_model(x_train, y_train, epochs, path):
    """The default model trained on 28x28 images, saved at path."""
    keras = fm.start_tensorflow_quietly()
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


def framed_items_model(tmp_path_factory):
    """A model trained on framed items as predict prepares them, as a real one is on
    Fashion-MNIST: for a module-scoped fixture."""
    labels = np.random.default_rng(0).integers(0, 10, 1200)
    folder = tmp_path_factory.mktemp("items")
    prepared = []
    for n, image in enumerate(framed_items(labels, seed=1)):
        Image.fromarray(image).save(folder / f"{n}.png")
        prepared.append(photos.prepare_image(folder / f"{n}.png"))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    return train_model(np.stack(prepared), labels, 3, path)


# Colour product shots, for the colour (--backbone) route.

COLOURS = [(200, 30, 30), (30, 60, 200), (40, 160, 60)]  # a colour and a shape per class


def product(label, seed):
    """A colour product shot of class 0, 1 or 2: a red disc, a blue bar, a green frame."""
    rng = np.random.default_rng(seed)
    photo = np.full((180 + rng.integers(0, 60), 160, 3), 245, np.uint8)
    y, x = np.mgrid[: photo.shape[0], :160]
    cy, cx = photo.shape[0] // 2 + rng.integers(-10, 10), 80 + rng.integers(-10, 10)
    shape = [
        (y - cy) ** 2 + (x - cx) ** 2 < 45**2,
        (abs(y - cy) < 60) & (abs(x - cx) < 15),
        (abs(y - cy) < 50) & (abs(x - cx) < 50) & ~((abs(y - cy) < 35) & (abs(x - cx) < 35)),
    ][label]
    photo[shape] = np.clip(np.array(COLOURS[label]) + rng.integers(-20, 20, 3), 0, 255)
    return photo


def product_folder(folder, per_class):
    """FOLDER/<class name>/NN.jpg: per_class colour product shots of classes 0, 1 and 2."""
    for label in range(3):
        for n in range(per_class):
            path = folder / class_folder(fm.CLASS_NAMES[label]) / f"{n:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(product(label, seed=100 * label + n)).save(path, quality=90)
    return folder


def colour_model(path):
    """A small untrained model of a --backbone model's shape: photos 224x224x3 -> 10 classes."""
    keras = fm.start_tensorflow_quietly()
    keras.utils.set_random_seed(0)
    layers = [
        keras.Input((224, 224, 3)),
        keras.layers.Conv2D(4, 8, strides=8, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ]
    keras.Sequential(layers).save(path)
    return path


def small_shop(folder):
    """20 photos in class folders, a PNG copy of one bag, and a file that is not a picture."""
    photo_folder(folder, per_class=2)
    (folder / "Bag" / "zz-broken.jpg").write_text("not a picture")
    Image.open(a_bag(folder)).save(folder / "Bag" / "zz-more.png")
    return folder


def a_bag(folder):
    return sorted((folder / "Bag").glob("*.jpg"))[0]


def sharpened_model(path, seed=0, calibrated=True):
    """An untrained 28x28 model whose answers range from unsure to sure; named as a calibrated
    model (finetune --backbone's) is, or as a training run's (not calibrated)."""
    keras = fm.start_tensorflow_quietly()
    keras.utils.set_random_seed(seed)
    model = fm.build_model("float32")
    dense = model.layers[-1]
    kernel, _ = dense.get_weights()
    bias = np.random.default_rng(seed).normal(0, 1.5, 10).astype(np.float32)
    dense.set_weights([kernel * 100, bias])
    if calibrated:
        model.name = "fashion_mnist_cnn" + models.CALIBRATED
    model.save(path)
    return path
