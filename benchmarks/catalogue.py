"""How fast `predict` sorts a shop's catalogue: large product shots, as shops keep them.

    python benchmarks/catalogue.py MODEL                   # 1,000 shots, 3 rounds
    python benchmarks/catalogue.py MODEL --photos 1000 --rounds 3 --memory 5

Makes N shots from real Fashion-MNIST test images once (longest side 800 to 2,400 px, JPEG of
quality 85 to 95 with one in five PNG, some stored sideways with an EXIF tag; one folder per
class) under the temporary folder, then times three ways of classifying them, alternating and
keeping each side's fastest round:

- `predict MODEL FOLDER --csv` as it is in this checkout,
- the same at `--baseline` (a git revision; default: the version the catalogue issue was filed
  against),
- the loop a user would write: open, grey, resize to 28x28, `model.predict` on each photo.

For each: wall time, photos a second, CPU seconds (user + system of the whole process tree),
peak memory (PSS summed over the process tree, polled every 50 ms in a run of its own) and
accuracy from the folder names. `--memory K` also runs this checkout's predict on the same
photos listed K times (links) and prints its peak memory beside the single run's.
"""

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import photo_like  # noqa: E402

import fashion_mnist_cnn as fm  # noqa: E402
from fashion_shop import folders, photos  # noqa: E402

FILED_AGAINST = "5d4a29c"  # main when the catalogue issue was filed
SORTING = "this checkout, --sort-into"

PLAIN_LOOP = """
import csv, sys
from pathlib import Path
import keras, numpy as np
from PIL import Image
CLASS_NAMES = {names!r}
model = keras.models.load_model(sys.argv[1])
with open(sys.argv[3], "w", newline="") as file:
    rows = csv.writer(file)
    rows.writerow(["path", "class"])
    for path in sorted(Path(sys.argv[2]).rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            image = Image.open(path).convert("L").resize((28, 28))
            x = np.asarray(image, np.float32)[None, :, :, None] / 255
            rows.writerow([path, CLASS_NAMES[int(np.argmax(model.predict(x, verbose=0)))]])
"""


def make_one(task):
    index, label, image, folder = task
    rng = np.random.default_rng(index)
    photo, _ = photo_like.make_photo(image, rng, sides=(800, 2400))
    return photo_like.save_photo(photo, folder / f"test{index:05d}", rng, qualities=(85, 95))


