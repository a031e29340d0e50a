// The workstation page. The server decodes and windows every image; this page only shows what it is sent and
// sends back which frame and window are on screen, so the model gets exactly the pixels shown.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADERS = { "X-HealthGPT-App": "1" };  // the server refuses POSTs without it (no cross-site requests)

const view = { scan: null, frame: 0, window: null, shown: null, renderSeq: 0, busy: false, job: null,
               conversation: null };

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; }
$("error-close").onclick = clearError;

async function failure(response) {
  try { return (await response.json()).error || response.statusText; } catch { return response.statusText; }
}

// ---- the model and its parity ----

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  $("model").textContent = `${info.variant} · ${info.precision} · ${info.backend} on ${info.providers.join(", ")}`;
  $("model").title = `bundle ${info.bundle}\nmanifest sha256 ${info.manifest_sha256}`;
  const p = info.parity;
  const badge = $("parity");
  badge.textContent = `parity: ${p.status}`;
  badge.className = "badge " + p.status.replace(" ", "-");
  badge.title = p.detail;
  const banner = $("parity-banner");
  if (info.verification_warning) {
    banner.hidden = false;
    banner.className = "banner failed";
    banner.textContent = `VERIFICATION FAILED: ${info.verification_warning}. Do not rely on its answers or images.`;
  } else if (p.status !== "passed") {
    banner.hidden = false;
    banner.className = "banner " + p.status.replace(" ", "-");
    banner.textContent = (p.status === "failed"
      ? "PARITY FAILED: this bundle's outputs differ from the reference model beyond the stated limits"
      : "PARITY NOT VERIFIED: nobody has checked this bundle against the reference model on this backend")
      + ` (${p.detail}). Do not rely on its answers or images.`;
  }
  $("generate").dataset.available = info.tasks.includes("gen") ? "1" : "";
  $("audit").textContent = info.audit_log;
  updateButtons();
}

// ---- opening and windowing an image ----

async function openFile(file) {
  clearError();
  $("file-name").textContent = `${file.name}: decoding…`;
  const response = await fetch("/api/scans", {
    method: "POST", body: file,
    headers: { ...HEADERS, "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
  });
  if (!response.ok) {
    $("file-name").textContent = view.scan ? `${view.scan.name} (still open)` : "no image";
    showError(await failure(response));
    return;
  }
  const scan = await response.json();
  Object.assign(view, { scan, frame: 0, window: null });
  $("file-name").textContent = `${scan.name} · ${scan.size}` + (scan.frames > 1 ? ` · ${scan.frames} frames` : "");
  $("frames").hidden = scan.frames < 2;
  $("frame").max = scan.frames - 1;
  $("frame").value = 0;
  $("windowing").hidden = !scan.monochrome;
  $("no-window").hidden = scan.monochrome;
  $("units").textContent = scan.units || "";
  const presets = $("presets");
  presets.replaceChildren();
  for (const [name, cw] of [["file", null], ...Object.entries(scan.presets)]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name === "file" ? "File window" : `${name[0].toUpperCase()}${name.slice(1)}`;
    b.dataset.preset = name;
    b.onclick = () => setWindow(cw, name);
    presets.append(b);
  }
  showTags(scan);
  markPreset("file");
  await render();
  updateButtons();
}

function showTags(scan) {
  $("tags").hidden = false;
  const t = scan.tags;
  for (const key of ["modality", "body_part", "study_date", "description"]) $(`tag-${key}`).textContent = t[key] || "—";
  const name = $("tag-patient_name");
  name.dataset.value = t.patient_name || "—";
  name.textContent = "••••••";
  name.classList.add("masked");
  $("reveal").textContent = "show";
  $("tag-size").textContent = scan.size + (scan.frames > 1 ? ` × ${scan.frames} frames` : "");
  $("tag-sha256").textContent = scan.sha256;
}

$("reveal").onclick = () => {
  const name = $("tag-patient_name");
  const masked = name.classList.toggle("masked");
  name.textContent = masked ? "••••••" : name.dataset.value;
  $("reveal").textContent = masked ? "show" : "hide";
};

function markPreset(name) {
  for (const b of $("presets").children) b.classList.toggle("active", b.dataset.preset === name);
}

function setWindow(cw, preset = null) {
  view.window = cw;
  markPreset(preset);
  render();
}

async function render() {
  const { scan, frame } = view;
  const seq = ++view.renderSeq;
  const q = new URLSearchParams({ frame });
  if (view.window) { q.set("center", view.window[0]); q.set("width", view.window[1]); }
  const response = await fetch(`/api/scans/${scan.id}/image?${q}`);
  if (seq !== view.renderSeq) return;  // a newer render is on its way
  if (!response.ok) { showError(await failure(response)); return; }
  const shown = response.headers.get("X-Window");
  const url = URL.createObjectURL(await response.blob());
  const img = $("scan");
  img.onload = () => URL.revokeObjectURL(url);
  img.src = url;
  img.hidden = false;
  $("stage-empty").hidden = true;
  // What is on screen now: the request sends exactly this frame and window.
  view.shown = { scan: scan.id, frame, window: view.window };
  if (shown) {
    const [c, w] = shown.split(" ").map(Number);
    $("center").value = c;
    $("width").value = w;
  }
  $("frame-label").textContent = `${frame + 1} / ${scan.frames}`;
}

$("file").onchange = (e) => { if (e.target.files.length) openFile(e.target.files[0]); e.target.value = ""; };
for (const target of [$("stage"), document.body]) {
  target.addEventListener("dragover", (e) => e.preventDefault());
}
document.body.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) openFile(e.dataTransfer.files[0]);
});
$("frame").oninput = (e) => { view.frame = Number(e.target.value); render(); };
$("apply-window").onclick = () => {
  const c = Number($("center").value), w = Number($("width").value);
  if (!Number.isFinite(c) || !Number.isFinite(w) || !(w > 0)) { showError("window: need a level and a width > 0"); return; }
  setWindow([c, w]);
};
for (const id of ["center", "width"]) {
  $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") $("apply-window").click(); });
}

