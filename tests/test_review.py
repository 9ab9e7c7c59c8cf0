"""fashion_shop/review.py and review_server.py: the review command's queue, its server's moves
(read by finetune and predict as a person's), hostile requests refused with the folder left
byte for byte as it was, a --queue list, and the page in a real browser (headless Chromium)."""

import argparse
import contextlib
import csv
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, assert_clean_failure, start_program, wait_for_line
from PIL import Image

from fashion_mnist_cnn import UserError
from fashion_shop import finetune, review, review_page, review_server, sorting
from fashion_shop.catalogue import SORTED_HEADER, Row, rewrite
from fashion_shop.review_server import MAX_BODY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    CHROMEDRIVER = None

# A sorted catalogue as predict --sort-into leaves it: (where the photo went, predict's top 3).
SORTED = [
    ("Coat/unsure/c1.png", [("Coat", 0.55), ("Pullover", 0.40), ("Shirt", 0.05)]),
    ("Coat/unsure/c2.png", [("Coat", 0.70), ("Shirt", 0.20), ("Pullover", 0.10)]),
    ("Sneaker/unsure/s1.png", [("Sneaker", 0.45), ("Sandal", 0.35), ("Ankle boot", 0.20)]),
    ("Bag/unsure/b1.png", [("Bag", 0.62), ("Trouser", 0.30), ("Dress", 0.08)]),
    ("Coat/c3.png", [("Coat", 0.97), ("Pullover", 0.02), ("Shirt", 0.01)]),
    ("Bag/b2.png", [("Bag", 0.99), ("Sandal", 0.005), ("Dress", 0.005)]),
]
LEAST_SURE_FIRST = ["Sneaker/unsure/s1.png", "Coat/unsure/c1.png", "Bag/unsure/b1.png",
                    "Coat/unsure/c2.png"]  # fmt: skip


def write_catalogue(folder, photos=SORTED):
    """A sorted catalogue as predict --sort-into writes it (class folders, unsure/ ones, the
    CSV, the page and its thumbnails' folder), without a model: quick."""
    rows = []
    for n, (sorted_as, top3) in enumerate(photos):
        path = folder / sorted_as
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60, 80), (40 * n % 256, 90, 200 - 20 * n)).save(path)
        rows.append(Row(f"/shop/{path.name}", top3[0][0], top3[0][1], tuple(top3), "", sorted_as))
    (folder / sorting.THUMBNAILS).mkdir()
    rewrite(folder / sorting.CSV_NAME, SORTED_HEADER, rows)
    review_page.write_page(folder, review_page.overview(folder, rows, {}), None)
    return folder


@pytest.fixture
def catalogue(tmp_path):
    return write_catalogue(tmp_path / "sorted")


def arguments(folder, queue=None, port=0):
    return argparse.Namespace(folder=folder, queue=queue, port=port, no_browser=True)


@contextlib.contextmanager
def serving(folder, queue=None):
    """review's server on a free port, in this process: (review, port, token)."""
    opened = review.open_review(arguments(folder, queue))
    server, token = review.serve(opened, 0)
    try:
        yield opened, server.server_address[1], token
    finally:
        server.shutdown()
        server.server_close()


def ask(port, method, path, body=None, headers=None, host=None):
    """(status, answer as JSON or bytes) of one request, headers as given (none added but
    Host)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    host = f"127.0.0.1:{port}" if host is None else host
    if host:
        connection.putheader("Host", host)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    if data is not None:
        connection.putheader("Content-Length", str(len(data)))
    connection.endheaders(data)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.getheader("Content-Type") == "application/json":
        return response.status, json.loads(payload)
    return response.status, payload


def post(port, token, action, body, **headers):
    headers = {"X-Token": token, "Content-Type": "application/json", **headers}
    return ask(port, "POST", f"/api/{action}", body, headers)


def decide(port, token, photo, name, now=None):
    return post(port, token, "decide", {"photo": photo, "from": now or photo, "class": name})


def every_file(folder):
    """Every file and link under folder, hashed, and every folder: to see that nothing changed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "link to " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "folder"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_the_queue_is_the_unsure_photos_least_sure_first_each_proposed_as_its_folder(catalogue):
    items = review.open_review(arguments(catalogue)).items
    assert [item.photo for item in items] == LEAST_SURE_FIRST
    first = items[0].shown(0)
    assert first["folder"] == "Sneaker/unsure" and first["proposed"] == "Sneaker"
    assert first["answers"] == [["Sneaker", 0.45], ["Sandal", 0.35], ["Ankle boot", 0.2]]


