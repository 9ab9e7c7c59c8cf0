"""The review command's server: the queue of photos to check, each photo, and each decision as a
file move, answered to the page (review_app.html) of this address and to no other site.

The standard library's ThreadingHTTPServer, not a framework: the page needs four routes, and
what has to be written by hand with any server (the token, the Host and Origin checks, paths
kept inside the folder, the moves) is this file; a framework would add a dependency to save a
few lines of parsing."""

import contextlib
import http.server
import json
import mimetypes
import os
import secrets
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fashion_mnist_cnn import CLASS_NAMES, atomic_path, digits
from fashion_shop.folders import folder_class
from fashion_shop.sorting import checked_place, is_photo

PAGE = Path(__file__).with_name("review_app.html")
SCRIPT = Path(__file__).with_name("review_app.js")
MAX_BODY = 4096  # bytes of a request's JSON: a decision is under 1 KB, even with long names
# The page loads nothing from elsewhere and may be framed by no other site.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    """A request refused: its status (4xx) and a one-line reason; nothing was changed."""

    def __init__(self, status, reason):
        super().__init__("".join(c if c.isprintable() else "?" for c in reason))  # one line
        self.status = status


def photo_path(root, rel):
    """The path of a photo in a class folder of root (a resolved folder), from a path relative
    to it; refused unless it stays inside root, links resolved (no .., no absolute path, no
    link leading out). The one rule for the server's requests and for a --queue list's rows."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise Refused(400, "a photo's path is a relative path with / between its parts")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts:
        raise Refused(400, f"{rel[:200]}: not a path inside the folder")
    path = root.joinpath(*parts)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: links in a loop
        raise Refused(400, f"{rel[:200]}: cannot be resolved") from None
    if not resolved.is_relative_to(root):
        raise Refused(403, f"{rel[:200]}: leads out of the folder")
    in_a_class = len(parts) > 1 and not parts[0].startswith(".")
    if not in_a_class or folder_class(parts[0]) is None or not is_photo(path):
        raise Refused(400, f"{rel[:200]}: not a photo in a class folder")
    return path


@dataclass
class Item:
    """A photo in the queue: photo (where it was when the queue was made, relative to the
    folder: its name in every request), where it is now, the class the page proposes (Enter),
    the model's answers [(class, probability)], likeliest first, and whether it is decided."""

    photo: str
    now: str
    proposed: int
    answers: list
    decided: bool = False

    def shown(self, index):
        where = PurePosixPath(self.now)
        return {
            "index": index,
            "photo": self.photo,
            "now": self.now,
            "folder": str(where.parent),
            "folder_class": CLASS_NAMES[folder_class(where.parts[0])],
            "proposed": CLASS_NAMES[self.proposed],
            "answers": self.answers,
            "decided": self.decided,
        }