// Drag to window, as on a radiology workstation: horizontal = width, vertical = level.
(() => {
  let start = null;
  const img = $("scan");
  img.addEventListener("pointerdown", (e) => {
    if (!view.scan || !view.scan.monochrome) return;
    start = { x: e.clientX, y: e.clientY, c: Number($("center").value), w: Number($("width").value) };
    img.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  img.addEventListener("pointermove", (e) => {
    if (!start) return;
    const scale = Math.max(start.w, 1) / 256;
    const w = Math.max(1, start.w + (e.clientX - start.x) * scale);
    const c = start.c + (e.clientY - start.y) * scale;
    view.window = [Math.round(c), Math.round(w)];
    markPreset(null);
    render();
  });
  img.addEventListener("pointerup", () => { start = null; });
})();

// ---- streamed requests ----

async function stream(url, body, onEvent) {
  const response = await fetch(url, {
    method: "POST", body: JSON.stringify(body), headers: { ...HEADERS, "Content-Type": "application/json" },
  });
  if (!response.ok) throw new Error(await failure(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
    }
  }
}

function updateButtons() {
  $("ask").disabled = view.busy;
  $("generate").disabled = view.busy || !view.scan || !$("generate").dataset.available;
  $("ask-stop").disabled = !(view.busy === "ask" && view.job);
  $("new-conversation").disabled = view.busy || !view.conversation;
  $("generate-stop").disabled = !(view.busy === "generate" && view.job);
}

async function run(kind, url, body, onEvent, statusEl, onStart = () => {}) {
  clearError();
  view.busy = kind;
  view.job = null;
  updateButtons();
  statusEl.textContent = "waiting for the model…";
  let end = null;
  try {
    await stream(url, body, (event) => {
      if (event.type === "start") {
        view.job = event.job;
        onStart(event);
        updateButtons();
        statusEl.textContent = "running…";
      }
      else if (["done", "stopped", "error"].includes(event.type)) end = event;
      else onEvent(event);
    });
  } catch (e) {
    end = { type: "error", error: e.message };
  }
  view.busy = false;
  view.job = null;
  updateButtons();
  if (!end) end = { type: "error", error: "the connection to the app was lost" };
  if (end.type === "error") { showError(end.error); statusEl.textContent = "failed"; }
  else statusEl.textContent = `${end.type === "done" ? "done" : "stopped"} in ${end.duration.toFixed(2)} s`;
  return end;
}

function imageRequest() {
  if (!view.shown) return { scan: null };
  return { scan: view.shown.scan, frame: view.shown.frame, window: view.shown.window };
}

function describeInput(req) {
  if (!req.scan) return "no image: a text-only question";
  const w = req.window ? `window ${req.window[0]} / ${req.window[1]}` : "the file's window";
  return `about ${view.scan.name}, frame ${req.frame + 1}, ${w}`;
}

// The conversation pane: one question and answer per turn; the newest answer is #answer. The server keeps the
// conversation (by id) and starts a new one when the image, frame or window on screen changed.
function newTurn(question) {
  $("answer")?.removeAttribute("id");
  const turn = document.createElement("div");
  turn.className = "turn";
  const q = document.createElement("div");
  q.className = "turn-q";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "turn-a";
  a.id = "answer";
  turn.append(q, a);
  $("conversation").append(turn);
  return turn;
}

$("new-conversation").onclick = () => {
  view.conversation = null;
  $("conversation").textContent = "";
  updateButtons();
};

$("ask").onclick = async () => {
  const req = { ...imageRequest(), question: $("question").value, max_new_tokens: Number($("max-tokens").value),
                conversation: view.conversation };
  const turn = newTurn(req.question);
  const answer = turn.lastChild;
  for (const id of ["ttft", "rate", "tokens"]) $(id).textContent = "";
  const end = await run("ask", "/api/ask", req, (event) => {
    answer.append(event.text);
    answer.parentElement.parentElement.scrollTop = 1e9;
    showRates(event);
  }, $("ask-status"), (start) => {
    if (start.conversation !== view.conversation) {  // a new conversation: this turn alone in the pane
      for (const old of [...$("conversation").children]) if (old !== turn) old.remove();
      $("about").textContent = describeInput(req);
    }
    view.conversation = start.conversation;
    turn.firstChild.dataset.turn = start.turn;
  });
  if (end.type === "done") {
    showRates(end);
    $("question").value = "";
    $("question").placeholder = "Ask a follow-up question about this image…";
  } else if (end.type === "stopped") turn.classList.add("stopped");
  else turn.remove();
};

function showRates(event) {
  if (event.ttft !== undefined) $("ttft").textContent = `first token ${event.ttft.toFixed(3)} s`;
  if (event.rate !== undefined) $("rate").textContent = `${event.rate.toFixed(1)} tokens/s`;
  if (event.tokens !== undefined) $("tokens").textContent = `${event.tokens} tokens`;
}

$("ask-stop").onclick = $("generate-stop").onclick = () => {
  if (view.job) fetch(`/api/jobs/${view.job}/stop`, { method: "POST", headers: HEADERS });
};

$("generate").onclick = async () => {
  const req = { ...imageRequest(), instruction: $("instruction").value, constrain: $("constrain").checked };
  const progress = $("progress");
  progress.value = 0;
  $("progress-label").textContent = `0 / ${progress.max}`;
  const end = await run("generate", "/api/generate", req, (event) => {
    progress.max = event.need;
    progress.value = Math.min(event.done, event.need);
    $("progress-label").textContent = `${event.done} / ${event.need}` + (event.other ? ` (+${event.other} other)` : "");
  }, $("generate-status"));
  if (end.type === "done") {
    const img = $("generated");
    img.src = end.url;
    img.hidden = false;
    img.title = `sha256 ${end.sha256}`;
    $("generated-empty").hidden = true;
    const link = $("download");
    link.href = end.url;
    link.hidden = false;
  }
};

loadInfo().catch((e) => showError(`cannot reach the app: ${e.message}`));