def test_unsure_photos_that_are_links_leading_out_are_left_out_and_said(
    catalogue, tmp_path, capsys
):
    (tmp_path / "original.png").write_bytes((catalogue / LEAST_SURE_FIRST[0]).read_bytes())
    (catalogue / LEAST_SURE_FIRST[0]).unlink()
    (catalogue / LEAST_SURE_FIRST[0]).symlink_to(tmp_path / "original.png")  # predict --link's
    items = review.open_review(arguments(catalogue)).items
    assert [item.photo for item in items] == LEAST_SURE_FIRST[1:]
    assert "1 unsure photo is a link to a file outside" in capsys.readouterr().err


def test_decisions_are_moves_that_finetune_and_predict_read_as_a_persons(catalogue):
    with serving(catalogue) as (_, port, token):
        assert decide(port, token, "Coat/unsure/c1.png", "Pullover") == (
            200,
            {"now": "Pullover/c1.png"},
        )
        assert decide(port, token, "Coat/unsure/c2.png", "Coat")[0] == 200  # accepted
        assert decide(port, token, "Bag/unsure/b1.png", "Bag")[0] == 200
        assert post(port, token, "undo", {"photo": "Bag/unsure/b1.png", "from": "Bag/b1.png"}) == (
            200,
            {"now": "Bag/unsure/b1.png"},
        )
    assert (catalogue / "Pullover/c1.png").is_file() and (catalogue / "Coat/c2.png").is_file()
    assert not (catalogue / "Coat/unsure/c1.png").exists()
    assert (catalogue / "Bag/unsure/b1.png").is_file()  # undone: back where it was
    counts = finetune.checked_by_a_person(catalogue)
    assert counts == {"checked": 2, "corrected": 1, "sure as sorted": 2}
    rows, _ = review.read_rows_done(catalogue / sorting.CSV_NAME, [], sorted_into=catalogue)
    now, theirs = sorting.match(rows, sorting.scan(catalogue))
    assert now["/shop/c1.png"].as_posix() == "Pullover/c1.png" and theirs == []
    # predict --reclassify leaves a photo a person moved where they put it
    sorter = sorting.Sorter(catalogue, 0.8, rows, again=["/shop/c1.png"])
    assert sorter.place_again("/shop/c1.png", sorting.Path("Coat")) == "Pullover/c1.png"
    view = review_page.overview(catalogue, rows, {})
    assert (view.to_check, view.corrected) == (2, 1)


def test_a_new_start_goes_on_where_the_last_stopped(catalogue):
    with serving(catalogue) as (_, port, token):
        for photo in LEAST_SURE_FIRST[:2]:
            assert decide(port, token, photo, "Coat")[0] == 200
    items = review.open_review(arguments(catalogue)).items
    assert [item.photo for item in items] == LEAST_SURE_FIRST[2:]


def test_a_move_onto_a_file_or_from_where_the_photo_no_longer_is_is_refused(catalogue):
    (catalogue / "Pullover").mkdir()
    (catalogue / "Pullover/c1.png").write_bytes(b"a person's own photo")
    with serving(catalogue) as (_, port, token):
        (catalogue / "Coat/unsure/c2.png").unlink()  # removed by hand meanwhile
        before = every_file(catalogue)
        status, answer = decide(port, token, "Coat/unsure/c1.png", "Pullover")
        assert status == 409 and "Pullover/c1.png exists already" in answer["error"]
        status, answer = decide(port, token, "Coat/unsure/c2.png", "Coat")
        assert status == 409 and "no longer there" in answer["error"]
        assert decide(port, token, "Bag/unsure/b1.png", "Bag")[0] == 200
        before = every_file(catalogue)
        status, answer = decide(port, token, "Bag/unsure/b1.png", "Dress")  # a second tab's
        assert status == 409 and "no longer there" in answer["error"]
        status, answer = decide(port, token, "Bag/unsure/b1.png", "Dress", now="Bag/b1.png")
        assert status == 409 and "decided already" in answer["error"]
        assert every_file(catalogue) == before