@dataclass
class Review:
    """A folder under review and its queue. With a record (the --queue list's), decided photos
    are written to it, so that a new start leaves them out; a sorted catalogue needs none: a
    decided photo is out of unsure/. One lock: one move at a time, checks included."""

    folder: Path
    items: list
    record: Path | None = None
    root: Path = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: list = field(default_factory=list)  # each decision's time in the server, whole

    def __post_init__(self):
        self.root = self.folder.resolve()
        self.by_photo = {item.photo: item for item in self.items}

    def queue(self):
        return {
            "folder": self.folder.name,
            "list": self.record is not None,
            "classes": list(CLASS_NAMES),
            "items": [item.shown(index) for index, item in enumerate(self.items)],
        }

    def item(self, photo):
        if not isinstance(photo, str) or photo not in self.by_photo:
            raise Refused(404, f"{str(photo)[:200]!r}: no such photo in the queue")
        return self.by_photo[photo]

    def inside(self, rel):
        return photo_path(self.root, rel)

    def where_it_is(self, item, rel):
        """The photo's path now, as the page thought; refused if it is not there."""
        path = self.inside(rel)
        if PurePosixPath(rel).name != PurePosixPath(item.photo).name:
            raise Refused(400, f"{rel[:200]}: not where {item.photo} can be (moves keep names)")
        if rel != item.now or not os.path.lexists(path):
            raise Refused(
                409,
                f"{rel} is no longer there (moved or removed meanwhile, in another tab or by "
                "hand): nothing moved; reload the page to see where things are now",
            )
        return path

    def class_index(self, name):
        if not isinstance(name, str) or name not in CLASS_NAMES:
            raise Refused(400, f"{str(name)[:200]!r}: no such class")
        return CLASS_NAMES.index(name)

    def decide(self, photo, now, class_name):
        """The photo filed in a class: moved to that class's folder (left where it is, for the
        class of a listed photo's own folder). Refused where the page is behind."""
        with self.lock:
            item, label = self.item(photo), self.class_index(class_name)
            source = self.where_it_is(item, now)
            if item.decided:
                raise Refused(409, f"{photo} is decided already (in another tab?): undo it first")
            own = PurePosixPath(photo)
            stays = self.record is not None and folder_class(own.parts[0]) == label
            target = photo if stays else checked_place(self.root, own, label).as_posix()
            destination = self.free(source, target)
            self.keep(item, target)  # first: a stop before the move leaves it undecided
            try:
                self.move(source, destination)
            except Refused:
                self.keep(item, None)
                raise
            item.now, item.decided = target, True
            return {"now": target}

    def undo(self, photo, now):
        """A decision undone: the photo moved back to where it was in the queue."""
        with self.lock:
            item = self.item(photo)
            source = self.where_it_is(item, now)
            if not item.decided:
                raise Refused(409, f"{photo} is not decided (undone in another tab?)")
            self.move(source, self.free(source, item.photo))
            item.now, item.decided = item.photo, False
            # Recorded after the move: if this write fails, a new start finds it undecided.
            with contextlib.suppress(Refused):
                self.keep(item, None)
            return {"now": item.photo}

    def free(self, source, target):
        """target's path, which must be source itself or no file yet: never replaced, as a
        second name would lose the photo for predict and finetune (sorting.match finds a
        moved photo by its name)."""
        destination = self.inside(target)  # a class folder that is a link out is refused
        if destination != source and os.path.lexists(destination):
            raise Refused(409, f"{target} exists already: nothing moved (rename one by hand)")
        return destination

    def move(self, source, destination):
        """source renamed to destination: atomic on one file system. free()'s check and the
        rename are one step for this server (its lock); Python has no rename that refuses
        to replace a file."""
        if destination == source:
            return
        made = not destination.parent.exists()  # a class folder that was not there yet
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, destination)
        except OSError as error:
            if made:  # a refusal leaves nothing behind
                with contextlib.suppress(OSError):
                    destination.parent.rmdir()
            raise Refused(409, f"cannot move {source.name} ({error.strerror})") from None

    def keep(self, item, target):
        """The --queue list's record of decided photos, with this one at target (None:
        undecided), written whole before the server answers."""
        if self.record is None:
            return
        decided = {i.photo: i.now for i in self.items if i.decided and i is not item}
        if target is not None:
            decided[item.photo] = target
        try:
            with atomic_path(self.record) as partial:
                partial.write_text(
                    json.dumps({"folder": str(self.root), "decided": decided}, indent=1),
                    encoding="utf-8",
                    errors="surrogateescape",
                )
        except OSError as error:
            raise Refused(409, f"{self.record}: cannot be written ({error.strerror})") from None


def allowed_hosts(port):
    """The Host headers of this server's own address: any other is another name pointed at
    127.0.0.1 (DNS rebinding) and is refused."""
    return {f"127.0.0.1:{port}", f"localhost:{port}"}


