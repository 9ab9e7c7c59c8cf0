"""Photos in the wrong folder: does `finetune --backbone`'s doubtful.csv find them?

    python benchmarks/mislabelled.py ../shared/product-photos/shop [--seeds 0 1 2] [--share 0.05]
        [--holdout 0.2] [--cleanlab-python PYTHON]

For each seed: the labelled folder is copied, a seeded share of its photos (5%) is moved each
into another class's folder, drawn at random (recorded), and `finetune --backbone mobilenet_v2`
runs on the copy as a user runs it (a new process, the ImageNet weights in the Keras cache of a
HOME of its own, copied from ../shared/keras-models). From its doubtful.csv it prints, of the k
moved photos, how many the list finds among its first k, the whole list's precision and recall,
and each photo it lists that was not moved (the original labels may be wrong too: look).

The process runs fashion_mnist_cnn.main as the command does, with doubts.doubtful_photos's
inputs (every photo's out-of-fold probabilities) saved, so that the same probabilities can be
ranked other ways for comparison: every photo by the probability of its folder's class, lowest
first (no filter), and the photos whose top class is not their folder's. With --cleanlab-python
(a Python with cleanlab installed, never the project's own: `python -m venv V && V/bin/pip
install cleanlab`), cleanlab's find_label_issues is run on them too: its confident_learning
list must equal doubtful.csv's, and its other filters are scored beside it; first, the two
lists are compared on --random-sets random probability sets (`--seeds` alone: only that).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import doubts, folders  # noqa: E402

KERAS_MODELS = ROOT.parent / "shared" / "keras-models"
# Run in a new process: the program's main, doubtful_photos's inputs saved to argv[1], with
# the seconds of each call to photo_features (the tuned photos', then the held-out ones').
RUN_SAVING_PROBABILITIES = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
import fashion_mnist_cnn as fm
from fashion_shop import doubts, finetune
find, features, seconds = doubts.doubtful_photos, finetune.photo_features, []
def timed(*args, **kwargs):
    start = time.perf_counter()
    result = features(*args, **kwargs)
    seconds.append(time.perf_counter() - start)
    return result
def saved(labels, probabilities):
    np.savez(sys.argv[1], labels=labels, probabilities=probabilities, seconds=seconds)
    return find(labels, probabilities)
doubts.doubtful_photos, finetune.photo_features = saved, timed
sys.exit(fm.main(sys.argv[2:]))
"""
# Run by --cleanlab-python: each of cleanlab's filters on each file of saved probabilities,
# a line of JSON a file.
CLEANLAB = """
import json, sys, numpy as np
from cleanlab.filter import find_label_issues
for path in sys.argv[1:]:
    saved = np.load(path)
    print(json.dumps({
        f"{filter_by}": find_label_issues(
            saved["labels"], saved["probabilities"], filter_by=filter_by,
            return_indices_ranked_by="self_confidence", n_jobs=1,
        ).tolist()
        for filter_by in ("confident_learning", "prune_by_noise_rate", "prune_by_class", "both")
    }))
"""


def move_some(folder, share, seed):
    """Move round(share x photos) photos, drawn by seed, each into another class's folder drawn
    by seed; {new path relative to folder: (its own class, the folder's class)}."""
    photos = folders.find_labelled_photos(folder)
    rng = np.random.default_rng(seed)
    moved = {}
    for i in sorted(rng.choice(len(photos), round(share * len(photos)), replace=False)):
        path, label = photos[i]
        wrong = rng.choice([c for c in range(10) if c != label])
        target = folder / folders.class_folder(fm.CLASS_NAMES[wrong]) / path.name
        assert not target.exists(), target
        path.rename(target)
        moved[target.relative_to(folder).as_posix()] = (label, wrong)
    return moved


def finetune(folder, out, home, saved, holdout):
    """finetune --backbone on folder, in a new process; its seconds."""
    start = time.perf_counter()
    argv = ["finetune", "--backbone", "mobilenet_v2", folder, "--out-dir", out]
    result = subprocess.run(
        [sys.executable, "-c", RUN_SAVING_PROBABILITIES.format(root=str(ROOT)), saved]
        + [*map(str, argv), "--holdout", str(holdout)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HOME=str(home)),
    )
    if result.returncode:
        sys.exit(f"finetune failed:\n{result.stderr[-2000:]}")
    print([line for line in result.stdout.splitlines() if "doubts" in line][0])
    return time.perf_counter() - start


def cleanlab_lists(python, *saved):
    """cleanlab's lists for each file of saved probabilities: {filter: indices}, a file each."""
    theirs = subprocess.run([python, "-c", CLEANLAB, *saved], capture_output=True, text=True)
    if theirs.returncode:
        sys.exit(f"cleanlab failed:\n{theirs.stderr[-2000:]}")
    return [json.loads(line) for line in theirs.stdout.splitlines()]


def random_sets_agree(python, count, work):
    """On how many of count random probability sets (sizes, classes present and sureness drawn
    from seed 0) cleanlab's confident_learning list equals doubts.doubtful_photos'."""
    rng, mine, saved = np.random.default_rng(0), [], []
    for n in range(count):
        photos = rng.integers(20, 300)
        labels = rng.integers(0, rng.integers(2, 11), photos)
        logits = rng.normal(size=(photos, 10)) * rng.uniform(0.5, 4)
        logits[np.arange(photos), labels] += rng.uniform(0, 4)
        exp = np.exp(logits)
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        saved.append(work / f"random-{n}.npz")
        np.savez(saved[-1], labels=labels, probabilities=probabilities)
        mine.append(doubts.doubtful_photos(labels, probabilities).tolist())
    theirs = cleanlab_lists(python, *saved)
    return sum(m == t["confident_learning"] for m, t in zip(mine, theirs))