# What the refusals say, where an earlier check must not be left to a later one.
REFUSED_FOR = {
    "no token": "token",
    "a wrong token": "token",
    "the page without its token": "token",
    "the page with a wrong token": "token",
    "a foreign Origin": "requests from http://evil.example are refused",
    "another port's Origin": "requests from http://127.0.0.1:1 are refused",
    "DNS rebinding": "wrong Host",
    "DNS rebinding, the page": "wrong Host",
    "no Host": "wrong Host",
    "a huge body": f"at most {MAX_BODY} bytes",
    "malformed JSON": "not JSON",
    "not JSON": "send JSON",
    "an unknown class": "no such class",
    "traversal": "not a path inside the folder",
    "traversal in the class folder": "not a path inside the folder",
    "an absolute path": "not a path inside the folder",
    "a link leading out": "leads out of the folder",
    "a new line in a path": "Coat/?x.png",
    "links in a loop": "cannot be resolved",
    "a photo not in the queue": "no such photo in the queue",
    "a photo elsewhere than the page thought": "no longer there",
    "a photo whose file leads out": "leads out of the folder",
}


def hostile_requests(port, token):
    """(what, method, path, body, headers, host): each must be refused."""
    good = {"photo": "Coat/unsure/c1.png", "from": "Coat/unsure/c1.png", "class": "Pullover"}
    json_headers = {"X-Token": token, "Content-Type": "application/json"}
    return [
        ("no token", "POST", "/api/decide", good, {"Content-Type": "application/json"}, None),
        ("a wrong token", "POST", "/api/decide", good, {**json_headers, "X-Token": "x"}, None),
        ("the page without its token", "GET", "/", None, {}, None),
        ("the page with a wrong token", "GET", "/?token=x", None, {}, None),
        ("the queue without its token", "GET", "/api/queue", None, {}, None),
        ("a photo without its token", "GET", "/photo/0", None, {}, None),
        ("a foreign Origin", "POST", "/api/decide", good,
         {**json_headers, "Origin": "http://evil.example"}, None),
        ("another port's Origin", "POST", "/api/decide", good,
         {**json_headers, "Origin": "http://127.0.0.1:1"}, None),
        ("DNS rebinding", "POST", "/api/decide", good, json_headers, f"evil.example:{port}"),
        ("DNS rebinding, the page", "GET", f"/?token={token}", None, {}, f"evil.example:{port}"),
        ("no Host", "GET", f"/?token={token}", None, {}, ""),
        ("a huge body", "POST", "/api/decide", b"{" + b" " * MAX_BODY + b"}", json_headers, None),
        ("malformed JSON", "POST", "/api/decide", b'{"photo": ', json_headers, None),
        ("not an object", "POST", "/api/decide", [1, 2], json_headers, None),
        ("not JSON", "POST", "/api/decide", good,
         {**json_headers, "Content-Type": "text/plain"}, None),
        ("an unknown class", "POST", "/api/decide", {**good, "class": "Hat"}, json_headers, None),
        ("no class", "POST", "/api/decide", {**good, "class": None}, json_headers, None),
        ("traversal", "POST", "/api/decide", {**good, "from": "../outside/c1.png"},
         json_headers, None),
        ("traversal in the class folder", "POST", "/api/decide",
         {**good, "from": "Coat/unsure/../../../outside/c1.png"}, json_headers, None),
        ("an absolute path", "POST", "/api/decide", {**good, "from": "/etc/passwd"},
         json_headers, None),
        ("a new line in a path", "POST", "/api/decide", {**good, "from": "Coat/\nx.png"},
         json_headers, None),
        ("links in a loop", "POST", "/api/decide", {**good, "from": "Coat/loop/c1.png"},
         json_headers, None),
        ("a link leading out", "POST", "/api/decide", {**good, "from": "Coat/out/c1.png"},
         json_headers, None),
        ("a photo not in the queue", "POST", "/api/decide",
         {**good, "photo": "Coat/c3.png", "from": "Coat/c3.png"}, json_headers, None),
        ("another photo's place", "POST", "/api/decide",
         {**good, "from": "Coat/unsure/c2.png"}, json_headers, None),
        ("a photo elsewhere than the page thought", "POST", "/api/decide",
         {**good, "from": "Coat/c1.png"}, json_headers, None),
        ("an undo of what is not decided", "POST", "/api/undo",
         {"photo": "Coat/unsure/c1.png", "from": "Coat/unsure/c1.png"}, json_headers, None),
        ("an unknown action", "POST", "/api/delete", good, json_headers, None),
        ("another method", "PUT", "/api/decide", good, json_headers, None),
        ("an unknown page", "GET", f"/etc/passwd?token={token}", None, {}, None),
        ("a photo past the queue", "GET", f"/photo/99?token={token}", None, {}, None),
        ("a photo whose file leads out", "GET", f"/photo/1?token={token}", None, {}, None),
    ]  # fmt: skip


