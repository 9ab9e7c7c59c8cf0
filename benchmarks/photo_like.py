"""Product photos made from real Fashion-MNIST images, to measure `predict` and `finetune` on.

    python benchmarks/photo_like.py make [--data-dir DIR] --split test --per-class 60 --out PHOTOS
    python benchmarks/photo_like.py score MODEL PHOTOS
    python benchmarks/photo_like.py score MODEL ../shared/product-photos/shop   # real photos

`make` turns real 28x28 images into photos as shops take them: a coloured item on a light, dark
or coloured background, 100 to 2000 px, off-centre, slightly rotated, with sensor noise, mostly
JPEG, some stored sideways with an EXIF orientation tag. They are written one folder per class,
as `finetune` takes them. `--split test` draws on the test images (to measure on), `--split
train` on the training images (to fine-tune on): a model never learns from the test part.
`score` classifies every photo of a labelled folder (these, or real ones) with `predict`'s
preparation and prints the accuracy, overall, by background where the names say it, and by class.
"""

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import folders, models, predict  # noqa: E402

BACKGROUNDS = ["light", "dark", "coloured"]


def random_colour(rng, value):
    hue, saturation = rng.uniform(0, 1), rng.uniform(0, 0.8)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255


def make_photo(image, rng, sides=(100, 2000)):
    """One 28x28 item (light on dark, as in the data set) as a photo, each side within `sides`
    pixels; returns it and its kind."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    background = {
        "light": lambda: np.full(3, rng.uniform(205, 250)) + rng.normal(0, 4, 3),
        "dark": lambda: np.full(3, rng.uniform(5, 50)) + rng.normal(0, 4, 3),
        "coloured": lambda: random_colour(rng, rng.uniform(0.35, 0.9)),
    }[kind]()
    item = random_colour(rng, rng.uniform(0.15, 0.95))

    # The data set's pixel is the darkness of the item in its original photo on white: use it as
    # the item's opacity near its outline and as shading inside it.
    height = int(rng.integers(sides[0], sides[1] + 1))
    width = int(np.clip(height * rng.uniform(0.75, 1.33), *sides))
    size = int(min(height, width) * rng.uniform(0.5, 0.85))
    darkness = (
        np.asarray(
            Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), np.float32
        )[..., None]
        / 255
    )
    opacity = np.clip(darkness * 4, 0, 1)
    shaded = np.clip(item * (1.25 - 0.6 * darkness), 0, 255)
    canvas = np.ones((height, width, 3), np.float32) * np.clip(background, 0, 255)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    patch = canvas[top : top + size, left : left + size]
    canvas[top : top + size, left : left + size] = patch * (1 - opacity) + shaded * opacity

    photo = Image.fromarray(canvas.astype(np.uint8)).rotate(
        rng.uniform(-8, 8),
        Image.Resampling.BICUBIC,
        fillcolor=tuple(int(c) for c in np.clip(background, 0, 255)),
    )
    noisy = np.asarray(photo, np.float32) + rng.normal(0, rng.uniform(0, 6), (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), kind


def save_photo(photo, path, rng, qualities=(70, 95)):
    """Mostly JPEG of varied quality, some PNG; some stored sideways with an EXIF tag saying so."""
    exif = Image.Exif()
    if rng.uniform() < 0.15:
        photo = photo.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    if rng.uniform() < 0.8:
        path = path.with_suffix(".jpg")
        photo.save(path, quality=int(rng.integers(qualities[0], qualities[1] + 1)), exif=exif)
    else:
        path = path.with_suffix(".png")
        photo.save(path, exif=exif)
    return path


def make(args):
    (x_train, y_train), (x_test, y_test) = fm.load_fashion_mnist(args.data_dir)
    images, labels = (x_test, y_test) if args.split == "test" else (x_train, y_train)
    rng = np.random.default_rng(args.seed)
    for label, name in enumerate(fm.CLASS_NAMES):
        folder = args.out / folders.class_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        picks = rng.permutation(np.flatnonzero(labels == label))[: args.per_class]
        for index in picks:
            photo, kind = make_photo(images[index], rng)
            save_photo(photo, folder / f"{args.split}{index:05d}-{kind}", rng)
    print(f"wrote {args.per_class} photos per class from the {args.split} images to {args.out}")


def score(args):
    fm.choose_onednn(fm.cpu_info()[1])  # as main() does
    fm.start_tensorflow_quietly()
    model = models.load_trained_model(args.model)
    photos = folders.find_labelled_photos(args.photos)
    results = predict.predict_images(model, [path for path, _ in photos])
    right = {kind: [] for kind in BACKGROUNDS}
    per_class = {name: [] for name in fm.CLASS_NAMES}
    for (path, label), result in zip(photos, results):
        hit = result["top3"][0]["class"] == fm.CLASS_NAMES[label]
        right.get(path.stem.rsplit("-", 1)[-1], []).append(hit)  # made here: "-light" etc.
        per_class[fm.CLASS_NAMES[label]].append(hit)
    every = sum(per_class.values(), [])
    print(f"{args.model}: {np.mean(every):.1%} right of {len(every)} photos; " + ", ".join(
        f"{kind} background {np.mean(hits):.1%} ({len(hits)})" for kind, hits in right.items()
        if hits
    ))  # fmt: skip
    print("  by class: " + ", ".join(
        f"{name} {np.mean(hits):.0%}" for name, hits in per_class.items() if hits
    ))  # fmt: skip
    return float(np.mean(every))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    maker = commands.add_parser("make", help="write photo-like images, one folder per class")
    maker.add_argument(
        "--data-dir", type=Path, help="the four IDX files (default: the full data, Keras cache)"
    )
    maker.add_argument("--split", choices=["test", "train"], default="test")
    maker.add_argument("--per-class", type=int, default=60)
    maker.add_argument("--seed", type=int, default=0)
    maker.add_argument("--out", type=Path, required=True)
    scorer = commands.add_parser("score", help="accuracy of predict on such a folder")
    scorer.add_argument("model", type=Path)
    scorer.add_argument("photos", type=Path)
    args = parser.parse_args()
    make(args) if args.command == "make" else score(args)


if __name__ == "__main__":
    main()
