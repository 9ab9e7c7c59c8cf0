"""A shop's loop on real photos: sort a catalogue, check the least-sure photos, tune on them.

    python benchmarks/sort_review.py ../shared/product-photos/shop [--folds 5] [--seeds 3]

First the sorting, cross-validated (--folds): the labelled photos are split, class by class,
into folds; each fold is sorted with `predict --sort-into` by a `finetune --backbone` model
tuned on the other folds, a "person" who knows the true classes checks its unsure folders, and
the folders as they are then are counted. Pooled over the folds it prints the share marked
unsure, the share of the mistakes among them, the catalogue right as sorted, after checking
the unsure photos and after checking the least sure 10/20/30% (from the CSV's probabilities),
and the --unsure threshold cross-validated: for each fold, the largest P whose marked share on
the other folds stays within 25%, and what it gives on this fold. With --browser the "person"
checks the unsure folders through `review DIR` in headless Chromium instead, a key a photo
(Enter where the class proposed is right, else the right class's digit): it prints the keys
per photo, the server's time per decision (p50, p99) and the share right in the folders after
checking, which must equal the share from moving the files.

Then the whole loop (--seeds): each seed splits the labelled photos, class by class, into a
catalogue (40%), photos the shop tuned on before (40%) and new photos (20%), then runs the
program's own commands as a shop would: `finetune --backbone` on the tuned photos; `predict
--sort-into` the catalogue; the "person" checks the unsure folders (moves each wrong photo into
its right class folder, each right one out of `unsure/`); `finetune --backbone` on the checked
catalogue (alone, unchecked, and with the photos tuned on before); `predict` the new photos
with each model. It prints the same figures per seed and over all, the new photos right with
each model, and --unsure cross-validated over the seeds.
"""

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import folders, review, sorting  # noqa: E402

GRID = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def program(*args):
    command = [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result


def link(parts, work):
    """Class folders of links, work/<part>/<class>/, for {part: [(path, class)]}; of each
    part {link: class name}."""
    linked = {}
    for name, members in parts.items():
        linked[name] = {}
        for path, label in members:
            folder = work / name / sorting.class_folder(fm.CLASS_NAMES[label])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / path.name).symlink_to(path.resolve())
            linked[name][str(folder / path.name)] = fm.CLASS_NAMES[label]
    return linked


def shuffled_classes(photos, seed):
    """Each class's photos in an order fixed by seed: [(label, [path...])]."""
    rng = np.random.default_rng(seed)
    for label in range(10):
        members = [path for path, own in photos if own == label]
        yield label, [members[i] for i in rng.permutation(len(members))]


def split(photos, seed, work):
    """Catalogue (40%), tuned (40%), new (20%) of every class, linked under work."""
    parts = {"catalogue": [], "tuned": [], "new": []}
    for label, members in shuffled_classes(photos, seed):
        a, b = int(len(members) * 0.4), int(len(members) * 0.8)
        for name, chosen in zip(parts, (members[:a], members[a:b], members[b:])):
            parts[name] += [(path, label) for path in chosen]
    return link(parts, work)


def folds_of(photos, k, seed=0):
    """Stratified folds: [[(path, class)]], every class dealt round the k folds."""
    folds = [[] for _ in range(k)]
    for label, members in shuffled_classes(photos, seed):
        for i, path in enumerate(members):
            folds[i % k].append((path, label))
    return folds


def check_as_a_person(folder, truth_by_name):
    """Every photo in an unsure folder moved to its true class folder (out of unsure/)."""
    for rel in sorting.scan(folder):
        if sorting.UNSURE in rel.parts[1:-1]:
            right = folder / sorting.class_folder(truth_by_name[rel.name])
            right.mkdir(exist_ok=True)
            shutil.move(folder / rel, right / rel.name)


