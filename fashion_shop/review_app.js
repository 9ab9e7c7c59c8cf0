// The review page: one photo at a time, one key a decision. A decision is shown at once and
// sent in the background; the photo is marked saved only once the server has moved the file.
"use strict";

// The token, from the address review printed (which the page itself needed too).
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let items = [];
let at = 0; // the photo shown
const decisions = []; // indices decided in this tab, last last: what undo undoes
let sending = Promise.resolve(); // requests go one after another, in the order made
let refusals = 0;

async function api(path, body) {
  const response = await fetch(path, {
    method: body ? "POST" : "GET",
    headers: { "X-Token": token, "Content-Type": "application/json" },
    body: body && JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
  return answer;
}

function percent(p) {
  return `${Math.round(p * 100)}%`;
}

function photoUrl(item) {
  return `/photo/${item.index}?token=${encodeURIComponent(token)}`;
}

// A request for item, its body made when its turn comes (after the earlier ones answered).
function send(item, path, body, refused) {
  item.pending += 1;
  show();
  sending = sending
    .then(() => api(path, body()))
    .then((answer) => {
      item.now = answer.now;
      item.saved = item.choice !== null;
    })
    .catch((error) => {
      refusals += 1;
      refused();
      const line = document.createElement("div");
      line.textContent = `Refused, ${item.photo}: ${error.message}`;
      $("messages").prepend(line);
    })
    .finally(() => {
      item.pending -= 1;
      show();
    });
}

function decide(name) {
  const item = items[at];
  if (!item) return;
  if (item.choice !== null) undo(at); // a photo decided before: undone, then decided anew
  item.choice = name;
  item.saved = false;
  decisions.push(at);
  send(item, "/api/decide", () => ({ photo: item.photo, from: item.now, class: name }), () => {
    item.choice = null;
    item.refusal = true;
  });
  const next = items.findIndex((other, i) => i > at && other.choice === null);
  at = next === -1 ? items.length : next;
  show();
}

function undo(index) {
  if (index === undefined) {
    index = decisions.pop();
    if (index === undefined) return;
  } else {
    decisions.splice(decisions.lastIndexOf(index), 1);
  }
  const item = items[index];
  const before = item.choice;
  item.choice = null;
  item.saved = false;
  at = index;
  send(item, "/api/undo", () => ({ photo: item.photo, from: item.now }), () => {
    item.choice = before;
  });
  show();
}

function move(step) {
  at = Math.min(items.length, Math.max(0, at + step));
  show();
}

function counts() {
  $("left").textContent = items.filter((item) => item.choice === null).length;
  $("total").textContent = items.length;
  $("saved").textContent = items.filter((item) => item.saved && !item.pending).length;
  $("pending").textContent = items.reduce((sum, item) => sum + item.pending, 0);
  $("refused").textContent = refusals;
}

function show() {
  counts();
  const item = items[at];
  $("view").hidden = !item;
  $("done").hidden = Boolean(item);
  const left = items.filter((other) => other.choice === null).length;
  $("done").textContent = left
    ? `The end of the queue: ${left} left undecided (\u2190 goes back to them).`
    : "Every photo is decided. Ctrl+C in the terminal stops review.";
  if (!item) return;
  const photo = $("photo");
  if (photo.dataset.index !== String(item.index)) photo.src = photoUrl(item);
  photo.dataset.index = item.index;
  photo.dataset.photo = item.photo;
  photo.dataset.proposed = item.proposed;
  photo.alt = item.photo;
  photo.className = item.pending ? "pending" : item.saved ? "saved" : item.refusal ? "refused" : "";
  const folder = item.now.split("/").slice(0, -1).join("/");
  $("where").textContent = `${at + 1} of ${items.length}: ${item.photo.split("/").pop()}, in ${folder}`;
  $("answers").textContent = item.answers.length
    ? "the model says " + item.answers.map(([name, p]) => `${name} ${percent(p)}`).join(", ")
    : "no answer of the model (put here by a person)";
  $("accept").innerHTML = "";
  $("accept").append(key("Enter"), ` ${item.proposed}`);
  for (const button of $("classes").children) {
    button.classList.toggle("proposed", button.dataset.class === item.proposed);
    button.classList.toggle("chosen", button.dataset.class === item.choice);
  }
  $("status").textContent = item.pending
    ? `${item.choice ?? "undo"}: being saved`
    : item.saved
      ? `saved: in ${item.now}`
      : item.choice === null ? "" : `${item.choice}`;
  const next = items[at + 1];
  if (next) new Image().src = photoUrl(next); // so that the next photo shows at once
}

function key(text) {
  const element = document.createElement("kbd");
  element.textContent = text;
  return element;
}

function keyDown(event) {
  const item = items[at];
  if ((event.key === "z" && (event.ctrlKey || event.metaKey)) || event.key === "u") undo();
  else if (event.ctrlKey || event.metaKey || event.altKey) return;
  else if ((event.key === "Enter" || event.key === " ") && item) decide(item.proposed);
  else if (/^[0-9]$/.test(event.key)) decide(window.classes[Number(event.key)]);
  else if (event.key === "Backspace" || event.key === "ArrowLeft") move(-1);
  else if (event.key === "ArrowRight") move(1);
  else return;
  event.preventDefault();
}

async function start() {
  let queue;
  try {
    queue = await api("/api/queue");
  } catch (error) {
    $("messages").textContent = `Cannot load the queue: ${error.message}`;
    return;
  }
  window.classes = queue.classes;
  document.title = `review ${queue.folder}`;
  $("title").textContent = `${queue.folder}: ${queue.list ? "photos the model doubts, likeliest mistakes first" : "unsure photos, least sure first"}`;
  items = queue.items.map((item) => ({
    ...item,
    choice: item.decided ? item.folder_class : null,
    saved: item.decided,
    pending: 0,
    refusal: false,
  }));
  for (const [number, name] of queue.classes.entries()) {
    const button = document.createElement("button");
    button.dataset.class = name;
    button.append(key(String(number)), ` ${name}`);
    button.addEventListener("click", () => decide(name));
    $("classes").append(button);
  }
  $("accept").addEventListener("click", () => items[at] && decide(items[at].proposed));
  $("back").addEventListener("click", () => move(-1));
  $("skip").addEventListener("click", () => move(1));
  $("undo").addEventListener("click", () => undo());
  for (const button of document.querySelectorAll("button")) {
    button.addEventListener("click", () => button.blur()); // keys go to the page, not to it
  }
  document.addEventListener("keydown", keyDown);
  const first = items.findIndex((item) => item.choice === null);
  at = first === -1 ? items.length : first;
  show();
  document.body.dataset.ready = "yes";
}

start();
