// Shared by the pages: the API key (asked for once when the server answers 401, kept in this
// tab's sessionStorage, sent as a Bearer token) and fetch() of the public API with it.
"use strict";

const KEY_ITEM = "imagefleet.apiKey";
const PROGRESS = "imagefleet.progress"; // imagefleet/sse.py's progress comments

const imagefleet = {
  key() {
    return sessionStorage.getItem(KEY_ITEM) || "";
  },

  // Resolves once the user submitted a key in the page's #key-form.
  askForKey(message) {
    const form = document.getElementById("key-form");
    const input = document.getElementById("api-key");
    const help = document.getElementById("key-help");
    if (message) help.textContent = message;
    form.hidden = false;
    input.value = "";
    input.focus();
    return new Promise((resolve) => {
      form.addEventListener(
        "submit",
        (event) => {
          event.preventDefault();
          sessionStorage.setItem(KEY_ITEM, input.value.trim());
          form.hidden = true;
          resolve();
        },
        { once: true },
      );
    });
  },

  // fetch(path) with the key; on 401 asks for a key (once per refusal) and tries again.
  async api(path, options = {}) {
    let pending = null;
    for (;;) {
      const headers = new Headers(options.headers || {});
      const key = imagefleet.key();
      if (key) headers.set("Authorization", "Bearer " + key);
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      const error = await imagefleet.errorOf(response);
      if (!pending) {
        pending = imagefleet.askForKey(
          key ? "That key was refused (" + error + "). Enter another." : "This server asks for an API key. It is kept in this browser tab only (sessionStorage) and sent as a Bearer token.",
        );
      }
      await pending;
      pending = null;
    }
  },

  // Yields the events of a text/event-stream answer as {event, data}, data parsed as JSON
  // (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream).
  // imagefleet's progress comments (": imagefleet.progress {...}": the queue position, then the
  // steps done) come out as {event: "imagefleet.progress", data}; other comments are skipped.
  async *events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) {
        let event = "message";
        const data = [];
        for (const line of block.split(/\r\n|\n|\r/)) {
          if (line.startsWith(": " + PROGRESS + " ")) {
            yield { event: PROGRESS, data: JSON.parse(line.slice(PROGRESS.length + 3)) };
            continue;
          }
          if (line.startsWith(":")) continue; // a comment (keep-alive)
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
        if (!data.length || data.join("\n") === "[DONE]") continue;
        yield { event, data: JSON.parse(data.join("\n")) };
      }
      if (done) return;
    }
  },

  // The message of an OpenAI error envelope, or the HTTP status.
  async errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // not JSON
    }
    return "HTTP " + response.status;
  },

  text(parent, tag, content, className) {
    const node = document.createElement(tag);
    node.textContent = content;
    if (className) node.className = className;
    parent.appendChild(node);
    return node;
  },
};