def browser():
    """Headless Chromium driven by selenium, through Debian's chromium-driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait_for(check, timeout=60):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit("the review page did not answer in time")
        time.sleep(0.01)


def check_in_the_browser(folder, truth_by_name, driver, screenshot=None):
    """As check_as_a_person, through review's page: for each photo shown, one key (Enter where
    the class proposed is right, else the right class's digit). Returns (keys, of them Enter,
    photos, the server's seconds per decision). screenshot: a PNG of the page taken there at
    the third photo."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    opened = review.open_review(
        argparse.Namespace(folder=folder, queue=None, port=0, no_browser=True)
    )
    server, token = review.serve(opened, 0)
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/?token={token}")
        wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-ready"))
        keys = enters = 0
        done = driver.find_element("id", "done")
        photo = driver.find_element("id", "photo")
        while not done.is_displayed():
            if screenshot and keys == 2:
                wait_for(lambda: driver.find_element("id", "pending").text == "0")
                driver.save_screenshot(screenshot)
            shown, proposed = (
                photo.get_attribute("data-photo"),
                photo.get_attribute("data-proposed"),
            )
            truth = truth_by_name[Path(shown).name]
            key = Keys.ENTER if truth == proposed else str(fm.CLASS_NAMES.index(truth))
            ActionChains(driver).send_keys(key).perform()
            keys, enters = keys + 1, enters + (key == Keys.ENTER)
        saved = driver.find_element("id", "saved")
        wait_for(lambda: saved.text == str(len(opened.items)))
    finally:
        server.shutdown()
        server.server_close()
    return keys, enters, len(opened.items), opened.seconds


def right_in_folders(folder, truth_by_name):
    """The share of the sorted photos whose class folder is now their true class."""
    now = sorting.scan(folder)
    return float(
        np.mean([fm.CLASS_NAMES[label] == truth_by_name[rel.name] for rel, label in now.items()])
    )


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


def summary(curve, unsure):
    """The figures of one sorted catalogue (or pooled ones) from [(probability, right)]."""
    probabilities = np.array([p for p, _ in curve])
    right = np.array([r for _, r in curve])
    marked = probabilities < unsure
    return {
        "marked": float(marked.mean()),
        "mistakes marked": float((~right & marked).sum() / max(1, (~right).sum())),
        "right before": float(right.mean()),
        "right after checking the unsure": float(np.mean(right | marked)),
        **{
            f"right after {s:.0%}": right_after_checking(probabilities, right, s)
            for s in (0.1, 0.2, 0.3)
        },
    }


def tune_and_sort(work, model, unsure):
    """work/catalogue sorted into work/sorted by a model tuned on work/tuned; the CSV's rows."""
    program("finetune", "--backbone", "mobilenet_v2", work / "tuned", "--holdout", "0",
            "--out-dir", work / model)  # fmt: skip
    program("predict", work / model / "model.keras", work / "catalogue", "--sort-into",
            work / "sorted", "--unsure", unsure)  # fmt: skip
    with open(work / "sorted" / sorting.CSV_NAME, newline="") as file:
        return list(csv.DictReader(file))


def sort_one_fold(folds, held, work, unsure, driver=None, screenshot=None):
    """Fold held sorted by a model tuned on the other folds, its unsure folders checked (by
    moving files, or with driver through review's page)."""
    parts = link(
        {
            "catalogue": folds[held],
            "tuned": [m for i, f in enumerate(folds) if i != held for m in f],
        },
        work,
    )
    rows = tune_and_sort(work, "m", unsure)
    sorted_into = work / "sorted"
    truth = parts["catalogue"]
    by_name = {Path(p).name: c for p, c in truth.items()}
    browsed = {}
    if driver:
        keys, enters, photos, seconds = check_in_the_browser(
            sorted_into, by_name, driver, screenshot
        )
        browsed = {"keys": keys, "enters": enters, "checked": photos, "seconds": seconds}
    else:
        check_as_a_person(sorted_into, by_name)
    probabilities = np.array([float(row["probability"]) for row in rows])
    right = np.array([truth[row["path"]] == row["class"] for row in rows])
    return {
        "curve": [(float(p), bool(r)) for p, r in zip(probabilities, right)],
        "right in the folders after checking": right_in_folders(sorted_into, by_name),
        **browsed,
    }


def cross_validated(results):
    """Per part: the largest P of GRID marking at most 25% of the other parts' photos."""
    chosen = []
    for held, result in enumerate(results):
        others = [pr for i, r in enumerate(results) if i != held for pr in r["curve"]]
        p_others = np.array([p for p, _ in others])
        p = max([p for p in GRID if np.mean(p_others < p) <= 0.25], default=GRID[0])
        mine = np.array([q for q, _ in result["curve"]])
        right = np.array([r for _, r in result["curve"]])
        chosen.append((p, float(np.mean(mine < p)), float(np.mean(right | (mine < p)))))
    return chosen


