// The playground: plain JavaScript against the server's own OpenAI-compatible routes, no build step, no CDN.
// Text-to-image: POST /v1/images/generations (JSON); with images: POST /v1/images/edits (multipart, image[] parts).
// Both with stream=true and partial_images: the progress bar and previews come from the server-sent events.
// The API key the user types is kept in sessionStorage (this tab only) and sent as Authorization: Bearer.
"use strict";

const FLAGS = ["use_compile", "use_qkv_fusion", "use_channels_last", "use_modulation_table", "use_first_block_cache",
  "use_flash_attention", "use_mxfp4", "use_dpm_solver", "use_cuda_graphs"];
const TIER_NAMES = { high: "exact", medium: "fp8", low: "fast", auto: "default" };
const MAX_IMAGES = 4;
const MAX_LORAS = 3;  // adapters per request
const PARTIALS = 3;
const $ = (id) => document.getElementById(id);
const state = { images: [], history: [] };  // images: {file, url}

function apiKey() { return $("api-key").value.trim(); }
function headers() { return apiKey() ? { Authorization: "Bearer " + apiKey() } : {}; }

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function renderInputs() {
  const box = $("inputs");
  box.replaceChildren();
  state.images.forEach((im, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = im.url; img.alt = "reference " + (i + 1);
    const rm = document.createElement("button");
    rm.type = "button"; rm.textContent = "x"; rm.title = "remove";
    rm.onclick = () => { state.images.splice(i, 1); renderInputs(); };
    fig.append(img, rm);
    box.append(fig);
  });
}

function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    if (state.images.length >= MAX_IMAGES) { setStatus("at most " + MAX_IMAGES + " reference images", true); break; }
    state.images.push({ file: f, url: URL.createObjectURL(f) });
  }
  renderInputs();
}

function flagControls() {
  for (const flag of FLAGS) {
    const label = document.createElement("label");
    label.textContent = flag;
    const sel = document.createElement("select");
    sel.id = "flag-" + flag;
    for (const v of ["default", "on", "off"]) {
      const o = document.createElement("option"); o.textContent = v; sel.append(o);
    }
    label.append(sel);
    $("flags").append(label);
  }
}

function loraControls(names) {
  // One adapter picker and scale per slot; the section stays hidden when the server lists no adapter.
  const box = $("lora-section");
  box.replaceChildren();
  box.hidden = names.length === 0;
  for (let i = 1; i <= MAX_LORAS && names.length; i++) {
    const label = document.createElement("label");
    label.className = "lora";
    label.textContent = "LoRA " + i + " and scale";
    const sel = document.createElement("select");
    sel.id = "lora-" + i;
    for (const name of ["", ...names]) {
      const o = document.createElement("option"); o.value = name; o.textContent = name || "none"; sel.append(o);
    }
    const scale = document.createElement("input");
    Object.assign(scale, { id: "lora-" + i + "-scale", type: "number", min: -4, max: 4, step: 0.05, value: 1,
      title: "scale, -4 to 4" });
    const row = document.createElement("span");
    row.append(sel, scale);
    label.append(row);
    box.append(label);
  }
}

function loras() {
  const out = [];
  for (let i = 1; i <= MAX_LORAS; i++) {
    const sel = $("lora-" + i);
    if (sel && sel.value) out.push({ name: sel.value, scale: Number($("lora-" + i + "-scale").value || 1) });
  }
  return out;
}

function fields() {
  const out = { prompt: $("prompt").value, quality: $("tier").value, output_format: $("format").value,
    stream: true, partial_images: PARTIALS };
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (num("steps") !== null) out.steps = num("steps");
  if (num("seed") !== null) out.seed = num("seed");
  if (num("guidance") !== null) out.guidance_scale = num("guidance");
  const mode = $("size-mode").value;
  if (mode === "wxh") out.size = $("width").value + "x" + $("height").value;
  if (mode === "aspect") {
    out.aspect_ratio = $("aspect").value;
    out.megapixels = num("megapixels");
    if ($("snap").checked) out.snap = true;
  }
  for (const flag of FLAGS) {
    const v = $("flag-" + flag).value;
    if (v !== "default") out[flag] = v === "on";
  }
  const picked = loras();
  if (picked.length) out.loras = picked;
  return out;
}

