"""fashion_shop/review_page.py: the sorted catalogue's page, opened from the disk in a real
browser (headless Chromium): the counts, every thumbnail loaded, least sure first."""

import collections
import csv
import html
import html.parser
import shutil
import subprocess

import numpy as np
import pytest
from photo_helpers import framed_items, sharpened_model
from PIL import Image

import fashion_mnist_cnn as fm
from fashion_shop import review_page, sorting
from fashion_shop.folders import names_no_class

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's notes say to start it: no sandbox as root, and no network of its own.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """40 photos of framed items sorted by a model, then a person's work: one corrected, one
    moved into a misspelt folder, one left loose in the folder."""
    base = tmp_path_factory.mktemp("shop")
    model = sharpened_model(base / "model.keras")
    labels = np.random.default_rng(3).integers(0, 10, 40)
    (base / "photos").mkdir()
    for n, image in enumerate(framed_items(labels, seed=4)):
        Image.fromarray(np.kron(image, np.ones((4, 4), np.uint8))).save(
            base / "photos" / f"{n}.png"
        )
    out = base / "sorted"
    code = fm.main(["predict", str(model), str(base / "photos"), "--sort-into", str(out)])
    assert code == 0
    (first, label), (second, _), (third, _) = sorted(sorting.scan(out).items())[:3]
    other = sorting.class_folder(fm.CLASS_NAMES[(label + 1) % 10])
    (out / other).mkdir(exist_ok=True)
    (out / first).rename(out / other / first.name)  # a person's correction
    (out / "Sandle").mkdir()
    (out / second).rename(out / "Sandle" / second.name)  # a misspelt class folder
    (out / third).rename(out / third.name)  # outside the class folders
    assert fm.main(["predict", str(model), str(base / "photos"), "--sort-into", str(out)]) == 0
    return out


class Page(html.parser.HTMLParser):
    """What the tests read of the page's DOM: count rows, and each section's photos."""

    def __init__(self):
        super().__init__()
        self.counts, self.sections, self.images, self.svg = {}, collections.defaultdict(list), [], 0
        self.section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-class" in attrs:
            self.counts[attrs["data-class"]] = int(attrs["data-count"])
        elif tag == "section":
            self.section = attrs.get("data-class", attrs.get("data-folder"))
        elif tag == "figure":
            self.sections[self.section].append(attrs)
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "polyline":
            self.svg += 1


def dom_after_loading(page):
    """The page's DOM as Chromium has it once loaded, in a window tall enough for every lazy
    thumbnail to load."""
    result = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            "--window-size=1280,30000",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = Page()
    parsed.feed(result.stdout)
    return parsed


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_the_page_in_a_browser_counts_every_class_shows_every_thumbnail_least_sure_first(
    sorted_folder,
):
    page = dom_after_loading(sorted_folder / sorting.PAGE_NAME)
    with open(sorted_folder / sorting.CSV_NAME, newline="") as file:
        rows = list(csv.DictReader(file))
    files = sorting.scan(sorted_folder)  # where each photo is now, the person's move included
    in_folders = collections.Counter(fm.CLASS_NAMES[label] for label in files.values())
    assert sum(in_folders.values()) == len(rows) - 2  # two outside the class folders
    assert page.counts == {name: in_folders[name] for name in fm.CLASS_NAMES}
    assert len(page.images) == len(rows) == 40
    assert all(image.get("data-loaded") == "yes" for image in page.images), page.images
    assert all(image["src"].startswith(sorting.THUMBNAILS) for image in page.images)
    assert len(page.sections["Sandle"]) == len(page.sections["."]) == 1
    for name in fm.CLASS_NAMES:
        photos = page.sections.get(name, [])
        probabilities = [float(photo["data-probability"]) for photo in photos]
        assert probabilities == sorted(probabilities), name  # least sure first
        assert len(photos) == in_folders[name]
    unsure = [photo for photos in page.sections.values() for photo in photos]
    assert any("unsure" in photo["class"] for photo in unsure)
    assert sum("corrected" in photo["class"] for photo in unsure) == 1
    assert page.svg == 2  # expected from the probabilities, and from the correction


def test_the_page_itself_counts_every_class_least_sure_first(sorted_folder):
    """The same as the browser test, read from the file: for machines without Chromium."""
    page = Page()
    page.feed((sorted_folder / sorting.PAGE_NAME).read_text())
    files = sorting.scan(sorted_folder)
    counts = collections.Counter(fm.CLASS_NAMES[label] for label in files.values())
    assert page.counts == {name: counts[name] for name in fm.CLASS_NAMES}
    for name in fm.CLASS_NAMES:
        photos = page.sections.get(name, [])
        probabilities = [float(photo["data-probability"]) for photo in photos]
        assert probabilities == sorted(probabilities) and len(photos) == counts[name], name


def test_the_page_lists_the_photos_outside_the_class_folders_in_finetunes_words(sorted_folder):
    page = Page()
    text = (sorted_folder / sorting.PAGE_NAME).read_text()
    page.feed(text)
    assert [len(page.sections[where]) for where in ("Sandle", ".")] == [1, 1]
    assert html.escape(names_no_class(sorted_folder / "Sandle")) in text
    assert "1 photo is outside the class subfolders, with no label" in text
    assert f"{sum(page.counts.values())} photos sorted by class, 2 outside them" in text


def test_each_photo_shows_the_class_probability_and_runner_up_of_its_row(sorted_folder):
    text = (sorted_folder / sorting.PAGE_NAME).read_text()
    with open(sorted_folder / sorting.CSV_NAME, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        runner_up = row["top3"].split("; ")[1]
        said = f"{row['class']} {float(row['probability']):.0%}<br>then {runner_up}</figcaption>"
        assert said in text  # (no class name holds a character HTML escapes)


def test_the_page_loads_nothing_from_elsewhere(sorted_folder):
    text = (sorted_folder / sorting.PAGE_NAME).read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_checking_all_photos_makes_the_catalogue_right_and_none_changes_nothing():
    probabilities, right = [0.3, 0.9, 0.6, 0.99], [False, True, True, True]
    points = review_page.curve_points(probabilities, right)
    assert points[0] == (0.0, 0.75) and points[-1] == (1.0, 1.0)
    assert [y for _, y in points] == sorted(y for _, y in points)  # least sure first pays first
    assert review_page.curve_points([0.5], [False])[-1] == (1.0, 1.0)