def test_hostile_requests_are_refused_in_one_line_and_nothing_on_disk_changes(catalogue, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c1.png").write_bytes(b"not the shop's")
    (catalogue / "Coat/out").symlink_to(outside, target_is_directory=True)
    (catalogue / "Coat/loop").symlink_to(catalogue / "Coat/loop")
    with serving(catalogue) as (_, port, token):
        secret = outside / "secret.png"
        secret.write_bytes(b"secret")
        (catalogue / "Coat/unsure/c1.png").unlink()  # item 1: its file now a link leading out
        (catalogue / "Coat/unsure/c1.png").symlink_to(secret)
        before, outside_before = every_file(catalogue), every_file(outside)
        for what, method, path, body, headers, host in hostile_requests(port, token):
            status, answer = ask(port, method, path, body, headers, host)
            assert 400 <= status < 500, (what, status, answer)
            assert isinstance(answer, dict) and "\n" not in answer["error"], what
            assert REFUSED_FOR.get(what, "") in answer["error"], (what, answer)
            assert b"secret" not in json.dumps(answer).encode(), what
        assert every_file(catalogue) == before and every_file(outside) == outside_before
        assert ask(port, "GET", f"/?token={token}")[0] == 200  # the server still answers


def raw(port, request):
    """The status of the answer to a request sent as these bytes (None: no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        answer = connection.recv(65536)
    return int(answer.split()[1]) if answer else None


def test_requests_of_any_bytes_and_a_body_that_never_comes_get_a_4xx(catalogue, monkeypatch):
    assert 0 < review_server.Handler.timeout <= 60  # a thread is not held for ever
    monkeypatch.setattr(review_server.Handler, "timeout", 0.5)
    with serving(catalogue) as (_, port, token):
        head = f"Host: 127.0.0.1:{port}\r\nX-Token: {token}\r\nContent-Type: application/json\r\n"
        post = f"POST /api/decide HTTP/1.1\r\n{head}".encode()
        for what, request in [
            ("a length in other digits", post + "Content-Length: \u00b2\r\n\r\n".encode("latin-1")),
            ("a photo in other digits", f"GET /photo/\u00b2?token={token} HTTP/1.1\r\n"
             f"Host: 127.0.0.1:{port}\r\n\r\n".encode("latin-1")),
            ("deep JSON", post + b"Content-Length: 3000\r\n\r\n" + b"[" * 3000),
            ("a body that never comes", post + b"Content-Length: 10\r\n\r\n"),
        ]:  # fmt: skip
            status = raw(port, request)
            assert status is not None and 400 <= status < 500, (what, status)
        assert ask(port, "GET", f"/?token={token}")[0] == 200  # the server still answers


def test_a_photo_is_looked_up_where_it_is_once_a_move_in_flight_is_done(catalogue):
    with serving(catalogue) as (opened, port, token):
        answers = []
        with opened.lock:  # a move in flight
            asking = threading.Thread(
                target=lambda: answers.append(ask(port, "GET", f"/photo/0?token={token}"))
            )
            asking.start()
            asking.join(0.5)
            assert answers == []  # waits for the move
        asking.join(10)
        assert answers[0][0] == 200


def test_the_static_page_names_the_review_command(catalogue):
    assert f"fashion_mnist_cnn.py review {catalogue}" in (catalogue / "index.html").read_text()


def test_the_photos_and_the_pages_requests_need_the_token_and_say_so(catalogue):
    with serving(catalogue) as (opened, port, token):
        status, page = ask(port, "GET", f"/?token={token}")
        assert status == 200 and b"review_app.js" in page
        status, queue = ask(port, "GET", "/api/queue", headers={"X-Token": token})
        assert [item["photo"] for item in queue["items"]] == LEAST_SURE_FIRST
        status, photo = ask(port, "GET", f"/photo/0?token={token}")
        assert photo == (catalogue / LEAST_SURE_FIRST[0]).read_bytes()
        status, answer = ask(port, "GET", "/api/queue", headers={"X-Token": "wrong"})
        assert status == 403 and "token" in answer["error"]


# A --queue list, as finetune --backbone writes doubtful.csv.
LISTED = [
    ("Coat/a.png", "Coat", "Pullover", "0.934", "0.041"),
    ("Sneaker/b.png", "Sneaker", "Sandal", "0.880", "0.100"),
    ("coats/d.png", "Coat", "Shirt", "0.610", "0.300"),
]


def write_list(folder, rows=LISTED, columns=review.LIST_COLUMNS):
    """FOLDER with the listed photos in it, and run/doubtful.csv listing them; the list."""
    (folder / "Coat").mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = folder / row[0]
        if path.is_relative_to(folder) and ".." not in path.parts and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30, 30), (len(row[0]) * 9, 0, 0)).save(path)
    listed = folder.parent / "run" / "doubtful.csv"
    listed.parent.mkdir(exist_ok=True)
    with open(listed, "w", newline="") as file:
        csv.writer(file).writerows([columns, *rows])
    return listed


def test_a_list_of_doubtful_photos_is_checked_in_its_order_and_its_decisions_kept(tmp_path):
    folder = tmp_path / "labelled"
    listed = write_list(folder)
    with serving(folder, listed) as (opened, port, token):
        shown = opened.queue()["items"]
        assert [item["photo"] for item in shown] == [row[0] for row in LISTED]
        assert shown[0]["proposed"] == "Pullover" and shown[0]["folder_class"] == "Coat"
        assert shown[0]["answers"] == [["Pullover", 0.934], ["Coat", 0.041]]
        assert decide(port, token, "Coat/a.png", "Pullover") == (200, {"now": "Pullover/a.png"})
        assert decide(port, token, "Sneaker/b.png", "Sneaker") == (200, {"now": "Sneaker/b.png"})
        assert decide(port, token, "coats/d.png", "Shirt")[0] == 200
        undo = {"photo": "coats/d.png", "from": "Shirt/d.png"}
        assert post(port, token, "undo", undo) == (200, {"now": "coats/d.png"})
    assert (folder / "Pullover/a.png").is_file() and (folder / "Sneaker/b.png").is_file()
    again = review.open_review(arguments(folder, listed)).items
    assert [(item.now, item.decided) for item in again] == [
        ("Pullover/a.png", True),
        ("Sneaker/b.png", True),
        ("coats/d.png", False),
    ]
    assert review.record_path(listed).parent == listed.parent


def test_a_listed_photo_moved_by_hand_is_left_out_and_said(tmp_path, capsys):
    folder = tmp_path / "labelled"
    listed = write_list(folder)
    (folder / "Sneaker/b.png").rename(folder / "Coat/b.png")
    items = review.open_review(arguments(folder, listed)).items
    assert [item.photo for item in items] == ["Coat/a.png", "coats/d.png"]
    assert "note: 1 listed photo is no longer where the list says" in capsys.readouterr().err


def test_a_second_review_of_the_same_folder_or_list_is_refused_in_one_line(catalogue, tmp_path):
    listed = write_list(tmp_path / "labelled")
    for args in (arguments(catalogue), arguments(tmp_path / "labelled", listed)):
        refused = pytest.raises(UserError, match=f"already being reviewed .*pid {os.getpid()}")
        with review.alone(args), refused, review.alone(args):
            pass
        with review.alone(args):  # let go at the stop
            pass


def test_finetunes_own_doubtful_csv_is_read_as_its_queue(tmp_path):
    """The list as finetune --backbone writes it (doubts.write_doubtful), read by --queue."""
    from fashion_shop import doubts

    folder = tmp_path / "labelled"
    for name in ("Coat/a.png", "Coat/b.png", "Coat/c.png", "Pullover/d.png", "Pullover/e.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / name)
    photos = [(path, 4 if path.parent.name == "Coat" else 2) for path in
              sorted(folder.rglob("*.png"))]  # fmt: skip
    probabilities = np.full((5, 10), 0.01)
    probabilities[:, 4] = [0.9, 0.9, 0.05, 0.1, 0.1]  # c.png: the model says Pullover
    probabilities[:, 2] = [0.02, 0.02, 0.87, 0.82, 0.82]
    listed = tmp_path / "run" / doubts.DOUBTFUL_NAME
    listed.parent.mkdir()
    assert doubts.write_doubtful(listed, folder, photos, probabilities) == 1
    (item,) = review.open_review(arguments(folder, listed)).items
    assert item.shown(0) == {
        "index": 0, "photo": "Coat/c.png", "now": "Coat/c.png", "folder": "Coat",
        "folder_class": "Coat", "proposed": "Pullover",
        "answers": [["Pullover", 0.87], ["Coat", 0.05]], "decided": False,
    }  # fmt: skip


def test_a_refused_move_of_a_listed_photo_leaves_it_undecided_in_the_record(tmp_path, monkeypatch):
    folder = tmp_path / "labelled"
    listed = write_list(folder)
    (folder / "Pullover").mkdir()
    (folder / "Pullover/a.png").write_bytes(b"another photo of that name")
    with serving(folder, listed) as (_, port, token):
        assert decide(port, token, "Sneaker/b.png", "Sandal")[0] == 200
        before = every_file(tmp_path)
        status, answer = decide(port, token, "Coat/a.png", "Pullover")
        assert status == 409 and "exists already" in answer["error"]
        assert every_file(tmp_path) == before  # the record as it was, too

        def no_rename(source, destination):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(review_server.os, "rename", no_rename)  # after the record is written
        status, answer = decide(port, token, "coats/d.png", "Shirt")
        assert status == 409 and "cannot move d.png (Permission denied)" in answer["error"]
        assert every_file(tmp_path) == before  # the record, and no Shirt folder made
    again = review.open_review(arguments(folder, listed)).items
    assert [item.decided for item in again] == [False, True, False]


def test_a_stop_between_the_record_and_the_move_leaves_the_photo_undecided(tmp_path):
    folder = tmp_path / "labelled"
    listed = write_list(folder)
    decided = {"Coat/a.png": "Pullover/a.png"}  # recorded, then killed before the move
    record = {"folder": str(folder.resolve()), "decided": decided}
    review.record_path(listed).write_text(json.dumps(record))
    items = review.open_review(arguments(folder, listed)).items
    assert (items[0].now, items[0].decided) == ("Coat/a.png", False)


@pytest.mark.parametrize(
    "rows, columns, said",
    [
        (LISTED, ["photo", "class"], "not a list of doubtful photos"),
        ([("Coat/a.png", "Coat", "Hat", "0.9", "0.1")], None, "must each be a class"),
        ([("Coat/a.png", "Coat", "Shirt", "93%", "0.1")], None, "numbers from 0 to 1"),
        ([("Coat/a.png", "Shirt", "Coat", "0.9", "0.1")], None, "in a folder of class Coat"),
        ([("../a.png", "Coat", "Shirt", "0.9", "0.1")], None, "not a path inside the folder"),
        ([("/etc/a.png", "Coat", "Shirt", "0.9", "0.1")], None, "not a path inside the folder"),
        ([("a.png", "Coat", "Shirt", "0.9", "0.1")], None, "not a photo in a class folder"),
        ([LISTED[0], LISTED[0]], None, "listed twice"),
    ],
)
def test_a_list_that_is_not_finetunes_for_this_folder_is_one_line(
    tmp_path, run_main, rows, columns, said
):
    folder = tmp_path / "labelled"
    listed = write_list(folder, rows, columns or review.LIST_COLUMNS)
    before = every_file(folder)
    assert_clean_failure(run_main("review", folder, "--queue", listed), said)
    assert every_file(folder) == before


def test_a_list_naming_photos_the_folder_does_not_hold_is_one_line(tmp_path, run_main):
    listed = write_list(tmp_path / "labelled")
    (tmp_path / "other/Coat").mkdir(parents=True)
    result = run_main("review", tmp_path / "other", "--queue", listed)
    assert_clean_failure(result, "Coat/a.png is not in", "give the folder finetune read")


def test_bad_input_is_one_line(tmp_path, run_main, catalogue):
    (tmp_path / "plain/Coat").mkdir(parents=True)
    assert_clean_failure(run_main("review", tmp_path / "plain"), "not a folder that predict")
    assert_clean_failure(run_main("review", tmp_path / "none"), "no such folder")
    result = run_main("review", catalogue, "--queue", tmp_path / "none.csv")
    assert_clean_failure(result, "no such file")
    result = run_main("review", catalogue, "--queue", tmp_path / "plain")
    assert_clean_failure(result, "a folder, not a list")
    assert_clean_failure(run_main("review", catalogue, "--port", "70000"), "a port from 0")
    with serving(catalogue) as (_, port, _token):
        result = run_main("review", catalogue, "--port", port, "--no-browser")
        assert_clean_failure(result, f"--port {port}: taken by another program")
    (catalogue / sorting.CSV_NAME).write_text("photo,class\n")
    result = run_main("review", catalogue)
    assert_clean_failure(result, "review needs the CSV that predict --sort-into wrote")
    assert "--csv" not in result.stderr


def test_help_comes_at_once_and_review_never_loads_tensorflow(run_main):
    result = run_main("review", "--help")
    assert result.returncode == 0 and "--queue" in result.stdout
    check = (
        "import sys, fashion_shop.review; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert loaded.stdout == "[]\n", loaded.stderr


def test_without_a_display_no_browser_is_opened_and_the_address_is_enough(monkeypatch, capsys):
    opened = []
    monkeypatch.setattr(review.webbrowser, "open", lambda url: opened.append(url) or False)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(review.sys, "platform", "linux")
    assert review.open_browser("http://127.0.0.1:1/?token=t") is None
    assert opened == []  # a console browser would take over the terminal
    monkeypatch.setenv("DISPLAY", ":0")
    assert review.open_browser("http://127.0.0.1:1/?token=t") is None  # its file removed
    assert len(opened) == 1 and not review.Path(opened[0][7:]).parent.exists()  # tried
    assert capsys.readouterr().out.count("open the address in a browser") == 2


def test_the_browser_is_given_a_private_file_that_leads_on_not_the_token(monkeypatch):
    """A program's arguments can be read by anyone on the machine (ps)."""
    opened = []
    monkeypatch.setattr(review.webbrowser, "open", lambda url: opened.append(url) or True)
    monkeypatch.setenv("DISPLAY", ":0")
    url = "http://127.0.0.1:1/?token=secret"
    page = review.open_browser(url)
    try:
        assert opened == [page.as_uri()] and "secret" not in opened[0]
        assert stat.S_IMODE(page.stat().st_mode) == 0o600
        assert stat.S_IMODE(page.parent.stat().st_mode) == 0o700
        assert f'content="0;url={url}"' in page.read_text()
    finally:
        review.remove_redirect(page)
    assert not page.parent.exists()


def test_nothing_to_check_says_so(tmp_path, run_main):
    folder = write_catalogue(tmp_path / "sorted", SORTED[4:])
    result = run_main("review", folder, "--no-browser")
    assert result.returncode == 0 and "Nothing to check" in result.stdout


def wait_for(check, timeout=10):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


# Loaded by the program started below (PYTHONPATH): the move of one photo slowed, so that a
# kill comes during it.
SLOW_RENAME = """import os, time
rename = os.rename


def slow_rename(source, destination, *args, **kwargs):
    if os.path.basename(destination) == os.environ.get("SLOW_RENAME"):
        open(os.environ["SLOW_RENAME_STARTED"], "w").close()
        time.sleep(60)
    return rename(source, destination, *args, **kwargs)


os.rename = slow_rename
"""


def address(program):
    """(port, token) of the address a review started in the background printed."""
    line = wait_for_line(program, "  http://")[-1]
    return int(line.split(":")[2].split("/")[0]), line.split("token=")[1].strip()


@pytest.mark.slow
def test_a_kill_9_during_a_move_loses_that_decision_only_and_kill_stops_as_ctrl_c(
    catalogue, tmp_path
):
    """The process itself is under test: started anew, killed with SIGKILL during a move."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow/sitecustomize.py").write_text(SLOW_RENAME)
    started = tmp_path / "started"
    paths = [str(tmp_path / "slow"), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(paths), "SLOW_RENAME": "c2.png",
           "SLOW_RENAME_STARTED": str(started)}  # fmt: skip
    program = start_program("review", catalogue, "--no-browser", env=env)
    port, token = address(program)
    for photo, name in zip(LEAST_SURE_FIRST[:3], ["Sandal", "Pullover", "Bag"], strict=True):
        assert decide(port, token, photo, name)[0] == 200

    def decide_the_last():  # c2.png to Coat: its move slowed, and killed
        with contextlib.suppress(OSError, http.client.HTTPException):
            decide(port, token, LEAST_SURE_FIRST[3], "Coat")

    in_flight = threading.Thread(target=decide_the_last, daemon=True)
    in_flight.start()
    wait_for(started.exists, timeout=30)
    program.send_signal(signal.SIGKILL)
    program.wait()
    assert (catalogue / "Sandal/s1.png").is_file() and (catalogue / "Bag/b1.png").is_file()
    assert (catalogue / LEAST_SURE_FIRST[3]).is_file()  # not moved: undecided, nothing half made
    program = start_program("review", catalogue, "--no-browser")
    lines = wait_for_line(program, "Ctrl+C stops it")
    assert lines[0].startswith(f"1 photo to check in {catalogue}")
    program.send_signal(signal.SIGTERM)  # kill: stops as Ctrl+C does, the page refreshed
    assert program.wait(timeout=30) == 0
    assert "Stopped: 0 decided, 1 left" in program.stdout.read()
    assert "Sandal" in (catalogue / sorting.PAGE_NAME).read_text()


# The page in a real browser.


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def shown_photo(driver):
    return driver.find_element("id", "photo").get_attribute("data-photo")


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium, chromium-driver and selenium (.ci/run installs them)",
)
def test_in_the_browser_one_key_decides_a_photo_undo_moves_it_back_a_new_start_goes_on(
    catalogue, browser
):
    from selenium.webdriver.common.keys import Keys

    with serving(catalogue) as (opened, port, token):
        browser.get(f"http://127.0.0.1:{port}/?token={token}")
        wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-ready"))
        assert shown_photo(browser) == LEAST_SURE_FIRST[0]
        assert browser.find_element("id", "left").text == "4"
        press(browser, Keys.ENTER)  # Sneaker, as proposed
        assert shown_photo(browser) == LEAST_SURE_FIRST[1]  # at once
        press(browser, "2")  # Pullover
        assert shown_photo(browser) == LEAST_SURE_FIRST[2]
        wait_for(lambda: browser.find_element("id", "saved").text == "2")
        assert (catalogue / "Sneaker/s1.png").is_file()
        assert (catalogue / "Pullover/c1.png").is_file()
        press(browser, "u")  # the Pullover undone: back in Coat/unsure, shown again
        wait_for(lambda: (catalogue / "Coat/unsure/c1.png").is_file())
        assert shown_photo(browser) == LEAST_SURE_FIRST[1]
        wait_for(lambda: browser.find_element("id", "saved").text == "1")
        assert browser.find_element("id", "left").text == "3"
        press(browser, "4")  # Coat
        wait_for(lambda: (catalogue / "Coat/c1.png").is_file())
        assert shown_photo(browser) == LEAST_SURE_FIRST[2]
        press(browser, Keys.ARROW_LEFT)  # back to the Coat: decided again, as a Pullover
        assert shown_photo(browser) == LEAST_SURE_FIRST[1]
        press(browser, "2")
        wait_for(lambda: (catalogue / "Pullover/c1.png").is_file())
        wait_for(lambda: browser.find_element("id", "pending").text == "0")
        assert len(opened.seconds) == 6  # that last as an undo and a decision
        browser.refresh()  # a reload goes on
        wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-ready"))
        assert shown_photo(browser) == LEAST_SURE_FIRST[2]
    with serving(catalogue) as (_, port, token):
        browser.get(f"http://127.0.0.1:{port}/?token={token}")
        wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-ready"))
        assert shown_photo(browser) == LEAST_SURE_FIRST[2]
        assert browser.find_element("id", "left").text == "2"


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium, chromium-driver and selenium (.ci/run installs them)",
)
def test_in_the_browser_a_refused_move_is_shown_and_the_photo_stays_undecided(catalogue, browser):
    with serving(catalogue) as (_, port, token):
        browser.get(f"http://127.0.0.1:{port}/?token={token}")
        wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-ready"))
        (catalogue / "Sneaker/unsure/s1.png").rename(catalogue / "Sandal.png")  # by hand
        press(browser, "5")
        wait_for(lambda: browser.find_element("id", "refused").text == "1")
        assert "no longer there" in browser.find_element("id", "messages").text
        assert browser.find_element("id", "left").text == "4"
        assert browser.find_element("id", "saved").text == "0"  # never marked done
        assert not (catalogue / "Sandal").exists()
        assert shown_photo(browser) == LEAST_SURE_FIRST[1]
        browser.find_element("id", "accept").click()  # the mouse works too
        wait_for(lambda: (catalogue / "Coat/c1.png").is_file())