def browsed_summary(results):
    """--browser: the keys per photo, the server's time per decision, and the share right in
    the folders after checking through the page, pooled over the folds."""
    keys = sum(r["keys"] for r in results)
    checked = sum(r["checked"] for r in results)
    seconds = np.array([s for r in results for s in r["seconds"]]) * 1000
    photos = sum(len(r["curve"]) for r in results)
    right = sum(r["right in the folders after checking"] * len(r["curve"]) for r in results)
    print(f"| checked through the browser | {checked} photos, {keys / checked:.2f} keys a photo "
          f"(Enter for {sum(r['enters'] for r in results) / keys:.1%}) |")  # fmt: skip
    print(f"| the server's time per decision | p50 {np.percentile(seconds, 50):.2f} ms, p99 "
          f"{np.percentile(seconds, 99):.2f} ms ({len(seconds)} decisions) |")  # fmt: skip
    print(f"| right in the folders after checking through the browser | {right / photos:.1%} |")


def cross_validated_sorting(photos, k, unsure, seed, driver=None, screenshot=None):
    """--folds: every photo sorted once by a model that never saw it; pooled and per fold."""
    folds = folds_of(photos, k, seed)
    results = []
    for held in range(k):
        with tempfile.TemporaryDirectory() as work:
            shot = screenshot if held == seed == 0 else None
            results.append(sort_one_fold(folds, held, Path(work), unsure, driver, shot))
        shown = {**summary(results[-1]["curve"], unsure), **results[-1]}
        for key in ("curve", "keys", "enters", "checked", "seconds"):
            shown.pop(key, None)
        figures = ", ".join(f"{key} {value:.3f}" for key, value in shown.items())
        print(f"fold {held} ({len(folds[held])} photos): {figures}", flush=True)
    pooled = [point for result in results for point in result["curve"]]
    print(f"\nall {len(pooled)} photos, each sorted by a model tuned on the other {k - 1} folds "
          f"(folds dealt by seed {seed}), --unsure {unsure}:")  # fmt: skip
    for key, value in summary(pooled, unsure).items():
        print(f"| {key} | {value:.1%} |")
    if driver:
        browsed_summary(results)
    for p in GRID:
        shown = summary(pooled, p)
        print(f"  --unsure {p}: marked {shown['marked']:.1%}, mistakes marked "
              f"{shown['mistakes marked']:.1%}, right after checking "
              f"{shown['right after checking the unsure']:.1%}")  # fmt: skip
    print("\ncross-validated --unsure: fold, P chosen on the other folds, marked, right after")
    for held, (p, marked, right) in enumerate(cross_validated(results)):
        print(f"  {held}: P {p}, marked {marked:.1%}, right after checking {right:.1%}")
    return summary(pooled, unsure)


def mean_and_range(results, title):
    """One table row per figure: its mean (lowest-highest) over the results."""
    print(f"\n{title}:")
    for key in results[0]:
        if key in ("curve", "photos", "corrected by the person", "unsure"):
            continue
        values = [r[key] for r in results]
        print(f"| {key} | {statistics.mean(values):.1%} ({min(values):.1%}-{max(values):.1%}) |")


def one_seed(photos, seed, work, unsure):
    parts = split(photos, seed, work)
    rows = tune_and_sort(work, "m1", unsure)
    sorted_into = work / "sorted"
    truth = parts["catalogue"]
    probabilities = np.array([float(row["probability"]) for row in rows])
    right = np.array([truth[row["path"]] == row["class"] for row in rows])
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
    curve = [(float(p), bool(r)) for p, r in zip(probabilities, right)]
    return {
        "photos": len(rows),
        **summary(curve, unsure),
        "corrected by the person": corrected,
        **new,
        "curve": curve,
    }