function request(body) {
  if (!state.images.length) {
    return fetch("/v1/images/generations", { method: "POST",
      headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }
  const form = new FormData();
  for (const im of state.images) form.append("image[]", im.file, im.file.name || "image.png");
  for (const [k, v] of Object.entries(body)) form.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
  return fetch("/v1/images/edits", { method: "POST", headers: headers(), body: form });
}

async function* events(response) {
  // text/event-stream: "event: <type>\ndata: <json>\n\n"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let type = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { type, data: data ? JSON.parse(data) : null };
    }
  }
}

function fillTable(id, rows) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c.text; if (c.cls) td.className = c.cls;
      tr.append(td);
    }
    body.append(tr);
  }
}

function show(entry) {
  $("result").src = entry.src;
  const cmp = $("compare-inputs");
  cmp.replaceChildren(...entry.inputs.map((u) => { const i = document.createElement("img"); i.src = u; return i; }));
  const rep = entry.report;
  $("size-reason").textContent = rep ? `${rep.width}x${rep.height}, seed ${rep.seed}, ${rep.steps} steps: ` +
    (rep.size_reason || "") : "";
  $("warnings").replaceChildren(...(rep ? rep.warnings : []).map((w) => {
    const li = document.createElement("li"); li.textContent = w; return li; }));
  fillTable("timings", rep ? Object.entries(rep.timings_ms).map(([k, v]) =>
    [{ text: k }, { text: Number(v).toFixed(1), cls: "num" }]) : []);
  fillTable("optimizations", rep ? Object.entries(rep.optimizations).map(([k, o]) =>
    [{ text: k, cls: o.applied ? "applied" : "not-applied" }, { text: o.applied ? "applied" : "off" },
     { text: o.detail }]).concat((rep.loras || []).map((l) =>
    [{ text: "lora " + l.name, cls: "applied" }, { text: "scale " + l.scale }, { text: "rank " + l.rank }])) : []);
}

function remember(entry) {
  state.history.unshift(entry);
  const li = document.createElement("li");
  const img = document.createElement("img"); img.src = entry.src;
  const cap = document.createElement("span");
  const total = entry.report ? Math.round(entry.report.timings_ms.total) + " ms" : "";
  cap.textContent = `${TIER_NAMES[entry.tier]} · ${total} · ${entry.prompt.slice(0, 40)}`;
  li.append(img, cap);
  li.onclick = () => show(entry);
  $("history").prepend(li);
}

async function generate(ev) {
  ev.preventDefault();
  const body = fields();
  $("submit").disabled = true;
  $("progress").value = 0;
  setStatus("queued");
  const started = performance.now();
  try {
    const response = await request(body);
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      const e = err.error || {};
      throw new Error(`${response.status} ${e.code || ""}: ${e.message || response.statusText}`);
    }
    const mime = "image/" + body.output_format;
    for await (const event of events(response)) {
      if (event.type.endsWith(".partial_image")) {
        $("progress").value = Math.round(100 * (event.data.partial_image_index + 1) / (PARTIALS + 1));
        $("result").src = `data:${mime};base64,${event.data.b64_json}`;
        setStatus(`denoising: preview ${event.data.partial_image_index + 1}`);
      } else if (event.type.endsWith(".completed")) {
        $("progress").value = 100;
        const entry = { src: `data:${mime};base64,${event.data.b64_json}`, report: event.data.kontext,
          inputs: state.images.map((im) => im.url), prompt: body.prompt, tier: body.quality };
        show(entry);
        remember(entry);
        setStatus(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      } else if (event.type === "error") {
        const e = event.data.error || {};
        throw new Error(`${e.code || "error"}: ${e.message || ""}`);
      }
    }
  } catch (err) {
    setStatus(String(err.message || err), true);
  } finally {
    $("submit").disabled = false;
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) {
      const m = await r.json();
      $("model").textContent = m.data[0].id;
      loraControls(m.data.filter((card) => card.parent).map((card) => card.id));  // the served model's adapters
    }
    else if (r.status === 401) $("model").textContent = "enter the API key";
  } catch (_) { /* offline: the page still works once the server answers */ }
}

function init() {
  $("api-key").value = sessionStorage.getItem("flux-api-key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("flux-api-key", apiKey()); loadModel(); });
  $("images").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  document.addEventListener("paste", (e) => addFiles([...e.clipboardData.files]));
  $("size-mode").addEventListener("change", () => { $("form").className = "mode-" + $("size-mode").value; });
  $("form").addEventListener("submit", generate);
  flagControls();
  loadModel();
}

init();