def make_shots(count, folder):
    """`count` large shots, as many of each class as it divides into, made once."""
    if folder.with_name(folder.name + ".complete").exists():
        return folder
    (_, _), (x_test, y_test) = fm.load_fashion_mnist()
    rng = np.random.default_rng(0)
    tasks = []
    for label, name in enumerate(fm.CLASS_NAMES):
        (folder / folders.class_folder(name)).mkdir(parents=True, exist_ok=True)
        picks = rng.permutation(np.flatnonzero(y_test == label))[: count // 10]
        tasks += [(i, label, x_test[i], folder / folders.class_folder(name)) for i in picks]
    print(f"making {len(tasks)} shots in {folder} (once) ...", flush=True)
    with Pool(fm.cpu_cores()) as pool:
        pool.map(make_one, tasks, chunksize=8)
    folder.with_name(folder.name + ".complete").touch()
    return folder


def listed_times(folder, times):
    """A folder that lists each shot `times` times, as links: more photos, the same files."""
    many = folder.with_name(f"{folder.name}-x{times}")
    if not many.with_name(many.name + ".complete").exists():
        for n in range(times):
            for shot in folder.rglob("*"):
                if shot.suffix in (".jpg", ".png"):
                    link = many / f"copy{n}" / shot.relative_to(folder)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.exists():
                        link.symlink_to(shot)
        many.with_name(many.name + ".complete").touch()
    return many


def process_tree(pid):
    tree, todo = [], [pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return tree


def tree_pss(pid):
    """Proportional set size of a process and its descendants, in bytes: shared pages are
    shared out, so forked workers are not counted twice."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def become_subreaper():
    """Processes our children leave behind (multiprocessing's forkserver and its workers) are
    handed to us, not to init, so that waiting for them counts their CPU time too."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def timed(command, memory=False):
    """Run a command; its wall seconds, CPU seconds (its own and every descendant's) and exit
    status; with memory, also its peak memory, polled every 50 ms (which costs some CPU, so
    timed rounds leave it out)."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_pss(process.pid)) if memory else 0
        time.sleep(0.05 if memory else 0.005)
    wall = time.perf_counter() - start
    while True:  # the descendants it left, handed to us
        try:
            os.wait()
        except ChildProcessError:
            break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    error = process.stderr.read().decode(errors="replace")
    if process.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{error}")
    return {"wall": wall, "cpu": cpu, "peak": peak}


def accuracy(csv_path, folder):
    """Share of rows whose class is the one named by the photo's class folder."""
    truth = {
        str(path): fm.CLASS_NAMES[label] for path, label in folders.find_labelled_photos(folder)
    }
    with open(csv_path, newline="") as file:
        return np.mean([truth[row["path"]] == row["class"] for row in csv.DictReader(file)])


def sides(args, work):
    """name -> command writing its CSV to work/<name>.csv."""
    baseline = work / "baseline"
    baseline.mkdir(exist_ok=True)
    # The whole tree at that revision: from 2026-12 on, predict lives in fashion_shop/ beside it.
    tree = subprocess.run(
        ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=tree, check=True)
    (work / "plain_loop.py").write_text(PLAIN_LOOP.format(names=fm.CLASS_NAMES))
    python = sys.executable
    predict = ["predict", str(args.model), str(args.folder), "--csv"]
    return {
        "this checkout": [python, str(ROOT / "fashion_mnist_cnn.py"), *predict, work / "now.csv"],
        f"at {args.baseline}": [python, str(baseline / "fashion_mnist_cnn.py"), *predict]
        + [work / "baseline.csv"],
        "plain loop": [python, str(work / "plain_loop.py"), args.model, args.folder]
        + [work / "loop.csv"],
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="a model.keras from a full-data training run")
    parser.add_argument("--photos", type=int, default=1000, help="how many shots")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--baseline", default=FILED_AGAINST, help="git revision to compare")
    parser.add_argument("--memory", type=int, default=0, help="also list the shots K times")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the plain loop")
    parser.add_argument(
        "--sort-into",
        action="store_true",
        help="also this checkout's predict --sort-into (folders, thumbnails, the page), into a "
        "new folder each round",
    )
    args = parser.parse_args()
    become_subreaper()
    args.folder = make_shots(
        args.photos, Path(tempfile.gettempdir()) / f"fashion-mnist-catalogue-{args.photos}"
    )
    count = len(photos.find_images([args.folder]))
    print(f"{fm.cpu_info()[0]}, {fm.cpu_cores()} cores")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        commands = sides(args, work)
        if args.skip_loop:
            del commands["plain loop"]
        csvs = dict(zip(commands, ["now.csv", "baseline.csv", "loop.csv"]))
        sorted_into = work / "sorted"
        if args.sort_into:
            commands[SORTING] = [*commands["this checkout"][:-2], "--sort-into", sorted_into]
            csvs[SORTING] = "sorted/predictions.csv"
        best = {}
        for round_ in range(args.rounds):
            for name, command in commands.items():
                shutil.rmtree(sorted_into, ignore_errors=True)  # sorted anew, not skipped
                result = timed(command)
                print(f"round {round_ + 1}, {name}: {result['wall']:.1f} s", flush=True)
                if name not in best or result["wall"] < best[name]["wall"]:
                    best[name] = result
        for name, command in commands.items():
            shutil.rmtree(sorted_into, ignore_errors=True)
            best[name]["peak"] = timed(command, memory=True)["peak"]
        for name, csv_name in csvs.items():
            best[name]["accuracy"] = accuracy(work / csv_name, args.folder)

        now = best["this checkout"]
        print(f"\n{count} photos, fastest of {args.rounds} rounds each:")
        print("| run | wall | photos a second | CPU | peak memory | accuracy | this checkout |")
        print("|---|---|---|---|---|---|---|")
        for name, result in best.items():
            print(
                f"| {name} | {result['wall']:.1f} s | {count / result['wall']:.0f} | "
                f"{result['cpu']:.1f} s | {result['peak'] / 2**20:.0f} MB | "
                f"{result['accuracy']:.1%} | {result['wall'] / now['wall']:.2f}x faster |"
            )
        if args.memory > 1:
            many = listed_times(args.folder, args.memory)
            command = commands["this checkout"][:-3] + [str(many), "--csv", work / "many.csv"]
            result = timed(command, memory=True)
            print(
                f"\n{count * args.memory} photos (the same listed {args.memory} times): "
                f"{result['wall']:.1f} s, peak memory {result['peak'] / 2**20:.0f} MB, "
                f"{result['peak'] / now['peak']:.2f}x that for {count}"
            )
            if args.sort_into:
                shutil.rmtree(sorted_into, ignore_errors=True)
                command = commands[SORTING][:-3] + [str(many), "--sort-into", sorted_into]
                result = timed(command, memory=True)
                print(
                    f"the same, sorted: peak memory {result['peak'] / 2**20:.0f} MB, "
                    f"{result['peak'] / best[SORTING]['peak']:.2f}x that for {count}"
                )


if __name__ == "__main__":
    main()