def scores(listed, moved):
    """(found among the first k, precision, recall, listed but not moved) of a ranked list."""
    k, hits = len(moved), [photo in moved for photo in listed]
    found = sum(hits)
    return sum(hits[:k]), found / max(len(listed), 1), found / k, len(listed) - found


def show(name, listed, moved):
    first_k, precision, recall, others = scores(listed, moved)
    print(
        f"  {name:<34} lists {len(listed):3}: {first_k:2} of {len(moved)} moved among its first "
        f"{len(moved)}, precision {precision:.2f}, recall {recall:.2f}, {others} not moved"
    )
    return first_k, len(listed), len(listed) - others


def one_seed(source, seed, args, work, home):
    folder = work / f"shop-{seed}"
    shutil.copytree(source, folder)
    moved = move_some(folder, args.share, seed)
    out, saved = work / f"run-{seed}", work / f"probabilities-{seed}.npz"
    seconds = finetune(folder, out, home, saved, args.holdout)
    with (out / doubts.DOUBTFUL_NAME).open(newline="") as file:
        rows = list(csv.DictReader(file))
    listed = [row["photo"] for row in rows]
    # The saved probabilities are doubtful.csv's: the same photos, in the order finetune read.
    names = [p.relative_to(folder).as_posix() for p, _ in folders.find_labelled_photos(folder)]
    data = np.load(saved)
    labels, probabilities = data["labels"], data["probabilities"]
    assert [names[i] for i in doubts.doubtful_photos(labels, probabilities)] == listed
    folder_probability = probabilities[np.arange(len(labels)), labels]
    order = np.argsort(folder_probability, kind="stable")  # least sure of its folder first
    by_folder_probability = [names[i] for i in order]
    top_not_folder = [names[i] for i in order if probabilities[i].argmax() != labels[i]]
    features = ", ".join(f"{s:.1f}" for s in data["seconds"])
    print(
        f"seed {seed}: {len(moved)} photos moved, finetune {seconds:.0f} s (features {features} s)"
    )
    totals = {"doubtful.csv": show("doubtful.csv", listed, moved)}
    totals["top class not the folder's"] = show("top class not the folder's", top_not_folder, moved)
    ranked = by_folder_probability[: len(moved)]
    totals["lowest folder probability, first k"] = show(
        "lowest folder probability, first k", ranked, moved
    )
    if args.cleanlab_python:
        for filter_by, indices in cleanlab_lists(args.cleanlab_python, saved)[0].items():
            listed_by_them = [names[i] for i in indices]
            same = " (the same list)" * (listed_by_them == listed)
            totals[f"cleanlab {filter_by}"] = show(
                f"cleanlab {filter_by}{same}", listed_by_them, moved
            )
    print("  moved, not listed (its class -> its folder: the model says):")
    for photo, (own, wrong) in moved.items():
        if photo not in listed:
            p = probabilities[names.index(photo)]
            shown = f"{fm.CLASS_NAMES[p.argmax()]} {p.max():.0%} ({p[wrong]:.0%} in its folder)"
            print(f"    {photo}: {fm.CLASS_NAMES[own]} -> {fm.CLASS_NAMES[wrong]}: {shown}")
    print("  listed, not moved (folder: the model says):")
    for row in rows:
        if row["photo"] not in moved:
            print(
                f"    {row['photo']}: {row['model_class']} {float(row['model_probability']):.0%}"
                f" ({row['folder_class']} {float(row['folder_probability']):.0%})"
            )
    return len(moved), totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="labelled photos, a subfolder per class")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--share", type=float, default=0.05, help="share of photos moved")
    parser.add_argument("--holdout", type=float, default=0.2, help="finetune's --holdout")
    parser.add_argument("--cleanlab-python", help="a Python with cleanlab installed")
    parser.add_argument(
        "--random-sets", type=int, default=200, help="with --cleanlab-python: random sets compared"
    )
    args = parser.parse_args()
    name, flags = fm.cpu_info()
    print(f"CPU: {name}, {fm.cpu_class(flags)}")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        home = work / "home"
        shutil.copytree(KERAS_MODELS, home / ".keras" / "models")
        if args.cleanlab_python and args.random_sets:
            agree = random_sets_agree(args.cleanlab_python, args.random_sets, work)
            print(
                f"cleanlab's confident_learning list equals doubts.doubtful_photos' on {agree} "
                f"of {args.random_sets} random probability sets"
            )
        results = [one_seed(args.folder, seed, args, work, home) for seed in args.seeds]
    if not results:
        return
    moved = sum(n for n, _ in results)
    print(f"\nAll {len(args.seeds)} seeds, {moved} photos moved:")
    for name in results[0][1]:
        first_k, listed, hits = (sum(r[1][name][j] for r in results) for j in range(3))
        print(
            f"  {name:<34} {first_k} of {moved} among the first k, precision "
            f"{hits / max(listed, 1):.2f}, recall {hits / moved:.2f}, {listed - hits} not moved"
        )


if __name__ == "__main__":
    main()
