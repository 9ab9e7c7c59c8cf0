"""`fashion_mnist_cnn.py review DIR`: check a sorted catalogue's unsure photos in the browser,
one key a photo, least sure first; with --queue, the photos of a labelled folder whose folder
a model doubts (finetune --backbone's doubtful.csv), best first. Each decision is a file move,
as a person's in a file manager, so that predict and finetune read it as theirs."""

import contextlib
import csv
import errno
import fcntl
import html
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import webbrowser
from pathlib import Path, PurePosixPath

from fashion_mnist_cnn import CLASS_NAMES, ArgumentParser, UserError, checked, digits
from fashion_shop import review_page, sorting
from fashion_shop.catalogue import read_rows_done
from fashion_shop.doubts import DOUBTFUL_HEADER
from fashion_shop.folders import folder_class
from fashion_shop.review_server import Item, Refused, Review, photo_path, start_server

port_number = checked(digits, lambda n: n < 65536, "a port from 0 (a free one) to 65535")
# The columns of finetune --backbone's list of photos whose folder the model doubts.
LIST_COLUMNS = DOUBTFUL_HEADER


def parse_review_args(argv):
    parser = ArgumentParser(
        prog="fashion_mnist_cnn.py review",
        description="Check photos in your browser, one key a photo: the unsure photos of a "
        "folder that predict --sort-into made, least sure first; or, with --queue, the photos "
        "of a labelled folder whose folder the model doubts. Each decision moves the file into "
        "the class folder chosen (out of unsure/), as you would by hand; run it again to go on "
        "where you stopped. The page is served on 127.0.0.1 only, to whoever has the address "
        "printed (a secret token in it).",
    )
    parser.add_argument(
        "folder",
        type=Path,
        help="a folder that predict --sort-into made; with --queue, the labelled folder "
        "(a subfolder per class) that finetune read",
    )
    parser.add_argument(
        "--queue",
        type=Path,
        metavar="LIST",
        help="the doubtful.csv of a finetune --backbone run on FOLDER: check those photos, "
        "the likeliest mistakes first",
    )
    parser.add_argument(
        "--port", type=port_number, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--no-browser", action="store_true", help="print the address only; open no browser"
    )
    return parser.parse_args(argv)


