"""`predict --runner DirectRunner` (Apache Beam on this machine) against `predict --csv`, on the
same large shots, and what a cluster would need for a marketplace's catalogue.

    python benchmarks/beam_predict.py MODEL                 # 1,000 shots, 2 rounds
    python benchmarks/beam_predict.py MODEL --photos 1000 --rounds 2

Makes the shots of benchmarks/catalogue.py once (longest side 800 to 2,400 px), then runs, in
fresh processes, alternating and keeping each side's fastest round: predict --csv; the same on
Beam's DirectRunner in one process (its default); and on the DirectRunner with a worker process
a core. For each: wall time, photos a second, CPU seconds of the whole process tree, photos per
CPU second (a worker core's rate), peak memory (PSS summed over the process tree, and the
largest process's maximum RSS as /usr/bin/time -v reports it), and whether its CSV equals
predict's byte for byte. Then, on paper, the workers and hours for 1M and 20M photos on a
cluster of 4-core workers, at the one-process DirectRunner's photos per CPU second past its
start (TensorFlow's import and the model's load, measured by a run on 30 shots).
"""

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import catalogue as shots  # noqa: E402  (benchmarks/catalogue.py: the shots, and the timer)

import fashion_mnist_cnn as fm  # noqa: E402

WORKER_CORES = 4  # a cluster worker on paper: 4 cores (Dataflow's n1-standard-4, say)
CATALOGUES = [1_000_000, 20_000_000]
FEW = 30  # shots in the run that measures the start


def commands(model, folder, work):
    """side -> the command writing its CSV to work/<side>.csv."""
    predict = [sys.executable, str(ROOT / "fashion_mnist_cnn.py"), "predict", str(model), folder]
    cores = fm.cpu_cores()
    return {
        "predict --csv": [*predict, "--csv", work / "predict.csv"],
        "DirectRunner, in one process": [
            *predict, "--csv", work / "direct.csv", "--runner", "DirectRunner",
        ],
        f"DirectRunner, {cores} worker processes": [
            *predict, "--csv", work / "workers.csv", "--runner", "DirectRunner",
            f"--direct_num_workers={cores}", "--direct_running_mode=multi_processing",
        ],
    }  # fmt: skip


def peak_memory(command, work):
    """(PSS summed over the process tree, polled; the largest process's maximum RSS, as
    /usr/bin/time -v reports it), in bytes, from one run."""
    report = work / "time-v.txt"
    timed = ["/usr/bin/time", "-v", "-o", report, *command]
    pss = shots.timed(timed, memory=True)["peak"]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())[1]
    return pss, int(rss) * 1024


def on_paper(rate):
    """Workers and hours for each catalogue on a cluster, from photos per CPU second."""
    lines = []
    for count in CATALOGUES:
        core_hours = count / rate / 3600
        workers_in_an_hour = math.ceil(core_hours / WORKER_CORES)
        lines.append(
            f"| {count:,} photos | {core_hours:,.1f} core-hours | "
            f"{workers_in_an_hour:.0f} workers of {WORKER_CORES} cores for about an hour | "
            f"{core_hours / (10 * WORKER_CORES):.1f} h on 10 such workers |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a model.keras from a full-data training run")
    parser.add_argument("--photos", type=int, default=1000, help="how many shots")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per side")
    args = parser.parse_args()
    shots.become_subreaper()
    folder = shots.make_shots(
        args.photos, Path(tempfile.gettempdir()) / f"fashion-mnist-catalogue-{args.photos}"
    )
    count = len(shots.photos.find_images([folder]))
    print(f"{fm.cpu_info()[0]}, {fm.cpu_cores()} cores; {count} shots in {folder}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        sides = commands(args.model, folder, work)
        best = {}
        for round_ in range(args.rounds):
            for name, command in sides.items():
                result = shots.timed(command)
                print(f"round {round_ + 1}, {name}: {result['wall']:.1f} s", flush=True)
                if name not in best or result["wall"] < best[name]["wall"]:
                    best[name] = result
        for name, command in sides.items():
            best[name]["peak"], best[name]["rss"] = peak_memory(command, work)
        predicted = (work / "predict.csv").read_bytes()
        csvs = {name: command[command.index("--csv") + 1] for name, command in sides.items()}
        plain = best["predict --csv"]
        print(f"\n{count} shots, fastest of {args.rounds} rounds each:")
        print(
            "| run | wall | photos a second | CPU | photos per CPU second | peak PSS (tree) | "
            "max RSS (largest process) | CSV = predict's | wall / predict's |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, result in best.items():
            print(
                f"| {name} | {result['wall']:.1f} s | {count / result['wall']:.0f} | "
                f"{result['cpu']:.1f} s | {count / result['cpu']:.0f} | "
                f"{result['peak'] / 2**20:.0f} MB | {result['rss'] / 2**20:.0f} MB | "
                f"{'yes' if csvs[name].read_bytes() == predicted else 'NO'} | "
                f"{result['wall'] / plain['wall']:.2f}x |"
            )
        # A worker classifies for hours: its rate is the one past TensorFlow's start and the
        # model's load, which a run on a few shots measures.
        few = shots.make_shots(FEW, folder.with_name(f"fashion-mnist-catalogue-{FEW}"))
        one = "DirectRunner, in one process"
        start = shots.timed(commands(args.model, few, work)[one])["cpu"]
        rate = (count - FEW) / (best[one]["cpu"] - start)
        print(
            f"\n{one}: {start:.1f} CPU seconds for {FEW} shots, so {rate:.0f} photos per CPU "
            f"second past the start. On paper, at that rate ({WORKER_CORES} such processes a "
            f"{WORKER_CORES}-core worker; reading the photos from cloud storage and the workers' "
            "start, minutes, not counted):"
        )
        print("\n".join(on_paper(rate)))


if __name__ == "__main__":
    main()
