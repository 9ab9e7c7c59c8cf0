"""A shop's loop on real photos: sort a catalogue, check the least-sure photos, tune on them.

    python benchmarks/sort_review.py ../shared/product-photos/shop [--seeds 5]

Each seed splits the labelled photos, class by class, into a catalogue (40%), photos the shop
tuned on before (40%) and new photos (20%), then runs the program's own commands as a shop
would: `finetune --backbone` on the tuned photos; `predict --sort-into` the catalogue; a
"person" who knows the true classes checks the unsure folders (moves each wrong photo into its
right class folder, each right one out of `unsure/`); `finetune --backbone` on the checked
catalogue (alone, unchecked, and with the photos tuned on before); `predict` the new photos
with each model. It prints, per seed and over all: the
share marked unsure, the share of mistakes among them, the catalogue right before and after
checking the unsure photos and after checking the least sure 10/20/30% (from the CSV's
probabilities), and the new photos right with each model. Finally the --unsure threshold
cross-validated: for each seed, the largest P whose marked share on the other seeds stays
within 25%, and what it gives on this seed.
"""

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import folders, sorting  # noqa: E402

GRID = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def program(*args):
    command = [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result


def split(photos, seed, work):
    """Class folders of links: catalogue/, tuned/, new/ under work; {path: class} of each."""
    rng = np.random.default_rng(seed)
    parts = {"catalogue": {}, "tuned": {}, "new": {}}
    for label in range(10):
        members = [path for path, own in photos if own == label]
        members = [members[i] for i in rng.permutation(len(members))]
        a, b = int(len(members) * 0.4), int(len(members) * 0.8)
        for name, chosen in zip(parts, (members[:a], members[a:b], members[b:])):
            folder = work / name / sorting.class_folder(fm.CLASS_NAMES[label])
            folder.mkdir(parents=True, exist_ok=True)
            for path in chosen:
                (folder / path.name).symlink_to(path.resolve())
                parts[name][str(folder / path.name)] = fm.CLASS_NAMES[label]
    return parts


def check_as_a_person(folder, truth_by_name):
    """Every photo in an unsure folder moved to its true class folder (out of unsure/)."""
    for rel in sorting.scan(folder):
        if sorting.UNSURE in rel.parts[1:-1]:
            right = folder / sorting.class_folder(truth_by_name[rel.name])
            right.mkdir(exist_ok=True)
            shutil.move(folder / rel, right / rel.name)


def right_after_checking(probabilities, right, share):
    order = np.argsort(probabilities, kind="stable")
    checked = np.zeros(len(right), bool)
    checked[order[: round(share * len(right))]] = True
    return float(np.mean(right | checked))


def accuracy(model, folder, truth):
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "new.csv"
        program("predict", model, folder, "--csv", table)
        with open(table, newline="") as file:
            rows = list(csv.DictReader(file))
    return float(np.mean([truth[row["path"]] == row["class"] for row in rows]))


def one_seed(photos, seed, work, unsure):
    parts = split(photos, seed, work)
    program("finetune", "--backbone", "mobilenet_v2", work / "tuned", "--holdout", "0",
            "--out-dir", work / "m1")  # fmt: skip
    sorted_into = work / "sorted"
    program("predict", work / "m1/model.keras", work / "catalogue", "--sort-into", sorted_into,
            "--unsure", unsure)  # fmt: skip
    with open(sorted_into / sorting.CSV_NAME, newline="") as file:
        rows = list(csv.DictReader(file))
    truth = parts["catalogue"]
    probabilities = np.array([float(row["probability"]) for row in rows])
    right = np.array([truth[row["path"]] == row["class"] for row in rows])
    marked = probabilities < unsure
    shutil.copytree(sorted_into, work / "unchecked", symlinks=True)
    check_as_a_person(sorted_into, {Path(p).name: c for p, c in truth.items()})
    program("finetune", "--backbone", "mobilenet_v2", sorted_into, "--holdout", "0",
            "--out-dir", work / "m2")  # fmt: skip
    program("finetune", "--backbone", "mobilenet_v2", work / "unchecked", "--holdout", "0",
            "--out-dir", work / "m2-unchecked")  # fmt: skip
    both = work / "both"  # what the shop has labelled by now: the tuned photos and the checked
    for folder in (work / "tuned", sorted_into):
        for rel, label in sorting.scan(folder).items():
            (both / sorting.class_folder(fm.CLASS_NAMES[label])).mkdir(parents=True, exist_ok=True)
            (both / sorting.class_folder(fm.CLASS_NAMES[label]) / rel.name).symlink_to(
                (folder / rel).resolve()
            )
    program("finetune", "--backbone", "mobilenet_v2", both, "--holdout", "0",
            "--out-dir", work / "m3")  # fmt: skip
    corrected = json.loads((work / "m2/metrics.json").read_text())["corrected_by_a_person"]
    new = {
        f"new photos, {what}": accuracy(work / model / "model.keras", work / "new", parts["new"])
        for what, model in [
            ("model tuned before", "m1"),
            ("tuned on the checked catalogue", "m2"),
            ("tuned on it unchecked", "m2-unchecked"),
            ("tuned on both the photos before and the checked catalogue", "m3"),
        ]
    }
    after = {
        f"right after {s:.0%}": right_after_checking(probabilities, right, s)
        for s in (0.1, 0.2, 0.3)
    }
    return {
        "photos": len(rows),
        "marked": float(marked.mean()),
        "mistakes marked": float((~right & marked).sum() / max(1, (~right).sum())),
        "right before": float(right.mean()),
        "right after checking the unsure": float(np.mean(right | marked)),
        **after,
        "corrected by the person": corrected,
        **new,
        "curve": [(float(p), bool(r)) for p, r in zip(probabilities, right)],
    }


def cross_validated(results):
    """Per seed: the largest P of GRID marking at most 25% of the other seeds' photos."""
    chosen = []
    for held, result in enumerate(results):
        others = [pr for i, r in enumerate(results) if i != held for pr in r["curve"]]
        p_others = np.array([p for p, _ in others])
        p = max([p for p in GRID if np.mean(p_others < p) <= 0.25], default=GRID[0])
        mine = np.array([q for q, _ in result["curve"]])
        right = np.array([r for _, r in result["curve"]])
        chosen.append((p, float(np.mean(mine < p)), float(np.mean(right | (mine < p)))))
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="labelled photos, a folder per class")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--unsure", type=float, default=sorting.UNSURE_BELOW)
    args = parser.parse_args()
    photos = folders.find_labelled_photos(args.photos)
    results = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as work:
            results.append(one_seed(photos, seed, Path(work), args.unsure))
        shown = {k: v for k, v in results[-1].items() if k != "curve"}
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in shown.items()), flush=True)  # fmt: skip
    print(f"\nmean (lowest-highest) over {args.seeds} seeds, --unsure {args.unsure}:")
    for key in results[0]:
        if key in ("curve", "photos", "corrected by the person"):
            continue
        values = [r[key] for r in results]
        print(f"| {key} | {statistics.mean(values):.1%} ({min(values):.1%}-{max(values):.1%}) |")
    print("\ncross-validated --unsure: seed, P chosen on the other seeds, marked, right after")
    for seed, (p, marked, right) in enumerate(cross_validated(results)):
        print(f"  {seed}: P {p}, marked {marked:.1%}, right after checking {right:.1%}")


if __name__ == "__main__":
    main()