def check_writable(folder, what):
    """Refused in one line, before the page is served, where moves or the record cannot go."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"{what}: cannot write there ({error.strerror})") from None


def leads_out(folder, rel):
    """Whether the photo at rel is, links resolved, outside folder (or links in a loop)."""
    try:
        photo_path(folder.resolve(), rel.as_posix())
    except Refused:
        return True
    return False


def sorted_rows(folder):
    """The rows of predict's CSV in a sorted catalogue; refused in review's words where it is
    damaged (read_rows_done's own words name predict's options)."""
    path = folder / sorting.CSV_NAME
    try:
        return read_rows_done(path, [], sorted_into=folder)[0]
    except UserError as error:  # "--sort-into F: PATH REASON; sort into another folder, ..."
        reason = str(error).partition(f"{path} ")[2].rpartition("; sort into")[0]
        raise UserError(
            f"{path} {reason or 'cannot be read'}: review needs the CSV that predict "
            f"--sort-into wrote in {folder}"
        ) from None


def catalogue_queue(folder):
    """The photos in the unsure/ folders of a sorted catalogue, least sure first (by the
    probability predict gave; a photo a person put there last), each proposed for the class
    of its folder. Links leading out of the folder (predict --link's) are left out."""
    if not sorting.is_sorted_catalogue(folder) or not (folder / sorting.CSV_NAME).is_file():
        raise UserError(
            f"{folder}: not a folder that predict --sort-into made (no {sorting.PAGE_NAME} and "
            f"{sorting.CSV_NAME}); give one, or --queue with finetune's doubtful.csv for a "
            "labelled folder"
        )
    rows = sorted_rows(folder)
    files = sorting.scan(folder)
    now, theirs = sorting.match(rows, files)
    answers = {row.path: row for row in rows}
    found = [(rel, answers[photo]) for photo, rel in now.items() if rel is not None]
    found += [(rel, None) for rel in theirs]
    unsure = [(rel, row) for rel, row in found if sorting.in_unsure(rel)]
    outside = [rel for rel, _ in unsure if leads_out(folder, rel)]
    if outside:
        many = len(outside) > 1
        print(
            f"note: {len(outside):,} unsure photo{'s are links' if many else ' is a link'} to "
            f"{'files' if many else 'a file'} outside {folder} (e.g. {outside[0]}): review shows "
            "and moves only photos inside it, so check those by hand",
            file=sys.stderr,
        )
    unsure.sort(key=lambda pair: (pair[1].probability if pair[1] else 2.0, str(pair[0])))
    return [
        Item(
            rel.as_posix(),
            rel.as_posix(),
            files[rel],
            [[name, probability] for name, probability in row.top3] if row else [],
        )
        for rel, row in unsure
        if rel not in outside
    ]


def record_path(listed):
    """Where review keeps the photos of a --queue list decided so far: a hidden file beside it."""
    return listed.with_name(f".{listed.stem}.reviewed.json")


def read_record(listed, folder):
    """{photo: where it is now} of the list's photos decided before; refused where the record
    is damaged or was made with another folder."""
    path = record_path(listed)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
        decided, made_with = record["decided"], record["folder"]
        assert isinstance(decided, dict) and all(isinstance(v, str) for v in decided.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path}: damaged; remove it to check the list from its start") from None
    if made_with != str(folder.resolve()):
        raise UserError(
            f"--queue {listed}: checked before in {made_with}; give that folder, or remove "
            f"{path} to check the list anew"
        )
    return decided


def list_rows(listed):
    """The rows of a --queue list, as dicts, each with its line number; refused in one line
    where it is not finetune's list."""
    try:
        with listed.open(newline="", encoding="utf-8", errors="surrogateescape") as file:
            reader = csv.DictReader(file)
            if sorted(reader.fieldnames or []) != sorted(LIST_COLUMNS):
                raise UserError(
                    f"--queue {listed}: not a list of doubtful photos (its columns are not "
                    f"{', '.join(LIST_COLUMNS)})"
                )
            return [(reader.line_num, row) for row in reader]
    except OSError as error:
        raise UserError(f"--queue {listed}: cannot be read ({error.strerror})") from None
    except csv.Error as error:
        raise UserError(f"--queue {listed}: damaged ({error})") from None


def probability(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if 0 <= value <= 1 else None


def listed_item(folder, row, decided):
    """A row of the list as an item of the queue, the reason it cannot be one, or None where
    the photo is no longer where the list (or the record) says: moved by hand."""
    photo = row["photo"] or ""
    try:
        photo_path(folder.resolve(), photo)
    except Refused as refused:  # the server's own rule for a photo's path
        return str(refused)
    parts = PurePosixPath(photo).parts
    if row["folder_class"] not in CLASS_NAMES or row["model_class"] not in CLASS_NAMES:
        return "folder_class and model_class must each be a class (as in CLASS_NAMES)"
    chance, own = probability(row["model_probability"]), probability(row["folder_probability"])
    if chance is None or own is None:
        return "model_probability and folder_probability must be numbers from 0 to 1"
    if CLASS_NAMES[folder_class(parts[0])] != row["folder_class"]:
        return (
            f"{photo} is in a folder of class {CLASS_NAMES[folder_class(parts[0])]}, not "
            + (row["folder_class"])
        )
    # Decided where the record says it went; where it is not there, a stop came before the
    # move: undecided, where the list says.
    done = photo in decided and os.path.lexists(folder / decided[photo])
    now = decided[photo] if done else photo
    if not os.path.lexists(folder / now):
        return None
    if leads_out(folder, PurePosixPath(now)):
        return f"{photo} leads out of {folder}"
    answers = [[row["model_class"], chance], [row["folder_class"], own]]
    return Item(photo, now, CLASS_NAMES.index(row["model_class"]), answers, decided=done)


def listed_queue(folder, listed):
    """The photos of a --queue list, in its order, those decided before marked so."""
    decided = read_record(listed, folder)
    items, seen, moved = [], set(), []
    for line, row in list_rows(listed):
        item = listed_item(folder, row, decided)
        if item is None:
            moved.append(row["photo"])
            continue
        if isinstance(item, str):
            raise UserError(
                f"--queue {listed}, line {line}: {item} (give the folder finetune read for it)"
            )
        if item.photo in seen:
            raise UserError(f"--queue {listed}, line {line}: {item.photo} is listed twice")
        seen.add(item.photo)
        items.append(item)
    if moved and not items:
        raise UserError(
            f"--queue {listed}: {moved[0]} is not in {folder}, nor any photo it lists; give "
            "the folder finetune read for it"
        )
    if moved:
        many = len(moved) > 1
        print(
            f"note: {len(moved):,} listed photo{'s are' if many else ' is'} no longer where the "
            f"list says (e.g. {moved[0]}; moved by hand?): left out",
            file=sys.stderr,
        )
    return items


def open_review(args):
    """The folder and its queue, every check made before the page is served."""
    if not args.folder.is_dir():
        problem = "not a folder" if args.folder.exists() else "no such folder"
        raise UserError(f"{args.folder}: {problem}")
    if args.queue is None:
        items, record = catalogue_queue(args.folder), None
    else:
        if args.queue.is_dir():
            raise UserError(f"--queue {args.queue}: a folder, not a list (give its doubtful.csv)")
        if not args.queue.is_file():
            raise UserError(f"--queue {args.queue}: no such file")
        items, record = listed_queue(args.folder, args.queue), record_path(args.queue)
        check_writable(args.queue.parent, f"--queue {args.queue}")
    check_writable(args.folder, str(args.folder))
    return Review(args.folder, items, record)


def lock_path(args):
    """The file whose lock says a review is running: beside the record for a --queue list,
    hidden in the folder for a catalogue."""
    if args.queue is None:
        return args.folder / ".review.lock"
    return record_path(args.queue).with_suffix(".lock")


@contextlib.contextmanager
def alone(args):
    """This review the only one of its folder or list while it runs (two would each rewrite
    the record, or the page, from their own items, losing the other's decisions): an
    exclusive lock, let go by the system however this process ends; refused in one line."""
    what = f"--queue {args.queue}" if args.queue else str(args.folder)
    try:
        held = os.open(lock_path(args), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise UserError(f"{what}: cannot write there ({error.strerror})") from None
    with open(held, "r+", encoding="ascii") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise UserError(
                f"{what}: already being reviewed by another review (pid "
                f"{file.read().strip() or '?'}); stop that one first, or go on in its page"
            ) from None
        file.truncate(0)
        file.seek(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield


def serve(review, port):
    """The server started, or the port's trouble in one line."""
    try:
        return start_server(review, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(
                f"--port {port}: taken by another program; give another, or leave --port out "
                "for a free one"
            ) from None
        raise UserError(f"--port {port}: cannot listen there ({error.strerror})") from None


def redirect_file(url):
    """A page that leads the browser to url, readable by this user only (in a folder of its
    own): what the browser is given, so that the token is in no program's arguments, which
    anyone on the machine can read (as Jupyter's use_redirect_file)."""
    page = Path(tempfile.mkdtemp(prefix="review-")) / "open.html"
    address = html.escape(url, quote=True)
    with open(os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url='
            f'{address}"><title>review</title><a href="{address}">Open review</a>\n'
        )
    return page


def remove_redirect(page):
    if page is not None:
        shutil.rmtree(page.parent, ignore_errors=True)


def open_browser(url):
    """The address opened in a browser where there is one with a window, through a redirect
    file (returned, to be removed at the stop); else nothing (a console browser would take
    over this terminal)."""
    no_display = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if sys.platform.startswith("linux") and no_display:
        page = None
    else:
        page = redirect_file(url)
        try:
            opened = webbrowser.open(page.as_uri())
        except webbrowser.Error:
            opened = False
        if not opened:
            remove_redirect(page)
            page = None
    if page is None:
        print("No browser to open here: open the address in a browser on this machine")
    return page


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # kill (SIGTERM) stops review as Ctrl+C does


def refresh_page(folder):
    """The catalogue's index.html written anew, with the moves made (as predict would)."""
    rows = sorted_rows(folder)
    view = review_page.overview(folder, rows, sorting.read_models(folder))
    review_page.write_page(folder, view, None)


def main(argv):
    """Arguments -> the folder and its queue checked -> served until Ctrl+C -> what was done."""
    args = parse_review_args(argv)
    review = open_review(args)
    left = sum(not item.decided for item in review.items)
    what = f"--queue {args.queue}" if args.queue else f"{args.folder}'s unsure/ folders"
    if not left:
        print(f"Nothing to check: no photo left in {what}")
        return 0
    to_check = f"{left:,} photo{'s' if left > 1 else ''} to check in {what}"
    with alone(args):
        decided = served(review, args, to_check)
    print(f"\nStopped: {decided:,} decided, {len(review.items) - decided:,} left")
    return 0


def served(review, args, to_check):
    """The page served until Ctrl+C or kill; the number decided, the page refreshed."""
    server, token = serve(review, args.port)
    url = f"http://127.0.0.1:{server.server_address[1]}/?token={token}"
    order = "likeliest mistakes" if args.queue else "least sure"
    page = None
    before = signal.signal(signal.SIGTERM, stop_on_sigterm)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C, wherever it comes: stopped
        print(f"{to_check}, {order} first, at\n  {url}", flush=True)
        if not args.no_browser:
            page = open_browser(url)
        print("Ctrl+C stops it; the same command goes on where it stopped", flush=True)
        threading.Event().wait()
    signal.signal(signal.SIGTERM, before)
    server.shutdown()
    remove_redirect(page)
    with review.lock:  # a decision in flight is finished first
        if args.queue is None:
            refresh_page(args.folder)
        return sum(item.decided for item in review.items)
