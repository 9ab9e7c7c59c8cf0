"""DIR/index.html, the review page of a sorted catalogue: one static file that opens from the
disk (nothing from a server or the internet), with each class's photos as thumbnails, least
sure first, the ones to check marked, the photos outside the class folders listed, and, where
the model's probabilities are calibrated, how right the catalogue is for the share checked.
overview() counts what the page and predict's summary say, once."""

import html
import os
import urllib.parse
from pathlib import Path
from typing import NamedTuple

from fashion_mnist_cnn import CLASS_NAMES, atomic_path
from fashion_shop.photos import thumbnail_name
from fashion_shop.sorting import (
    PAGE_NAME,
    THUMBNAILS,
    UNSURE,
    in_unsure,
    match,
    outside_classes,
    outside_line,
    scan,
)

# What to sort with instead of a model whose probabilities are not calibrated.
CALIBRATED_INSTEAD = "finetune --backbone mobilenet_v2 on labelled photos"

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.photos { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 132px; border: 3px solid #ddd; border-radius: 4px; padding: 3px; }
figure img { width: 126px; height: 126px; object-fit: contain; background: #f4f4f4; }
figcaption { font-size: 11px; overflow-wrap: anywhere; }
figure.unsure { border-color: #e8590c; background: #fff4e6; }
figure.corrected { border-color: #2f9e44; }
.mark { font-weight: bold; color: #e8590c; }
"""
# Each thumbnail says whether it loaded, so that a browser (and the tests) can tell.
SCRIPT = """
for (const img of document.querySelectorAll("img")) {
  const mark = () => { img.dataset.loaded = img.naturalWidth > 0 ? "yes" : "no"; };
  if (img.complete) mark();
  else { img.addEventListener("load", mark); img.addEventListener("error", mark); }
}
"""


def shown(path):
    """A path as a person reads it (a name that is not UTF-8 with its odd bytes replaced)."""
    return html.escape(str(path).encode(errors="surrogateescape").decode(errors="replace"))


def link(path):
    """A relative URL to path that works from the disk, whatever bytes its name holds."""
    return html.escape(urllib.parse.quote(os.fsencode(Path(path).as_posix())))


def entries(rows, files):
    """Each photo in files now, with what predict answered for it (None for a photo a person
    put there): (class index, or None outside the class folders, path, row), least sure first
    in each class."""
    answers = {row.path: row for row in rows}
    now, others = match(rows, files)
    found = [(files[rel], rel, answers[photo]) for photo, rel in now.items() if rel is not None]
    found += [(files[rel], rel, None) for rel in others]

    def order(entry):
        label, rel, row = entry
        return (-1 if label is None else label, row.probability if row else 2.0, str(rel))

    return sorted(found, key=order)


class Overview(NamedTuple):
    """A sorted folder as it is now, as the page and predict's summary tell it."""

    photos: list  # (class index, path, row or None) in the class folders, least sure first
    outside: dict  # {folder: [(path, row or None)]}: photos outside the class folders
    to_check: int  # photos in unsure folders
    corrected: int  # photos a person moved to another class than predict's answer
    not_calibrated: list  # the files of the models not calibrated whose answers are shown
    expected: tuple | None  # calibrated: the share right expected as sorted, and once checked

    @property
    def total(self):
        return len(self.photos) + sum(map(len, self.outside.values()))


def overview(folder, rows, models):
    """The folder's photos now with their rows; models: the folder's record of the models that
    sorted it (sorting.read_models), which says whose probabilities are calibrated."""
    files = scan(folder)
    outside = outside_classes(folder)
    where = {rel: place for place, photos in outside.items() for rel in photos}
    everything = entries(rows, {**files, **dict.fromkeys(where)})
    photos = [entry for entry in everything if entry[0] is not None]
    away = {place: [] for place in outside}
    for _, rel, row in (entry for entry in everything if entry[0] is None):
        away[where[rel]].append((rel, row))
    answered = [(rel, row) for _, rel, row in photos if row]
    not_calibrated = sorted(
        {
            models.get(row.model, {}).get("path", "a model not recorded")
            for _, row in answered
            if not models.get(row.model, {}).get("calibrated")
        }
    )
    expected = None
    if answered and not not_calibrated:
        sure = sum(row.probability for rel, row in answered if not in_unsure(rel))
        checked = sum(in_unsure(rel) for rel, _ in answered)
        as_sorted = sum(row.probability for _, row in answered)
        expected = (as_sorted / len(answered), (checked + sure) / len(answered))
    return Overview(
        photos,
        away,
        sum(in_unsure(rel) for _, rel, _ in photos),
        sum(is_corrected(label, row) for label, _, row in photos),
        not_calibrated,
        expected,
    )


def not_calibrated_line(models):
    """What predict and the page say where a model's probabilities are not calibrated."""
    return (
        f"the probabilities of {' and '.join(models)} are not calibrated (a model trained on "
        "28x28 images can be 99% sure of a mistake), so nothing is promised of how many are "
        f"right; for that, sort with a model from {CALIBRATED_INSTEAD} (with --reclassify, "
        "the photos sorted already too)"
    )


def is_corrected(label, row):
    """Whether a person moved the photo to another class folder than predict's answer."""
    return row is not None and label is not None and row.answer != CLASS_NAMES[label]


def curve_points(probabilities, right):
    """(share checked, share right) from 0 to all checked, least sure first: a checked photo
    counts as right (the person put it right)."""
    order = sorted(range(len(probabilities)), key=lambda i: probabilities[i])
    n, points = len(order), []
    for step in range(51):
        k = round(step / 50 * n)
        unchecked = sum(right[i] for i in order[k:])
        points.append((k / n, (k + unchecked) / n))
    return points


def figure(photos):
    """An SVG of the share of the catalogue right against the share checked, least sure first:
    expected from the model's own probabilities, and from the corrections where there are."""
    answered = [
        (row.probability, row.answer, CLASS_NAMES[label]) for label, _, row in photos if row
    ]
    if not answered:
        return ""
    probabilities = [p for p, _, _ in answered]
    lines = [
        (
            "expected from the model's own probabilities",
            "#1971c2",
            curve_points(probabilities, probabilities),
        )
    ]
    corrected = [answer == now for _, answer, now in answered]
    if not all(corrected):
        lines.append(
            ("from the corrections so far", "#2f9e44", curve_points(probabilities, corrected))
        )
    low = min(y for _, _, points in lines for _, y in points)
    low = max(0.0, min(low, 0.9) - 0.02)

    def xy(point):
        return f"{50 + point[0] * 400:.1f},{210 - (point[1] - low) / (1 - low) * 190:.1f}"

    parts = [
        '<svg id="figure" width="800" height="250" role="img" '
        'aria-label="share of the catalogue right against the share checked">',
        '<rect x="50" y="20" width="400" height="190" fill="none" stroke="#999"/>',
    ]
    for share in (0, 0.25, 0.5, 0.75, 1):
        x = 50 + share * 400
        parts.append(
            f'<text x="{x:.0f}" y="228" font-size="11" text-anchor="middle">{share:.0%}</text>'
        )
    for value in (low, (low + 1) / 2, 1):
        y = 210 - (value - low) / (1 - low) * 190
        parts.append(
            f'<text x="44" y="{y + 4:.0f}" font-size="11" text-anchor="end">{value:.0%}</text>'
        )
    parts.append(
        '<text x="250" y="246" font-size="12" text-anchor="middle">photos checked, '
        "least sure first</text>"
    )
    for n, (label, colour, points) in enumerate(lines):
        path = " ".join(xy(point) for point in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="460" y="{40 + 18 * n}" font-size="12" fill="{colour}">right, {label}</text>'
        )
    return "\n".join(parts) + "\n</svg>"


def photo_html(folder, label, rel, row):
    """One photo, in the folder of class `label` now: its thumbnail (or the photo itself), name,
    predict's class and probability, and the runner-up."""
    thumbnail = Path(THUMBNAILS, thumbnail_name(row.path)) if row else None
    source = thumbnail if thumbnail and (folder / thumbnail).is_file() else rel
    unsure = in_unsure(rel)
    corrected = is_corrected(label, row)
    if row is None:
        caption, probability = "put here by a person", ""
    else:
        runner_up = ""
        if len(row.top3) > 1:
            name, chance = row.top3[1]
            runner_up = f"<br>then {html.escape(name)} {chance:.1%}"
        said = "corrected from " if corrected else ""
        caption = f"{said}{html.escape(row.answer)} {row.probability:.0%}{runner_up}"
        probability = f' data-probability="{row.probability:.4f}"'
    kinds = " ".join(["photo", *["unsure"] * unsure, *["corrected"] * corrected])
    mark = '<span class="mark">check</span> ' if unsure else ""
    return (
        f'<figure class="{kinds}"{probability}><a href="{link(rel)}">'
        f'<img loading="lazy" src="{link(source)}" alt="{shown(Path(rel).name)}"></a>'
        f"<figcaption>{mark}{shown(Path(rel).name)}<br>{caption}</figcaption></figure>"
    )


def summary_html(folder, view, unsure_below):
    """The paragraph above the figure: what to check, and what is promised of it."""
    fix = (
        f"Move a photo that is wrong into the right class folder, one that is right out of "
        f"<code>{UNSURE}</code>, or check them a key a photo in the browser: <code>python "
        f"fashion_mnist_cnn.py review {shown(folder)}</code>; then run the same predict command "
        "again to refresh this page. "
        f'<span id="corrected">{view.corrected:,}</span> corrected by a person so far.'
    )
    if view.not_calibrated:
        marked = (
            f'the <b id="to-check">{view.to_check:,}</b> in <code>{UNSURE}</code> folders are '
            "only those under the share asked for (--unsure) of the model's own probability"
            if view.to_check
            else 'none is marked to check (<b id="to-check">0</b>)'
        )
        return (
            f'<p id="not-calibrated"><b>Check every class, least sure first:</b> '
            f"{html.escape(not_calibrated_line(view.not_calibrated))}; {marked}.</p>\n"
            f'<p id="summary">{fix}</p>'
        )
    expected = ""
    if view.expected:
        as_sorted, checked = view.expected
        expected = (
            f' Expected right: <b id="expected">{as_sorted:.0%}</b> as sorted, '
            f'<b id="expected-checked">{checked:.0%}</b> once those are checked.'
        )
    why = f"the model gave them under {unsure_below:.0%}" if unsure_below else "the model is unsure"
    return (
        f'<p id="summary"><b id="to-check">{view.to_check:,}</b> to check: {why}, so they are '
        f"in each class's <code>{UNSURE}</code> folder and shown first, marked.{expected} {fix}</p>"
    )


def outside_html(folder, view):
    """The photos in no class folder, each folder's with the sort's line for it."""
    parts = []
    for where, photos in view.outside.items():
        figures = "\n".join(photo_html(folder, None, rel, row) for rel, row in photos)
        line = outside_line(folder, where, [rel for rel, _ in photos])
        parts.append(
            f'<section class="outside" data-folder="{shown(where)}" data-count="{len(photos)}">'
            f'<p class="mark">{shown(line)}</p><div class="photos">\n{figures}\n</div></section>'
        )
    return "\n".join(parts)


def write_page(folder, view, unsure_below):
    """Write folder/index.html, whole, from an overview() of the folder."""
    count_rows, sections = [], []
    for label, name in enumerate(CLASS_NAMES):
        mine = [(rel, row) for index, rel, row in view.photos if index == label]
        unsure = sum(in_unsure(rel) for rel, _ in mine)
        anchor = f"class-{label}"
        count_rows.append(
            f'<tr data-class="{html.escape(name)}" data-count="{len(mine)}"><td>'
            f'<a href="#{anchor}">{html.escape(name)}</a></td><td>{len(mine)}</td>'
            f"<td>{unsure}</td></tr>"
        )
        if mine:
            figures = "\n".join(photo_html(folder, label, rel, row) for rel, row in mine)
            sections.append(
                f'<section class="class" data-class="{html.escape(name)}"><h2 id="{anchor}">'
                f'{html.escape(name)} ({len(mine)})</h2><div class="photos">\n{figures}\n'
                "</div></section>"
            )
    away = view.total - len(view.photos)
    outside = f", {away:,} outside them (below)" if away else ""
    figure_html = figure(view.photos) if view.expected else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{shown(folder.name)}: the sorted catalogue</title><style>{STYLE}</style></head>
<body>
<h1>{shown(folder.name)}: {len(view.photos):,} photos sorted by class{outside}</h1>
{summary_html(folder, view, unsure_below)}
{outside_html(folder, view)}
{figure_html}
<table id="counts"><tr><th>class</th><th>photos</th><th>to check</th></tr>
{chr(10).join(count_rows)}
</table>
{chr(10).join(sections)}
<script>{SCRIPT}</script>
</body></html>
"""
    with atomic_path(folder / PAGE_NAME) as partial:
        partial.write_text(page, encoding="utf-8")