class Handler(http.server.BaseHTTPRequestHandler):
    """One request: Host, Origin and token checked first, then the route. Every refusal is a
    4xx with a one-line reason, before anything on disk is touched."""

    review: Review
    token: str
    timeout = 30  # seconds a request may take to arrive: a slow one must not hold a thread
    server_version = "review"
    sys_version = ""

    def log_message(self, format, *args):
        pass  # the terminal shows the address and the stop, not every photo fetched

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        started = time.perf_counter()
        if self.answer(self.post) == 200:  # each decision's time here, for the benchmark
            self.review.seconds.append(time.perf_counter() - started)

    def not_allowed(self):
        raise Refused(405, f"{self.command}: not allowed here")

    def refuse_method(self):
        self.answer(self.not_allowed)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = refuse_method

    def answer(self, route):
        try:
            self.check_origin()
            status, kind, body = route()
        except Refused as refused:
            status, kind = refused.status, "application/json"
            body = json.dumps({"error": str(refused)}).encode()
            self.close_connection = True  # an unread body must not be read as a request
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        photo = kind.startswith("image/")
        self.send_header("Cache-Control", "private, max-age=3600" if photo else "no-store")
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        return status

    def check_origin(self):
        host = self.headers.get("Host")
        if host not in allowed_hosts(self.server.server_address[1]):
            raise Refused(403, "wrong Host: open the address review printed")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise Refused(403, f"requests from {origin[:100]} are refused")

    def check_token(self, given):
        if not secrets.compare_digest((given or "").encode(), self.token.encode()):
            raise Refused(403, "no or a wrong token: open the address review printed, whole")

    def get(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/review_app.js":  # the page's code: nothing secret in it
            return 200, "text/javascript; charset=utf-8", SCRIPT.read_bytes()
        if url.path == "/api/queue":
            self.check_token(self.headers.get("X-Token"))
            return 200, "application/json", json.dumps(self.review.queue()).encode()
        self.check_token(query.get("token", [""])[0])
        if url.path == "/":
            return 200, "text/html; charset=utf-8", PAGE.read_bytes()
        if url.path.startswith("/photo/") and digits(url.path[7:]) is not None:
            return self.photo(digits(url.path[7:]))
        raise Refused(404, f"{url.path[:100]}: no such page")

    def photo(self, index):
        with self.review.lock:  # where it is now, not mid-move
            if index >= len(self.review.items):
                raise Refused(404, "no such photo in the queue")
            rel = self.review.items[index].now
            path = self.review.inside(rel)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise Refused(404, f"{rel}: cannot be read ({error.strerror})") from None
        return 200, mimetypes.guess_type(path.name)[0] or "application/octet-stream", data

    def post(self):
        self.check_token(self.headers.get("X-Token"))
        request = self.json_body()
        if self.path == "/api/decide":
            result = self.review.decide(
                request.get("photo"), request.get("from"), request.get("class")
            )
        elif self.path == "/api/undo":
            result = self.review.undo(request.get("photo"), request.get("from"))
        else:
            raise Refused(404, f"{self.path[:100]}: no such action")
        return 200, "application/json", json.dumps(result).encode()

    def json_body(self):
        """The request's JSON object, of at most MAX_BODY bytes (a larger one is not read)."""
        if self.headers.get_content_type() != "application/json":
            raise Refused(415, "send JSON (Content-Type: application/json)")
        length = digits(self.headers.get("Content-Length", ""))
        if length is None:
            raise Refused(411, "a request needs its Content-Length")
        if length > MAX_BODY:
            raise Refused(413, f"a request is at most {MAX_BODY} bytes")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise Refused(408, f"the request's body did not come in {self.timeout} s") from None
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
            raise Refused(400, "not JSON") from None
        if not isinstance(request, dict):
            raise Refused(400, "not a JSON object")
        return request


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A browser that goes away mid-answer is no error; anything else, one line."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            print(f"review: a request failed: {error!r}", file=sys.stderr)


def start_server(review, port):
    """The server of review on 127.0.0.1:port (0: a free one), answering in a thread; returns
    (server, token). OSError where the port cannot be had."""
    handler = type(
        "ReviewHandler", (Handler,), {"review": review, "token": secrets.token_urlsafe()}
    )
    server = Server(("127.0.0.1", port), handler)
    # Polled every 0.1 s for a stop: a stop is answered at once, the idle cost is nothing.
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    return server, handler.token