def merged(folders, into):
    """One folder of class folders (links) holding the photos of all the folders given, each in
    its class folder, in unsure/ where it was there."""
    for folder in folders:
        for rel, label in sorting.scan(folder).items():
            where = into / sorting.class_folder(fm.CLASS_NAMES[label])
            where = where / sorting.UNSURE if sorting.UNSURE in rel.parts[1:-1] else where
            where.mkdir(parents=True, exist_ok=True)
            (where / rel.name).symlink_to((folder / rel).resolve())
    return into


def unchecked_seed(photos, seed, work, unsure):
    """--unchecked: the unsure photos of an unchecked sorted catalogue left out or tuned on."""
    parts = split(photos, seed, work)
    rows = tune_and_sort(work, "m1", unsure)
    sorted_into, truth = work / "sorted", parts["catalogue"]
    right = {row["path"]: truth[row["path"]] == row["class"] for row in rows}
    marked = [row["path"] for row in rows if sorting.UNSURE in Path(row["sorted_as"]).parts]
    both = merged([work / "tuned", sorted_into], work / "both")
    results = {
        "unsure": len(marked),
        "of them right": float(np.mean([right[path] for path in marked])),
        "new photos, model tuned before": accuracy(
            work / "m1" / "model.keras", work / "new", parts["new"]
        ),
    }
    for what, folder in [("catalogue alone", sorted_into), ("tuned before + catalogue", both)]:
        for option, extra in [("unsure left out", []), ("--include-unsure", ["--include-unsure"])]:
            out = work / f"m-{len(results)}"
            program("finetune", "--backbone", "mobilenet_v2", folder, "--holdout", "0",
                    "--out-dir", out, *extra)  # fmt: skip
            results[f"new photos, {what}, {option}"] = accuracy(
                out / "model.keras", work / "new", parts["new"]
            )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="labelled photos, a folder per class")
    parser.add_argument("--folds", type=int, default=5, help="0: no cross-validated sorting")
    parser.add_argument("--repeats", type=int, default=1, help="of the folds, dealt anew")
    parser.add_argument("--seeds", type=int, default=3, help="0: no loop of 40/40/20 splits")
    parser.add_argument("--unsure", type=float, default=sorting.UNSURE_BELOW)
    parser.add_argument(
        "--browser",
        action="store_true",
        help="the folds' unsure photos checked through review's page in headless Chromium "
        "(Debian's chromium and chromium-driver, and selenium), a key a photo",
    )
    parser.add_argument(
        "--screenshot",
        type=Path,
        help="with --browser: a PNG of the review page at the first fold's third photo",
    )
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="the seeds' loop: an unchecked catalogue's unsure photos left out or tuned on",
    )
    args = parser.parse_args()
    if args.folds == 1:
        parser.error("--folds: 0, or at least 2 (one fold has no others to tune on)")
    photos = folders.find_labelled_photos(args.photos)
    driver = browser() if args.browser else None
    if args.folds:
        pooled = [
            cross_validated_sorting(photos, args.folds, args.unsure, seed, driver, args.screenshot)
            for seed in range(args.repeats)
        ]
        if args.repeats > 1:
            mean_and_range(
                pooled, f"pooled over the folds, mean (lowest-highest) of {args.repeats}"
            )
    if driver:
        driver.quit()
    if not args.seeds:
        return
    if args.unchecked:
        results = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as work:
                results.append(unchecked_seed(photos, seed, Path(work), args.unsure))
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in results[-1].items())  # fmt: skip
            print(f"seed {seed}: {shown}", flush=True)
        mean_and_range(results, f"mean (lowest-highest) over {args.seeds} seeds, unchecked")
        return
    results = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as work:
            results.append(one_seed(photos, seed, Path(work), args.unsure))
        shown = {k: v for k, v in results[-1].items() if k != "curve"}
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in shown.items()), flush=True)  # fmt: skip
    mean_and_range(
        results, f"mean (lowest-highest) over {args.seeds} seeds, --unsure {args.unsure}"
    )
    if args.seeds < 2:
        return  # one seed has no others to choose its threshold on
    print("\ncross-validated --unsure: seed, P chosen on the other seeds, marked, right after")
    for seed, (p, marked, right) in enumerate(cross_validated(results)):
        print(f"  {seed}: P {p}, marked {marked:.1%}, right after checking {right:.1%}")


if __name__ == "__main__":
    main()
