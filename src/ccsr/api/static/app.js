// CCSR playground: talks to this server's public APIs only (Runware imageUpload + upscale, fal queue) plus
// /playground/models (the models and their forms: parameters, help, server defaults), /playground/config
// (limits) and /playground/events (progress stream).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    config: null, models: [], model: null, image: null, job: null, result: null, busy: false, snap: null, snapAt: 0,
  };

  class ApiError extends Error {}

  // ------------------------------------------------------------------------------------ helpers

  function uuid4() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));
  const size = (w, h) => `${w} × ${h}`;

  function el(tag, attrs = {}, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // The API's own words: Runware {errors:[{code,message}]}, fal {detail: str | [{loc,msg}]}, {status}.
  function describeError(status, data, text) {
    let lines = [];
    if (data && Array.isArray(data.errors)) {
      lines = data.errors.map((e) => `${e.code}: ${e.message}`);
    } else if (data && Array.isArray(data.detail)) {
      lines = data.detail.map((d) => {
        const where = (d.loc || []).filter((x) => x !== "body").join(".");
        return where ? `${where}: ${d.msg}` : d.msg;
      });
    } else if (data && data.detail !== undefined) {
      lines = [data.error_type ? `${data.error_type}: ${data.detail}` : String(data.detail)];
    } else if (data && data.status) {
      lines = [String(data.status)];
    } else if (text) {
      lines = [text.slice(0, 500)];
    }
    return `HTTP ${status}\n${lines.join("\n")}`.trim();
  }

  async function api(method, url, body) {
    const headers = authHeaders();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(`Network error: ${e.message}`);
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!res.ok) throw new ApiError(describeError(res.status, data, text));
    return data;
  }

  // Bring something that just appeared into view, without moving what is already visible.
  const reveal = (node) => node.scrollIntoView({ block: "nearest" });

  function showError(e) {
    const box = $("error");
    box.textContent = e instanceof ApiError ? e.message : `Error: ${e.message || e}`;
    box.hidden = false;
    reveal(box);
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // ------------------------------------------------------------------------------------ server + form

  // The model's load status from /playground/models: a failure is an alert with its cause, not a grey line.
  function showModelStatus() {
    const m = state.model;
    const line = $("server-status");
    const banner = $("model-error");
    line.classList.toggle("failed", m.status === "failed");
    banner.hidden = m.status !== "failed";
    if (m.status === "ready") {
      line.textContent = `${m.name} ready.`;
    } else if (m.status === "failed") {
      line.textContent = `${m.name} failed to load.`;
      banner.textContent =
        `${m.name} failed to load, so nothing can be upscaled: ${m.error}\n` +
        "Fix the cause and restart ccsr serve (its log has the details).";
    } else {
      line.textContent = `${m.name} loading… (jobs queue until it is ready)`;
    }
    setBusy(state.busy);
  }

  async function watchModels() {
    for (;;) {
      try {
        state.models = await api("GET", "/playground/models");
        state.model = state.models.find((m) => m.name === state.model.name) || state.models[0];
        showModelStatus();
        if (state.models.every((m) => m.status !== "loading")) return;
      } catch {
        $("server-status").textContent = "Server unreachable; retrying…";
      }
      await sleep(2000);
    }
  }

  const json = (v) => JSON.stringify(v ?? null);

  function buildField(container, spec) {
    const id = `param-${spec.name}`;
    const wrap = el("div", { class: "field", "data-name": spec.name });
    const label = el("label", { for: id }, `${spec.title} `);
    label.append(el("code", { class: "api-name" }, spec.name));
    let input;
    if (spec.options) {
      input = el("select");
      for (const o of spec.options) input.append(el("option", { value: json(o.value) }, o.label));
      input.value = json(spec.default);
    } else if (spec.type === "text") {
      input = el("textarea", { rows: "2", maxlength: String(spec.maxLength) });
      input.value = spec.default;
      wrap.classList.add("wide");
    } else {
      input = el("input", { type: "number", step: spec.type === "integer" ? "1" : "any", inputmode: "decimal" });
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      if (spec.empty) input.placeholder = spec.empty;
      if (spec.default !== null) input.value = spec.default;
    }
    Object.assign(input.dataset, { api: spec.api, kind: spec.type, default: json(spec.default) });
    input.id = id;
    input.name = spec.name;
    const facts = [];
    if (spec.maximum !== undefined) facts.push(`range ${spec.minimum}–${spec.maximum}`);
    if (spec.default !== null && spec.default !== "") facts.push(`default ${spec.default}`);
    const tail = facts.length ? ` ${facts.join("; ").replace(/^./, (c) => c.toUpperCase())}.` : "";
    const hint = el("span", { class: "hint", id: `${id}-hint` }, `${spec.help}${tail}`);
    input.setAttribute("aria-describedby", hint.id);
    wrap.append(label, input, hint);
    container.append(wrap);
  }

  // The form of the chosen model, as the server describes it: no defaults or ranges live in the page.
  function buildForm() {
    for (const group of ["main", "tiling", "advanced"]) $(`${group}-fields`).replaceChildren();
    for (const spec of state.model.parameters) buildField($(`${spec.group}-fields`), spec);
    const m = state.model;
    $("model-hint").textContent = `fal app ${m.fal_app_id} · Runware model ${m.runware_model}`;
    showModelStatus();
    refreshRoute();
  }

  function buildModelChoice() {
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => el("option", { value: m.name }, m.name)));
    select.value = state.model.name;
  }

  // A field's value as the API takes it; null: left out, so the server decides.
  function value(input) {
    if (input.tagName === "SELECT") return JSON.parse(input.value);
    if (input.dataset.kind === "integer" || input.dataset.kind === "number") {
      if (input.value.trim() === "") return null;
      const n = Number(input.value);
      return Number.isFinite(n) ? n : input.value;
    }
    return input.value;
  }

  const isDefault = (input) => json(value(input)) === input.dataset.default;
  const paramInputs = (api) => Array.from(document.querySelectorAll(`[data-api${api ? `="${api}"` : ""}]`));
  const usesRunware = () => paramInputs("runware").some((i) => !isDefault(i));

  // False when the field's `needs` are not met (e.g. a tile size while tiling is automatic): it is not sent.
  function applies(input) {
    const spec = state.model.parameters.find((p) => p.name === input.name);
    return Object.entries(spec.needs || {}).every(([name, values]) => {
      const other = $(`param-${name}`);
      return other && applies(other) && values.map(json).includes(json(value(other)));
    });
  }

  // What the page will send: {api: "fal"|"runware", fal, runware, falOnly, runwareOnly}.
  function buildRequest() {
    const image = state.image ? state.image.url : "<image URL or data URI>";
    const fal = {};
    for (const i of paramInputs()) {
      const v = value(i);
      if (i.dataset.api !== "runware" && applies(i) && v !== null) fal[i.name] = v;
    }
    const settings = {};
    for (const i of paramInputs("both")) if (i.name !== "scale" && fal[i.name] !== undefined) settings[i.name] = fal[i.name];
    for (const i of paramInputs("runware")) if (!isDefault(i)) settings[i.name] = value(i);
    const task = {
      taskType: "upscale",
      taskUUID: uuid4(),
      model: state.model.runware_model,
      inputs: { image },
      upscaleFactor: fal.scale,
      outputType: "URL",
      outputFormat: "PNG",
      settings,
    };
    const falOnly = paramInputs("fal").filter((i) => applies(i) && !isDefault(i)).map((i) => i.name);
    const runwareOnly = paramInputs("runware").filter((i) => !isDefault(i)).map((i) => i.name);
    return {
      api: runwareOnly.length ? "runware" : "fal",
      fal: { image_url: image, ...fal },
      runware: task,
      falOnly,
      runwareOnly,
    };
  }

  function refreshRoute() {
    if (!state.model) return; // the API key field is in the form too, and may be typed in before it is built
    const rw = usesRunware();
    for (const i of paramInputs()) {
      const off = (rw && i.dataset.api === "fal") || !applies(i);
      i.disabled = off;
      i.closest(".field").classList.toggle("off", off);
    }
    $("route").replaceChildren(
      "Sends: ",
      el("strong", {}, rw ? "Runware task API" : "fal queue API"),
      ` (${rw ? "POST /v1, taskType upscale" : `POST /queue/${state.model.fal_app_id}`})`,
    );
    refreshSizes();
    refreshCode();
  }

  function refreshSizes() {
    const img = state.image;
    if (!img) return;
    $("input-size").textContent = `${size(img.width, img.height)} px`;
    const scale = Number($("param-scale").value);
    if (!(scale > 0)) {
      $("output-size").textContent = "–";
      return;
    }
    const w = Math.ceil(scale * img.width);
    const h = Math.ceil(scale * img.height);
    const cap = state.config.limits.max_output_side;
    let note = "";
    if (cap && (w > cap || h > cap)) {
      note = usesRunware() ? ` (over ${cap} px: the server shrinks the input first)` : ` (over this server's ${cap} px limit)`;
    }
    $("output-size").textContent = `${size(w, h)} px${note}`;
  }

  // ------------------------------------------------------------------------------------ input image

  function readAsDataURL(file) {
    return new Promise((ok, bad) => {
      const r = new FileReader();
      r.onload = () => ok(r.result);
      r.onerror = () => bad(r.error);
      r.readAsDataURL(file);
    });
  }

  // "photo.jpg", "https://host/a/b.webp?x=1", "data:..." -> "photo", "b", "image": the download's base name.
  function baseName(label) {
    let last = label.startsWith("data:") ? "image" : label.split(/[?#]/)[0].split(/[/\\]/).pop();
    last = last.replace(/\.[A-Za-z0-9]{1,5}$/, "").replace(/[^\w.-]+/g, "_").slice(0, 100);
    return last || "image";
  }

  // Every source goes through Runware's imageUpload: the server checks it and keeps one copy we can reuse.
  async function useImage(ref, label) {
    clearError();
    state.image = null;
    state.result = null;
    $("result").hidden = true; // it compares against the previous input
    $("progress-box").hidden = true;
    $("upscale").disabled = true;
    $("input-info").hidden = false;
    $("input-size").textContent = `Uploading ${label}…`;
    $("output-size").textContent = "–";
    $("input-thumb").removeAttribute("src");
    try {
      const data = await api("POST", "/v1", [{ taskType: "imageUpload", taskUUID: uuid4(), image: ref }]);
      const item = data.data[0];
      const head = await fetch(item.imageURL, { method: "HEAD" });
      let width = Number(head.headers.get("X-Image-Width"));
      let height = Number(head.headers.get("X-Image-Height"));
      $("input-thumb").src = item.imageURL;
      if (!(width && height)) {
        await $("input-thumb").decode(); // the headers are hidden when images live on another origin
        ({ naturalWidth: width, naturalHeight: height } = $("input-thumb"));
      }
      state.image = { id: item.imageUUID, url: item.imageURL, width, height, name: baseName(label) };
      setBusy(state.busy);
      refreshSizes();
      refreshCode();
      reveal($("upscale"));
    } catch (e) {
      $("input-info").hidden = true;
      showError(e);
    }
  }

  async function useFile(file) {
    if (!file) return;
    try {
      await useImage(await readAsDataURL(file), file.name);
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------------------------ run a job

  function setBusy(busy) {
    state.busy = busy;
    const failed = !state.model || state.model.status === "failed";
    $("upscale").disabled = busy || !state.image || failed;
    $("cancel").disabled = !busy;
  }

  function fmtSeconds(s) {
    return s >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${s.toFixed(s < 10 ? 1 : 0)} s`;
  }

  function renderProgress() {
    const snap = state.snap;
    if (!snap) return;
    const dt = (performance.now() - state.snapAt) / 1000;
    $("progress").value = snap.progress;
    let text;
    if (snap.status === "queued") {
      text = snap.queue_position ? `Queued: ${snap.queue_position} job(s) ahead` : "Queued: next";
    } else if (snap.status === "processing") {
      text = `${snap.progress}%`;
      if (snap.elapsed !== undefined) text += ` · ${fmtSeconds(snap.elapsed + dt)} elapsed`;
      if (snap.eta !== undefined) text += ` · about ${fmtSeconds(Math.max(0, snap.eta - dt))} left`;
    } else if (snap.status === "success") {
      text = `Done in ${fmtSeconds(snap.elapsed || 0)}`;
    } else if (snap.status === "cancelled") {
      text = "Cancelled";
    } else {
      text = "Failed";
    }
    $("progress-text").textContent = text;
    $("progress-label").textContent = `Progress: ${snap.progress}%`;
    if (snap.plan) $("tile-plan").textContent = `Planned for the last image: ${snap.plan}.`;
  }

  function parseEvent(chunk) {
    let event = "message";
    const data = [];
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
    }
    return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
  }

  // Follow /playground/events/{id} (fetch, so the API key header goes along) until its "done" event.
  async function follow(id) {
    for (let attempt = 0; attempt < 6; attempt++) {
      if (attempt) await sleep(1000);
      let res;
      try {
        res = await fetch(`/playground/events/${encodeURIComponent(id)}`, { headers: authHeaders() });
      } catch {
        continue;
      }
      if (!res.ok) {
        const text = await res.text();
        let data = null;
        try {
          data = JSON.parse(text);
        } catch {
          data = null;
        }
        throw new ApiError(describeError(res.status, data, text));
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      try {
        for (;;) {
          const { value: chunk, done } = await reader.read();
          if (done) break;
          buf += chunk;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const ev = parseEvent(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
            if (!ev) continue;
            if (ev.event === "gone") throw new ApiError(ev.data.detail);
            state.snap = ev.data;
            state.snapAt = performance.now();
            renderProgress();
            if (ev.event === "done") return ev.data;
          }
        }
      } catch (e) {
        if (e instanceof ApiError) throw e;
      }
    }
    throw new ApiError("Lost the progress stream from the server.");
  }

  // The finished job's output, or the API's error for it (thrown as ApiError).
  async function fetchOutput(job) {
    if (job.api === "fal") {
      const out = await api("GET", job.responseUrl);
      return { url: out.image.url, seed: out.seed };
    }
    const data = await api("POST", "/v1", [{ taskType: "getResponse", taskUUID: job.id }]);
    const item = data.data[0];
    return { url: item.imageURL, seed: job.seed };
  }

  async function upscale(ev) {
    ev.preventDefault();
    if (!state.image || state.busy) return;
    clearError();
    $("result").hidden = true;
    state.result = null;
    state.snap = null;
    $("progress").value = 0;
    $("progress-text").textContent = "Submitting…";
    $("progress-label").textContent = "Progress";
    $("progress-box").hidden = false;
    reveal($("progress-box"));
    setBusy(true);
    const req = buildRequest();
    try {
      if (req.api === "fal") {
        const sub = await api("POST", `/queue/${state.model.fal_app_id}`, req.fal);
        state.job = { api: "fal", id: sub.request_id, cancelUrl: sub.cancel_url, responseUrl: sub.response_url };
      } else {
        await api("POST", "/v1", [{ ...req.runware, deliveryMethod: "async" }]);
        state.job = { api: "runware", id: req.runware.taskUUID, seed: req.runware.settings.seed };
      }
      const final = await follow(state.job.id);
      if (final.status !== "cancelled") await showResult(await fetchOutput(state.job), final, req);
    } catch (e) {
      $("progress-box").hidden = true; // the error replaces it: its "Submitting…" or "Failed" adds nothing
      showError(e);
    } finally {
      setBusy(false);
    }
  }

  async function cancelJob() {
    const job = state.job;
    if (!job || !state.busy) return;
    $("cancel").disabled = true;
    $("progress-text").textContent = "Cancelling…";
    try {
      if (job.api === "fal") await api("PUT", job.cancelUrl);
      else await api("POST", `/playground/cancel/${encodeURIComponent(job.id)}`);
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------------------------ compare view

  function cubic(t) {
    const a = -0.5; // Keys / Catmull-Rom, as PIL and OpenCV use for "bicubic"
    t = Math.abs(t);
    if (t <= 1) return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1;
    if (t < 2) return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a;
    return 0;
  }

  function taps(dn, sn) {
    const idx = new Int32Array(dn * 4);
    const w = new Float32Array(dn * 4);
    for (let d = 0; d < dn; d++) {
      const x = ((d + 0.5) * sn) / dn - 0.5;
      const x0 = Math.floor(x) - 1;
      let sum = 0;
      for (let k = 0; k < 4; k++) {
        const wk = cubic(x - (x0 + k));
        idx[d * 4 + k] = Math.min(sn - 1, Math.max(0, x0 + k));
        w[d * 4 + k] = wk;
        sum += wk;
      }
      for (let k = 0; k < 4; k++) w[d * 4 + k] /= sum;
    }
    return { idx, w };
  }

  // Separable bicubic resize of RGBA pixels (sw x sh -> dw x dh).
  function bicubic(src, sw, sh, dw, dh) {
    const tx = taps(dw, sw);
    const ty = taps(dh, sh);
    const tmp = new Float32Array(sh * dw * 4);
    for (let y = 0; y < sh; y++) {
      for (let x = 0; x < dw; x++) {
        for (let c = 0; c < 4; c++) {
          let v = 0;
          for (let k = 0; k < 4; k++) v += src[(y * sw + tx.idx[x * 4 + k]) * 4 + c] * tx.w[x * 4 + k];
          tmp[(y * dw + x) * 4 + c] = v;
        }
      }
    }
    const out = new Uint8ClampedArray(dw * dh * 4);
    for (let y = 0; y < dh; y++) {
      for (let x = 0; x < dw; x++) {
        for (let c = 0; c < 4; c++) {
          let v = 0;
          for (let k = 0; k < 4; k++) v += tmp[(ty.idx[y * 4 + k] * dw + x) * 4 + c] * ty.w[y * 4 + k];
          out[(y * dw + x) * 4 + c] = v;
        }
      }
    }
    return out;
  }

  async function drawBicubic() {
    const r = state.result;
    const canvas = $("before-bicubic");
    if (canvas.dataset.key === `${r.inputUrl} ${r.width}x${r.height}`) return;
    const img = new Image();
    img.src = r.inputUrl;
    await img.decode();
    const src = document.createElement("canvas");
    src.width = img.naturalWidth;
    src.height = img.naturalHeight;
    const sctx = src.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(img, 0, 0);
    const pixels = sctx.getImageData(0, 0, src.width, src.height).data;
    canvas.width = r.width;
    canvas.height = r.height;
    const data = bicubic(pixels, src.width, src.height, r.width, r.height);
    canvas.getContext("2d").putImageData(new ImageData(data, r.width, r.height), 0, 0);
    canvas.dataset.key = `${r.inputUrl} ${r.width}x${r.height}`;
  }

  async function applyResample() {
    const nearest = $("resample").value === "nearest";
    $("before-nearest").hidden = !nearest;
    $("before-bicubic").hidden = nearest;
    if (!nearest && state.result) {
      try {
        await drawBicubic();
      } catch {
        $("resample").value = "nearest";
        $("before-nearest").hidden = false;
        $("before-bicubic").hidden = true;
      }
    }
  }

  function applySplit() {
    const s = Number($("split").value);
    $("after").style.clipPath = `inset(0 0 0 ${s}%)`;
    $("divider").style.left = `${s}%`;
    $("split").setAttribute("aria-valuetext", `${s}% before, ${100 - s}% after`);
  }

  function applyZoom() {
    const r = state.result;
    if (!r) return;
    const stage = $("stage");
    let z = Number($("zoom").value);
    if (!(z > 0)) z = Math.min((stage.clientWidth - 2) / r.width, (window.innerHeight * 0.7 - 4) / r.height) || 1;
    const box = $("canvas-box");
    box.style.width = `${Math.max(1, Math.floor(r.width * z))}px`;
    box.style.height = `${Math.max(1, Math.floor(r.height * z))}px`;
    box.classList.toggle("px", z >= 1); // both sides show their pixels the same way when enlarged
  }

  function splitFromPointer(ev) {
    const rect = $("canvas-box").getBoundingClientRect();
    const s = Math.round(((ev.clientX - rect.left) / rect.width) * 100);
    $("split").value = Math.max(0, Math.min(100, s));
    applySplit();
  }

  async function showResult(out, final, req) {
    const after = $("after");
    after.src = out.url;
    await after.decode();
    state.result = {
      url: out.url,
      seed: out.seed,
      width: after.naturalWidth,
      height: after.naturalHeight,
      inputUrl: state.image.url,
      name: `${state.image.name}_x${req.api === "fal" ? req.fal.scale : req.runware.upscaleFactor}`,
    };
    $("before-nearest").src = state.image.url;
    $("result").hidden = false;
    const info = $("result-info");
    const seed = out.seed !== undefined ? ` · seed ${out.seed}` : "";
    const plan = final.plan ? ` · ${final.plan}` : "";
    info.textContent = `${size(after.naturalWidth, after.naturalHeight)} px${seed}${plan} · `;
    info.append(el("a", { href: out.url, target: "_blank", rel: "noopener" }, "open the original"));
    applyZoom();
    applySplit();
    await applyResample();
    $("result").dataset.ready = "true";
    reveal($("progress-box"));
    // one column (narrow windows): the result starts below the window; show it under its "Done in" line
    if ($("result").getBoundingClientRect().top > window.innerHeight * 0.6) {
      $("progress-box").scrollIntoView({ block: "start" });
    }
  }

  // ------------------------------------------------------------------------------------ download

  async function download() {
    const r = state.result;
    if (!r) return;
    const fmt = $("format").value;
    const mime = `image/${fmt}`;
    try {
      const res = await fetch(r.url);
      if (!res.ok) throw new ApiError(describeError(res.status, null, await res.text()));
      let blob = await res.blob();
      if (blob.type !== mime) {
        const bitmap = await createImageBitmap(blob);
        const canvas = document.createElement("canvas");
        canvas.width = bitmap.width;
        canvas.height = bitmap.height;
        const ctx = canvas.getContext("2d");
        if (fmt === "jpeg") {
          ctx.fillStyle = "#fff";
          ctx.fillRect(0, 0, canvas.width, canvas.height);
        }
        ctx.drawImage(bitmap, 0, 0);
        const quality = Math.min(100, Math.max(1, Number($("quality").value) || 92)) / 100;
        blob = await new Promise((ok) => canvas.toBlob(ok, mime, quality));
        if (!blob || blob.type !== mime) throw new Error(`this browser cannot encode ${fmt.toUpperCase()}`);
      }
      const a = el("a", { href: URL.createObjectURL(blob), download: `${r.name}.${fmt === "jpeg" ? "jpg" : fmt}` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 30000);
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------------------------ code snippets

  function py(v, indent = "") {
    if (v === null || v === undefined) return "None";
    if (v === true) return "True";
    if (v === false) return "False";
    if (typeof v === "number" || typeof v === "string") return JSON.stringify(v);
    const inner = `${indent}    `;
    if (Array.isArray(v)) return `[${v.map((x) => py(x, indent)).join(", ")}]`;
    const items = Object.entries(v).map(([k, x]) => `${inner}${JSON.stringify(k)}: ${py(x, inner)},`);
    return items.length ? `{\n${items.join("\n")}\n${indent}}` : "{}";
  }

  const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

  function snippets() {
    const req = buildRequest();
    const origin = location.origin;
    const host = location.host;
    const app = state.model.fal_app_id;
    const falNote = req.runwareOnly.length ? `# not accepted by fal (Runware only): ${req.runwareOnly.join(", ")}\n` : "";
    const rwNote = req.falOnly.length ? `# not accepted by Runware (fal only): ${req.falOnly.join(", ")}\n` : "";
    const task = { ...req.runware };
    const curl =
      req.api === "fal"
        ? `curl -sS -X POST ${shellQuote(`${origin}/queue/${app}`)} \\\n  -H "Authorization: Key $FAL_KEY" \\\n` +
          `  -H 'Content-Type: application/json' \\\n  -d ${shellQuote(JSON.stringify(req.fal, null, 2))}\n` +
          `# then: curl "<status_url>?logs=1" until COMPLETED, and curl "<response_url>" for the output\n`
        : `curl -sS -X POST ${shellQuote(`${origin}/v1`)} \\\n  -H "Authorization: Bearer $RUNWARE_API_KEY" \\\n` +
          `  -H 'Content-Type: application/json' \\\n` +
          `  -d ${shellQuote(JSON.stringify([{ ...task, deliveryMethod: "sync" }], null, 2))}\n` +
          `# taskUUID: a fresh UUID v4 per request\n`;
    const fal =
      `import os\n\n` +
      `# fal_client reads these at import time and always speaks HTTPS: start the server with\n` +
      `# \`ccsr serve --tls-self-signed DIR\` and point SSL_CERT_FILE at its certificate.\n` +
      `os.environ["FAL_RUN_HOST"] = ${JSON.stringify(host)}\n` +
      `os.environ["FAL_QUEUE_RUN_HOST"] = ${JSON.stringify(`${host}/queue`)}\n` +
      `os.environ.setdefault("FAL_KEY", "local")  # any key from loopback, else one of --api-key\n\n` +
      `import fal_client  # noqa: E402\n\n${falNote}` +
      `result = fal_client.subscribe(\n    ${JSON.stringify(app)},\n    arguments=${py(req.fal, "    ")},\n` +
      `    with_logs=True,\n    on_queue_update=print,\n)\nprint(result["image"]["url"], result["seed"])\n`;
    delete task.taskUUID;
    const runware =
      `import asyncio\nimport os\n\nfrom runware import Runware\n\n\nasync def main() -> None:\n` +
      `    async with Runware(\n        api_key=os.environ.get("RUNWARE_API_KEY", "local"),\n` +
      `        transport="rest",\n        http_base_url=${JSON.stringify(`${origin}/v1`)},\n    ) as rw:\n` +
      `${rwNote ? `        ${rwNote}` : ""}` +
      `        result = await rw.run(${py(task, "        ")})\n        print(result[0]["imageURL"])\n\n\n` +
      `asyncio.run(main())\n`;
    return { curl, fal, runware };
  }

  function refreshCode() {
    if (!state.model) return;
    const tab = document.querySelector('[role="tab"][aria-selected="true"]').dataset.tab;
    $("code-text").textContent = snippets()[tab];
  }

  function selectTab(btn) {
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const on = t === btn;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
    }
    $("code").setAttribute("aria-labelledby", btn.id);
    refreshCode();
  }

  async function copyCode() {
    const text = $("code-text").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const ta = el("textarea");
      ta.value = text;
      document.body.append(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    $("copy-status").textContent = "Copied.";
    setTimeout(() => ($("copy-status").textContent = ""), 2000);
  }

  // ------------------------------------------------------------------------------------ wiring

  function wire() {
    $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
    // the whole window takes drops, so a missed drop zone never navigates away from the page
    const drop = $("drop");
    window.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    window.addEventListener("dragleave", (e) => e.relatedTarget === null && drop.classList.remove("over"));
    window.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0];
      const url = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
      if (file) useFile(file);
      else if (url) useImage(url.trim(), url.trim());
    });
    document.addEventListener("paste", (e) => {
      if (e.target.closest("input, textarea")) return;
      const file = e.clipboardData.files[0];
      const text = e.clipboardData.getData("text/plain").trim();
      if (file) useFile(file);
      else if (/^(https?:|data:)/i.test(text)) useImage(text, text.slice(0, 60));
    });
    $("url-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const url = $("url").value.trim();
      if (url) useImage(url, url);
    });
    $("params").addEventListener("input", refreshRoute);
    $("params").addEventListener("change", refreshRoute);
    $("params").addEventListener("submit", upscale);
    $("cancel").addEventListener("click", cancelJob);
    $("split").addEventListener("input", applySplit);
    $("zoom").addEventListener("change", applyZoom);
    $("resample").addEventListener("change", applyResample);
    window.addEventListener("resize", () => $("zoom").value === "fit" && applyZoom());
    const box = $("canvas-box");
    box.addEventListener("pointerdown", (e) => {
      box.setPointerCapture(e.pointerId);
      splitFromPointer(e);
    });
    box.addEventListener("pointermove", (e) => box.hasPointerCapture(e.pointerId) && splitFromPointer(e));
    $("download").addEventListener("click", download);
    $("format").addEventListener("change", () => ($("quality").disabled = $("format").value === "png"));
    $("quality").disabled = true;
    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
    for (const t of tabs) {
      t.addEventListener("click", () => selectTab(t));
      t.addEventListener("keydown", (e) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
        if (!step) return;
        const next = tabs[(tabs.indexOf(t) + step + tabs.length) % tabs.length];
        selectTab(next);
        next.focus();
      });
    }
    $("copy").addEventListener("click", copyCode);
    $("model").addEventListener("change", () => {
      state.model = state.models.find((m) => m.name === $("model").value);
      buildForm();
    });
    setInterval(() => state.busy && renderProgress(), 1000);
  }

  async function init() {
    wire();
    try {
      [state.config, state.models] = await Promise.all([api("GET", "/playground/config"), api("GET", "/playground/models")]);
    } catch (e) {
      showError(e);
      return;
    }
    state.model = state.models[0];
    buildModelChoice();
    buildForm();
    watchModels();
  }

  init();
})();
