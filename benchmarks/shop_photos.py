"""How well each route sorts real shop photos it never saw: the README's table.

    python benchmarks/shop_photos.py MODEL                # 3 splits, 10/20/40 photos a class
    python benchmarks/shop_photos.py MODEL --photos ../shared/product-photos/shop --splits 3

For each split (seeded), each class's photos are shuffled, 10 are kept back to measure on (a
third of a class with fewer than 30) and the first 10, 20 and 40 of the rest (or all there are)
tune; each folder is made of links under the temporary folder. Then, exactly as a user would
run them:

- `predict MODEL measure/ --csv` (the Fashion-MNIST model as it is),
- `finetune MODEL tune/ --holdout 0`, then `predict` with the model it wrote,
- `finetune --backbone NAME tune/ --holdout 0`, then `predict` with the model it wrote,

each scored from the folder names of the photos measured on. Prints each route's accuracy
(mean over the splits, and the lowest and highest) and its time (wall seconds of the
`predict` command, or of the `finetune` command).
"""

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import backbone, folders  # noqa: E402

MEASURE_PER_CLASS = 10


def split_photos(photos, seed, per_class):
    """(photos to measure on, {k: photos to tune on}) for one seeded split."""
    rng = np.random.default_rng(seed)
    measure, pool = [], {}
    labels = np.array([label for _, label in photos])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        kept = min(MEASURE_PER_CLASS, len(members) // 3)
        measure += [photos[i] for i in members[:kept]]
        pool[label] = [photos[i] for i in members[kept:]]
    tune = {k: [p for members in pool.values() for p in members[:k]] for k in per_class}
    return measure, tune


def link_folder(photos, folder):
    """A class-subfolder layout of links to the photos, as finetune and predict read it."""
    for path, label in photos:
        target = folder / folders.class_folder(fm.CLASS_NAMES[label]) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
    return folder


def program(*args):
    """Run the program as a user does; (seconds, stdout). A failure stops the benchmark."""
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        sys.exit(f"failed ({run.returncode}): {' '.join(map(str, args))}\n{run.stderr[-2000:]}")
    return time.perf_counter() - start, run.stdout


def predict_accuracy(model, folder, work):
    """(accuracy, seconds) of `predict MODEL folder`, scored from the folder names."""
    rows = work / "predictions.csv"
    seconds, _ = program("predict", model, folder, "--csv", rows)
    truth = {
        str(path): fm.CLASS_NAMES[label] for path, label in folders.find_labelled_photos(folder)
    }
    with open(rows, newline="", encoding="utf-8") as file:
        predicted = {row["path"]: row["class"] for row in csv.DictReader(file)}
    right = [predicted[path] == name for path, name in truth.items()]
    return float(np.mean(right)), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a Fashion-MNIST model.keras from a run")
    parser.add_argument(
        "--photos", type=Path, default=ROOT.parent / "shared" / "product-photos" / "shop"
    )
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--backbone", default="mobilenet_v2", choices=sorted(backbone.BACKBONES))
    args = parser.parse_args()
    photos = folders.find_labelled_photos(args.photos)
    results = {}  # (route, k) -> [(accuracy, seconds)]

    def record(route, k, accuracy, seconds):
        results.setdefault((route, k), []).append((accuracy, seconds))
        print(f"  {route:<22} {k:>3} a class: {accuracy:.1%} ({seconds:.1f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="shop-photos-") as temporary:
        for seed in range(args.splits):
            work = Path(temporary) / f"split-{seed}"
            measure, tune = split_photos(photos, seed, args.per_class)
            measured = link_folder(measure, work / "measure")
            print(f"split {seed}: measuring on {len(measure)} photos", flush=True)
            record("predict", 0, *predict_accuracy(args.model, measured, work))
            for k, tuned in tune.items():
                folder = link_folder(tuned, work / f"tune-{k}")
                for route, model_args in (
                    ("finetune", [args.model]),
                    (f"finetune --backbone {args.backbone}", ["--backbone", args.backbone]),
                ):
                    out_dir = work / f"{route.replace(' ', '')}-{k}"
                    seconds, _ = program(
                        "finetune", *model_args, folder, "--holdout", "0",
                        "--seed", seed, "--out-dir", out_dir,
                    )  # fmt: skip
                    accuracy, _ = predict_accuracy(out_dir / "model.keras", measured, work)
                    record(route, k, accuracy, seconds)

    print(f"\n{args.splits} splits of {args.photos}; model {args.model}; backbone {args.backbone}")
    print("| route | photos a class tuned on | accuracy (lowest-highest) | seconds |")
    print("| --- | --- | --- | --- |")
    for (route, k), values in results.items():
        accuracies, seconds = np.array(values).T
        print(
            f"| {route} | {k or '-'} | {accuracies.mean():.1%} ({accuracies.min():.1%}-"
            f"{accuracies.max():.1%}) | {seconds.mean():.1f} |"
        )


if __name__ == "__main__":
    main()
