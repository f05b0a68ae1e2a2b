// The playground: a form for POST /v1/images/generations, live previews from the server's
// event stream when it streams, and a gallery of this tab's results kept in IndexedDB.
"use strict";

(() => {
  const PARTIAL_IMAGES = 2;
  const SESSION_ITEM = "imagefleet.session";
  const DB_NAME = "imagefleet-playground";
  const STORE = "results";
  const form = document.getElementById("generate-form");
  const button = document.getElementById("generate");
  const status = document.getElementById("status");
  const previews = document.getElementById("previews");
  const previewImages = document.getElementById("preview-images");
  const gallery = document.getElementById("gallery");
  const empty = document.getElementById("empty");
  const streamBox = document.getElementById("stream");
  let streaming = null; // null: not known yet; false: the server refused stream=true


  if (!sessionStorage.getItem(SESSION_ITEM)) {
    sessionStorage.setItem(SESSION_ITEM, String(Date.now()) + "-" + Math.random().toString(36).slice(2));
  }
  const session = sessionStorage.getItem(SESSION_ITEM);

  // --- the gallery's storage: IndexedDB, one record per image, tagged with this tab's session ---

  function openDb() {
    return new Promise((resolve, reject) => {
      const request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = () => {
        const store = request.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
        store.createIndex("session", "session");
      };
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  }

  async function withStore(mode, fn) {
    const db = await openDb();
    return new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const result = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(result && "result" in result ? result.result : undefined);
      tx.onerror = () => reject(tx.error);
    });
  }

  const saveResult = (record) => withStore("readwrite", (store) => store.add(record));
  const sessionResults = () =>
    withStore("readonly", (store) => store.index("session").getAll(IDBKeyRange.only(session)));
  const clearResults = () =>
    withStore("readwrite", (store) => {
      const cursor = store.index("session").openCursor(IDBKeyRange.only(session));
      cursor.onsuccess = () => {
        if (cursor.result) {
          cursor.result.delete();
          cursor.result.continue();
        }
      };
    });

  // --- images ---

  function blobOf(b64, format) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: "image/" + (format || "png") });
  }

  function describe(params) {
    const parts = [params.size || "default size"];
    if (params.num_inference_steps) parts.push(params.num_inference_steps + " steps");
    if (params.guidance_scale !== undefined) parts.push("guidance " + params.guidance_scale);
    parts.push(params.seed !== undefined ? "seed " + params.seed : "random seed");
    return parts.join(" · ");
  }

  function show(record, first) {
    const item = document.createElement("li");
    item.className = "result";
    const img = document.createElement("img");
    img.src = URL.createObjectURL(record.image);
    img.alt = record.params.prompt;
    img.className = "result-image";
    const link = document.createElement("a");
    link.href = img.src;
    link.download = "imagefleet-" + record.created + "-" + record.index + "." + record.format;
    link.appendChild(img);
    item.appendChild(link);
    const text = document.createElement("div");
    imagefleet.text(text, "p", record.params.prompt, "prompt");
    if (record.params.negative_prompt) imagefleet.text(text, "p", "not: " + record.params.negative_prompt, "muted");
    imagefleet.text(text, "p", describe(record.params), "muted");
    imagefleet.text(text, "p", (record.seconds ? record.seconds.toFixed(1) + " s" : "") + (record.streamed ? " · streamed" : ""), "muted");
    item.appendChild(text);
    if (first) gallery.prepend(item);
    else gallery.appendChild(item);
    empty.hidden = true;
  }

  function preview(b64, format, label) {
    previews.hidden = false;
    let img = previewImages.querySelector("img");
    if (!img) {
      img = document.createElement("img");
      img.className = "preview-image";
      previewImages.appendChild(img);
    }
    const old = img.src;
    img.src = URL.createObjectURL(blobOf(b64, format));
    img.alt = label;
    img.dataset.label = label;
    if (old) URL.revokeObjectURL(old);
  }

  // --- the request ---

  function params() {
    const data = new FormData(form);
    const body = { prompt: String(data.get("prompt") || "").trim() };
    const text = (name) => String(data.get(name) || "").trim();
    if (text("negative_prompt")) body.negative_prompt = text("negative_prompt");
    if (text("size")) body.size = text("size");
    if (text("steps")) body.num_inference_steps = Number(text("steps"));
    if (text("guidance")) body.guidance_scale = Number(text("guidance"));
    if (text("seed")) body.seed = Number(text("seed"));
    if (text("n")) body.n = Number(text("n"));
    return body;
  }

  async function post(body) {
    return imagefleet.api("/v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  // The images of a request as [{b64, format}], showing previews as they arrive. OpenAI's stream
  // carries one image, so n > 1 streams as n requests of one image each (seed + i), sent together:
  // the pod batches them as it would batch one request of n.
  async function run(body) {
    const n = body.n || 1;
    if (n === 1 || !streamBox.checked || streaming === false) return runOne(body);
    const one = (i) => ({ ...body, n: 1, ...(body.seed !== undefined ? { seed: body.seed + i } : {}) });
    const results = await Promise.all(Array.from({ length: n }, (_, i) => runOne(one(i))));
    return {
      images: results.flatMap((r) => r.images),
      streamed: results.every((r) => r.streamed),
      partials: results.reduce((total, r) => total + r.partials, 0),
    };
  }

  async function runOne(body) {
    const wantStream = streamBox.checked && streaming !== false;
    let response = await post(wantStream ? { ...body, stream: true, partial_images: PARTIAL_IMAGES } : body);
    if (wantStream && response.status === 400) {
      const error = await response.clone().json().catch(() => null);
      const param = error && error.error && error.error.param;
      if (param === "stream" || param === "partial_images") {
        streaming = false; // this server answers with complete images only
        response = await post(body);
      }
    }
    if (!response.ok) throw new Error(await imagefleet.errorOf(response));
    const type = response.headers.get("Content-Type") || "";
    if (type.startsWith("text/event-stream")) {
      streaming = true;
      const images = [];
      let partials = 0;
      for await (const { event, data } of imagefleet.events(response)) {
        const kind = data.type || event;
        if (kind === "imagefleet.progress") {
          if (data.queued_ahead !== undefined) {
            status.textContent = "Queued: " + data.queued_ahead + " ahead…";
          } else if (data.steps_done !== undefined && !partials) {
            status.textContent = "Step " + data.steps_done + " of " + data.steps_total + "…";
          }
        } else if (kind === "image_generation.partial_image") {
          partials += 1;
          preview(data.b64_json, data.output_format, "Preview " + (data.partial_image_index + 1));
          status.textContent = "Preview " + (data.partial_image_index + 1) + " of " + PARTIAL_IMAGES + "…";
        } else if (kind === "image_generation.completed") {
          images.push({ b64: data.b64_json, format: data.output_format });
          preview(data.b64_json, data.output_format, "Final image " + images.length);
        } else if (kind === "error") {
          throw new Error((data.error && data.error.message) || "the stream reported an error");
        }
      }
      if (!images.length) throw new Error("the stream ended without an image");
      return { images, streamed: true, partials };
    }
    const answer = await response.json();
    const format = answer.output_format || "png";
    return { images: answer.data.map((d) => ({ b64: d.b64_json, format })), streamed: false, partials: 0 };
  }

  async function submit(event) {
    if (event) event.preventDefault();
    const body = params();
    if (!body.prompt) {
      status.textContent = "Write a prompt first.";
      document.getElementById("prompt").focus();
      return;
    }
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    status.className = "status";
    status.textContent = "Generating…";
    previewImages.replaceChildren();
    previews.hidden = true;
    const started = performance.now();
    try {
      const result = await run(body);
      const seconds = (performance.now() - started) / 1000;
      const created = Date.now();
      const saves = [];
      for (let i = result.images.length - 1; i >= 0; i--) {
        const image = result.images[i];
        const record = {
          session,
          created,
          index: i,
          params: body.seed !== undefined ? { ...body, seed: body.seed + i } : body,
          format: image.format,
          image: blobOf(image.b64, image.format),
          seconds,
          streamed: result.streamed,
          partials: result.partials,
        };
        show(record, true);
        saves.push(saveResult(record).catch((e) => console.warn("gallery not saved:", e)));
      }
      status.textContent =
        result.images.length + (result.images.length === 1 ? " image" : " images") + " in " + seconds.toFixed(1) + " s" +
        (result.streamed ? " (" + result.partials + " previews)" : "");
      status.dataset.done = String(created);
      previews.hidden = !result.streamed;
      await Promise.all(saves);
      status.dataset.saved = String(created); // in this tab's gallery: a reload shows it
    } catch (error) {
      status.className = "status error";
      status.textContent = "Failed: " + error.message;
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  }

  // Enter in a text box submits (Shift+Enter: a new line).
  for (const area of form.querySelectorAll("textarea")) {
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }
  form.addEventListener("submit", submit);
  document.getElementById("clear").addEventListener("click", async () => {
    await clearResults();
    gallery.replaceChildren();
    empty.hidden = false;
  });

  async function loadModel() {
    const response = await imagefleet.api("/v1/models");
    if (!response.ok) {
      status.textContent = "No model yet: " + (await imagefleet.errorOf(response));
      return;
    }
    const entry = (await response.json()).data[0];
    if (!entry) return;

    document.getElementById("model").textContent = entry.id + (entry.random_weights ? " (random weights)" : "");
    if (entry.default_size) document.getElementById("size").placeholder = entry.default_size;
    if (entry.default_steps) document.getElementById("steps").placeholder = String(entry.default_steps);
    if (entry.default_guidance_scale !== undefined && entry.default_guidance_scale !== null) {
      document.getElementById("guidance").placeholder = String(entry.default_guidance_scale);
    }
  }

  sessionResults()
    .then((records) => {
      records.sort((a, b) => a.created - b.created || b.index - a.index);
      for (const record of records) show(record, true);
    })
    .catch((e) => console.warn("gallery not loaded:", e));
  loadModel().catch((e) => {
    status.textContent = "Cannot reach the server: " + e.message;
  });
  document.getElementById("prompt").focus();
})();
