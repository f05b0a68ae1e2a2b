// The fleet page: GET /v1/fleet every second, one table row per pod.
"use strict";

(() => {
  const POLL_MS = 1000;
  const RATE_WINDOW_MS = 60000;
  const tbody = document.querySelector("#pods tbody");
  const summary = document.getElementById("summary");
  const updated = document.getElementById("updated");
  const errorBox = document.getElementById("error");
  const generator = document.getElementById("generator");
  const history = new Map(); // pod name -> [[time ms, completed images], ...] over RATE_WINDOW_MS

  // Images per minute of one pod, from the completed-images counter seen over the last minute.
  function perMinute(name, completed, now) {
    const seen = history.get(name) || [];
    seen.push([now, completed]);
    while (seen.length > 2 && now - seen[0][0] > RATE_WINDOW_MS) seen.shift();
    history.set(name, seen);
    const [t0, c0] = seen[0];
    if (completed < c0) {
      history.set(name, [[now, completed]]); // the pod restarted: its counter began again
      return 0;
    }
    return now > t0 ? ((completed - c0) * 60000) / (now - t0) : 0;
  }

  function cell(row, value, className) {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function render(fleet) {
    const now = Date.now();
    const rows = fleet.pods.map((pod) => {
      const row = document.createElement("tr");
      row.dataset.pod = pod.name;
      row.dataset.state = pod.state;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = pod.name;
      th.title = pod.url;
      row.appendChild(th);
      const state = cell(row, pod.state, "state state-" + pod.state);
      if (pod.consecutive_failures) state.title = pod.consecutive_failures + " consecutive failures";
      cell(row, String(pod.queued_images), "num queued-images");
      cell(row, pod.queued_seconds.toFixed(1), "num queued-seconds");
      cell(row, pod.running_images + (pod.max_batch_size ? " / " + pod.max_batch_size : ""), "num running");
      cell(row, perMinute(pod.name, pod.completed_images, now).toFixed(1), "num per-minute");
      const errors = cell(row, String(pod.errors), "num errors");
      errors.title = Object.entries(pod.outcomes).map(([k, v]) => k + ": " + v).join(", ");
      cell(row, String(pod.picks), "num picks");
      cell(row, pod.expected_wait_seconds.toFixed(1), "num wait");
      return row;
    });
    tbody.replaceChildren(...rows);
    for (const name of [...history.keys()]) {
      if (!fleet.pods.some((p) => p.name === name)) history.delete(name);
    }
    const t = fleet.totals;
    const items = [
      ["Pods", t.pods],
      ["Ready", t.ready],
      ["Loading", t.loading],
      ["Draining", t.draining],
      ["Quarantined", t.quarantined],
      ["Unreachable", t.unreachable],
      ["Queued images", t.queued_images],
      ["Queued GPU-s", t.queued_seconds.toFixed(1)],
      ["Running", t.running_images],
      ["Images done", t.completed_images],
      ["Retries", t.retries],
      ["Model", fleet.models.join(", ") || "unknown"],
      ["Pick", fleet.pick],
      ["Discovery", fleet.discovery],
    ];
    summary.replaceChildren();
    for (const [label, value] of items) {
      const group = document.createElement("div");
      imagefleet.text(group, "dt", label);
      imagefleet.text(group, "dd", String(value));
      summary.appendChild(group);
    }
    if (fleet.generator) {
      const g = fleet.generator;
      generator.hidden = false;
      const conditions = (g.conditions || []).map(
        (c) => c.type + "=" + c.status + (c.reason ? " (" + c.reason + ")" : ""),
      );
      generator.textContent =
        "ImageGenerator " + (g.name || "?") + " in " + g.namespace + ". " +
        (g.conditions ? "Conditions: " + (conditions.join(", ") || "none yet") + "." : g.note);
    }
    updated.textContent = "Updated " + new Date(fleet.created * 1000).toLocaleTimeString();
  }

  // One poll costs the router about 0.05 ms of CPU per pod: with many pods the page waits longer, so
  // that it never takes more than a tenth of the router's time (docs/web.md).
  async function poll() {
    const started = performance.now();
    try {
      const response = await imagefleet.api("/v1/fleet");
      if (!response.ok) throw new Error(await imagefleet.errorOf(response));
      render(await response.json());
      errorBox.hidden = true;
    } catch (error) {
      errorBox.hidden = false;
      errorBox.textContent = "Cannot read /v1/fleet: " + error.message;
    } finally {
      setTimeout(poll, Math.max(POLL_MS, 10 * (performance.now() - started)));
    }
  }

  poll();
})();
