/* edgeship fleet dashboard: reads edgeship/<fleet>/devices/+/{state,telemetry,events} and rollouts/+ from the
 * broker's WebSocket listener (MQTT.js) and draws them. It only reads: it publishes nothing.
 *
 * The fold mirrors packager/fleet/view.py: every message is untrusted (the broker is transport, a device may be
 * buggy or hostile), so a message that does not parse, names another device than its topic or has an unknown
 * schema is skipped and counted; a figure that is missing or not a finite number of the right type is unknown
 * (null, shown as "?"), never 0. Device text only ever reaches the page through textContent.
 *
 * Drawing is batched: messages update the model and mark devices dirty; one requestAnimationFrame draws them.
 * How long a burst of telemetry takes to reach the screen is measured here and exposed as window.__edgeshipDrawMs.
 */
"use strict";
(function () {
  const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
  const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/;
  const MAX_PAYLOAD_BYTES = 256 * 1024;
  const MAX_TEXT = 200;
  const MAX_EVENT_KEYS = 100000;
  const TELEMETRY_SCHEMA = 1;
  const ERROR_RATE_ALARM = 0.05; // packager fleet's default --error-rate-alarm
  const SERIES_POINTS = 600; // per device: 10 minutes at 1 s, 100 minutes at the agent's default 10 s
  const EVENTS_PER_DEVICE = 500;
  const RECENT_EVENTS = 100;
  const BURST_GAP_MS = 100; // telemetry arriving closer together than this is one burst

  // ---- the fold (packager/fleet/view.py) -------------------------------------------------------------------
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const int = (v) => (Number.isSafeInteger(v) && v >= 0 ? v : null);
  const bool = (v) => (typeof v === "boolean" ? v : null);
  const text = (v) =>
    typeof v === "string" && v.length > 0 && v.length <= MAX_TEXT && !CONTROL_RE.test(v) ? v : null;
  function bundle(v) {
    if (v === null || typeof v !== "object" || Array.isArray(v)) return null;
    const name = text(v.name), version = int(v.version);
    return name === null && version === null ? null : [name, version];
  }

  function newRow(id) {
    return {
      device_id: id, online: null, group: null, name: null, version: null, state: null, last_seen: null,
      latency_ms_p95: null, error_rate: null, parity: null, accuracy: null, drift_psi: null, drift_status: null,
      cpu_percent: null, rss_bytes: null, temp_celsius: null, agent_version: null, candidate_version: null,
      queue_messages: null, telemetry_seq: null, telemetry_messages: 0, state_at: null, telemetry_ts: null,
    };
  }

  function alarms(row) {
    const out = [];
    if (row.online === false) out.push("offline");
    if (row.drift_status === "alarm") out.push("drift");
    if (row.parity === false) out.push("parity");
    if (row.error_rate !== null && row.error_rate > ERROR_RATE_ALARM) out.push("errors");
    return out;
  }

  const SERIES = [
    // [chart title, [[field, label, scale]]]
    ["Latency (ms)", [["latency_ms_p50", "p50", 1], ["latency_ms_p95", "p95", 1], ["latency_ms_p99", "p99", 1]]],
    ["CPU (%)", [["cpu_percent", "system", 1], ["agent_cpu_percent", "agent", 1]]],
    ["Memory (MiB)", [["rss_bytes", "agent RSS", 1 / 1048576], ["mem_available_bytes", "available", 1 / 1048576]]],
    ["Temperature (°C)", [["temp_celsius", "SoC", 1]]],
    ["Drift (PSI)", [["drift_psi", "PSI", 1]]],
    ["Requests", [["throughput_rps", "req/s", 1], ["error_rate", "error rate", 1]]],
  ];
  const SERIES_FIELDS = SERIES.flatMap(([, fields]) => fields);

  class Fleet {
    constructor(prefix) {
      this.prefix = prefix;
      this.rows = new Map();
      this.series = new Map(); // device -> {t: [], field: []...}
      this.events = new Map(); // device -> [event, ...] newest last
      this.recent = []; // [device, event]
      this.eventKeys = new Map();
      this.rollouts = new Map();
      this.skipped = new Map();
      this.dirty = new Set();
      this.structure = true; // rows added or removed, versions or rollouts changed
    }

    skip(reason) { this.skipped.set(reason, (this.skipped.get(reason) || 0) + 1); }

    row(id) {
      let r = this.rows.get(id);
      if (r === undefined) {
        r = newRow(id);
        this.rows.set(id, r);
        this.structure = true;
      }
      return r;
    }

    /* One message in; returns "telemetry", "state", "events", "rollout" or null when skipped. */
    feed(topic, payload) {
      if (!topic.startsWith(this.prefix)) { this.skip("unexpected_topic"); return null; }
      const parts = topic.slice(this.prefix.length).split("/");
      if (parts.length === 2 && parts[0] === "rollouts") return this.rollout(parts[1], payload);
      if (parts.length !== 3 || parts[0] !== "devices" || !["state", "telemetry", "events"].includes(parts[2])) {
        this.skip("unexpected_topic"); return null;
      }
      const id = parts[1], leaf = parts[2];
      if (!ID_RE.test(id)) { this.skip("bad_device_id"); return null; }
      if (leaf === "state" && payload.length === 0) { this.cleared(id); return "state"; }
      const doc = this.parse(payload);
      if (doc === null) return null;
      if (doc.device !== undefined && doc.device !== null && doc.device !== id) {
        this.skip("device_mismatch"); return null;
      }
      if (leaf === "state") return this.state(id, doc);
      if (leaf === "telemetry") return this.telemetry(id, doc);
      return this.event(id, doc);
    }

    parse(payload) {
      if (payload.length > MAX_PAYLOAD_BYTES) { this.skip("too_large"); return null; }
      let doc;
      try {
        doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(payload));
      } catch (e) {
        this.skip("not_json"); return null;
      }
      if (doc === null || typeof doc !== "object" || Array.isArray(doc)) { this.skip("not_an_object"); return null; }
      return doc;
    }

    cleared(id) {
      const r = this.rows.get(id);
      if (r === undefined) return;
      if (r.telemetry_messages === 0) { this.rows.delete(id); this.structure = true; }
      else { r.online = null; this.dirty.add(id); }
    }

    state(id, doc) {
      if (doc.status !== "online" && doc.status !== "offline") { this.skip("bad_status"); return null; }
      const at = num(doc.at);
      const r = this.row(id);
      if (at !== null && r.state_at !== null && at < r.state_at) return "state"; // an older state, redelivered
      const before = `${r.name}/${r.version}`;
      r.online = doc.status === "online";
      r.state_at = at;
      // The last will carries only status and device: what else we knew is no longer vouched for.
      r.group = typeof doc.group === "string" && ID_RE.test(doc.group) ? doc.group : null;
      r.state = text(doc.state);
      r.agent_version = text(doc.agent_version);
      const serving = bundle(doc.serving) || bundle(doc.bundle);
      if (serving !== null) [r.name, r.version] = serving;
      else if ("bundle" in doc || "serving" in doc) { r.name = null; r.version = null; }
      const cand = bundle(doc.candidate);
      r.candidate_version = cand ? cand[1] : null;
      this.seen(r, at);
      if (`${r.name}/${r.version}` !== before) this.structure = true;
      this.dirty.add(id);
      return "state";
    }

    telemetry(id, doc) {
      if (doc.schema !== TELEMETRY_SCHEMA) { this.skip("unknown_schema"); return null; }
      const seq = int(doc.seq);
      const r = this.row(id);
      r.telemetry_messages += 1;
      if (seq !== null) {
        if (r.telemetry_seq !== null && seq < r.telemetry_seq) return "telemetry"; // flushed late: not the newest
        r.telemetry_seq = seq;
      }
      const ts = num(doc.ts);
      r.telemetry_ts = ts;
      if (r.name === null && r.version === null && r.state_at === null) {
        r.name = text(doc.name); r.version = int(doc.version); this.structure = true;
      }
      r.latency_ms_p95 = num(doc.latency_ms_p95);
      r.error_rate = num(doc.error_rate);
      r.parity = bool(doc.parity_ok);
      r.accuracy = num(doc.accuracy);
      r.drift_psi = num(doc.drift_psi);
      r.drift_status = text(doc.drift_status);
      r.cpu_percent = num(doc.cpu_percent);
      r.rss_bytes = int(doc.rss_bytes);
      r.temp_celsius = num(doc.temp_celsius);
      r.queue_messages = int(doc.queue_messages);
      this.seen(r, ts);
      this.point(id, ts !== null ? ts : Date.now() / 1000, doc);
      this.dirty.add(id);
      return "telemetry";
    }

    point(id, t, doc) {
      let s = this.series.get(id);
      if (s === undefined) {
        s = { t: [] };
        for (const [field] of SERIES_FIELDS) s[field] = [];
        this.series.set(id, s);
      }
      if (s.t.length && t <= s.t[s.t.length - 1]) return; // uPlot needs increasing x
      s.t.push(t);
      for (const [field, , scale] of SERIES_FIELDS) {
        const v = num(doc[field]);
        s[field].push(v === null ? null : v * scale);
      }
      if (s.t.length > SERIES_POINTS + 60) { // drop in chunks: cheaper than a shift per point
        for (const k of Object.keys(s)) s[k].splice(0, s[k].length - SERIES_POINTS);
      }
    }

    static eventKey(id, e) {
      const seq = int(e.seq);
      if (seq !== null) return `${id}\u0000seq\u0000${seq}`;
      return `${id}\u0000at\u0000${JSON.stringify([e.at, e.from, e.to, e.event])}`;
    }

    event(id, doc) {
      if (typeof doc.event !== "string" || typeof doc.to !== "string") { this.skip("not_an_event"); return null; }
      const key = Fleet.eventKey(id, doc);
      if (this.eventKeys.has(key)) return null; // at-least-once delivery: a repeat
      this.eventKeys.set(key, true);
      if (this.eventKeys.size > MAX_EVENT_KEYS) this.eventKeys.delete(this.eventKeys.keys().next().value);
      let list = this.events.get(id);
      if (list === undefined) { list = []; this.events.set(id, list); }
      list.push(doc);
      if (list.length > EVENTS_PER_DEVICE) list.shift();
      this.recent.push([id, doc]);
      if (this.recent.length > RECENT_EVENTS) this.recent.shift();
      this.eventsDirty = true;
      this.dirty.add(id);
      return "events";
    }

    rollout(group, payload) {
      if (!ID_RE.test(group)) { this.skip("bad_group"); return null; }
      if (payload.length === 0) this.rollouts.delete(group);
      else {
        const doc = this.parse(payload);
        if (doc === null) return null;
        this.rollouts.set(group, doc);
      }
      this.structure = true;
      return "rollout";
    }

    seen(r, at) {
      if (at !== null && (r.last_seen === null || at > r.last_seen)) r.last_seen = at;
    }
  }

  // ---- formatting ------------------------------------------------------------------------------------------
  const fixed = (v, d) => (v === null ? "?" : v.toFixed(d));
  const clock = (ts) => (ts === null ? "?" : new Date(ts * 1000).toLocaleTimeString());
  const version = (r) => (r.version === null ? "?" : `${r.name || "?"} v${r.version}`);

  const COLUMNS = [
    ["device_id", (r) => r.device_id, null],
    ["online", (r) => (r.online === null ? "?" : r.online ? "online" : "OFFLINE"), null],
    ["group", (r) => r.group ?? "?", null],
    ["version", (r) => version(r) + (r.candidate_version !== null ? ` → v${r.candidate_version}` : ""), null],
    ["state", (r) => r.state ?? "?", null],
    ["last_seen", (r) => clock(r.last_seen), null],
    ["latency_ms_p95", (r) => fixed(r.latency_ms_p95, 1), null],
    ["error_rate", (r) => fixed(r.error_rate, 3), (r, a) => a.includes("errors")],
    ["cpu_percent", (r) => fixed(r.cpu_percent, 0), null],
    ["rss_bytes", (r) => (r.rss_bytes === null ? "?" : (r.rss_bytes / 1048576).toFixed(1)), null],
    ["temp_celsius", (r) => fixed(r.temp_celsius, 1), null],
    ["parity", (r) => (r.parity === null ? "?" : r.parity ? "ok" : "FAILED"), (r, a) => a.includes("parity")],
    ["accuracy", (r) => fixed(r.accuracy, 3), null],
    ["drift_psi", (r) => (r.drift_psi === null ? r.drift_status ?? "?" : `${r.drift_psi.toFixed(3)} ${r.drift_status ?? ""}`),
      (r, a) => a.includes("drift")],
    ["alarms", (r, a) => a.join(" "), (r, a) => a.length > 0],
  ];
  const NUMERIC = new Set(["latency_ms_p95", "error_rate", "cpu_percent", "rss_bytes", "temp_celsius", "accuracy",
    "drift_psi", "last_seen"]);

  function sortValue(r, key) {
    if (key === "version") return r.version;
    if (key === "alarms") return alarms(r).length;
    if (key === "online") return r.online === null ? null : r.online ? 1 : 0;
    if (key === "parity") return r.parity === null ? null : r.parity ? 1 : 0;
    return r[key];
  }

  // ---- the page ----------------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, txt) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (txt !== undefined) e.textContent = txt;
    return e;
  };

  let fleet = null;
  let client = null;
  let config = { broker_ws: "", fleet: "default" };
  const domRows = new Map(); // device -> {tr, cells: Map(key -> td)}
  let order = [];
  let sortKey = "device_id", sortDir = 1;
  let filterText = "", alarmsOnly = false;
  let view = { device: null, charts: [] };

  // draw timing: a burst starts with telemetry after a quiet gap, and is drawn once a frame leaves nothing pending
  const perf = { burstStart: null, lastArrival: 0, pending: 0, burstMessages: 0, burstMs: null, maxBurstMs: null,
    maxFrameMs: 0, frames: 0, telemetry: 0 };
  window.__edgeshipDrawMs = null;
  window.__edgeshipDrawStats = () => Object.assign({}, perf);
  window.__edgeshipResetDrawStats = () => {
    Object.assign(perf, { burstStart: null, burstMessages: 0, burstMs: null, maxBurstMs: null, maxFrameMs: 0,
      frames: 0, telemetry: 0 });
    window.__edgeshipDrawMs = null;
  };
  window.__edgeshipFleet = () => fleet; // for tests and the curious: the folded model

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    // a hidden tab gets no animation frames: keep the model current and draw slowly
    if (document.hidden) setTimeout(draw, 250);
    else requestAnimationFrame(draw);
  }

  function onMessage(topic, payload) {
    const kind = fleet.feed(topic, payload);
    if (kind === "telemetry") {
      const now = performance.now();
      if (perf.burstStart === null || now - perf.lastArrival > BURST_GAP_MS) {
        perf.burstStart = now; perf.burstMessages = 0;
      }
      perf.lastArrival = now;
      perf.pending += 1;
      perf.burstMessages += 1;
      perf.telemetry += 1;
    }
    if (kind !== null) schedule();
  }

  function draw() {
    scheduled = false;
    const t0 = performance.now();
    drawFleet();
    if (view.device !== null) drawDevice();
    void $("rows").offsetHeight; // the layout the new rows need happens now, inside the measured time
    const end = performance.now();
    perf.frames += 1;
    perf.maxFrameMs = Math.max(perf.maxFrameMs, end - t0);
    if (perf.pending > 0 && perf.burstStart !== null) {
      perf.pending = 0;
      perf.burstMs = end - perf.burstStart;
      perf.maxBurstMs = Math.max(perf.maxBurstMs ?? 0, perf.burstMs);
      window.__edgeshipDrawMs = perf.burstMs;
      $("draw-figure").textContent =
        `last telemetry burst (${perf.burstMessages} messages) drawn in ${perf.burstMs.toFixed(0)} ms`;
    }
  }

  function rowFor(id) {
    let d = domRows.get(id);
    if (d !== undefined) return d;
    const tr = el("tr");
    tr.dataset.device = id;
    const cells = new Map();
    for (const [key] of COLUMNS) {
      const td = el("td", NUMERIC.has(key) && key !== "last_seen" ? "num" : "");
      td.dataset.key = key;
      tr.appendChild(td);
      cells.set(key, td);
    }
    tr.addEventListener("click", () => { location.hash = `#/device/${encodeURIComponent(id)}`; });
    d = { tr, cells, search: "" };
    domRows.set(id, d);
    return d;
  }

  function fillRow(d, r) {
    const a = alarms(r);
    for (const [key, show, bad] of COLUMNS) {
      const td = d.cells.get(key);
      const value = show(r, a);
      if (td.textContent !== value) td.textContent = value;
      const cls = ((NUMERIC.has(key) && key !== "last_seen" ? "num " : "") +
        (bad && bad(r, a) ? "bad" : value === "?" ? "unknown" : "")).trim();
      if (td.className !== cls) td.className = cls;
    }
    // attributes only when they change: each write makes the browser recheck the row's styles
    const online = r.online === null ? "unknown" : String(r.online), alarmText = a.join(" ");
    if (d.tr.dataset.online !== online) {
      d.tr.dataset.online = online;
      d.tr.classList.toggle("offline", r.online === false);
    }
    if (d.tr.dataset.alarms !== alarmText) {
      d.tr.dataset.alarms = alarmText;
      d.tr.classList.toggle("alarm", a.length > 0);
    }
    d.search = [r.device_id, r.group, r.name, r.version === null ? null : `v${r.version}`, r.state,
      r.online === false ? "offline" : "online", ...a].filter((x) => x !== null).join(" ").toLowerCase();
    d.alarmed = a.length > 0;
  }

  function drawFleet() {
    const dirty = fleet.dirty;
    fleet.dirty = new Set();
    for (const id of dirty) {
      const r = fleet.rows.get(id);
      if (r !== undefined) fillRow(rowFor(id), r);
    }
    for (const id of [...domRows.keys()]) if (!fleet.rows.has(id)) domRows.delete(id);
    if (dirty.size === 0 && !fleet.structure && !fleet.eventsDirty) return;
    // order: filter, then sort (unknown last whichever way)
    const words = filterText.toLowerCase().split(/\s+/).filter(Boolean);
    const ids = [];
    for (const [id, d] of domRows) {
      if (alarmsOnly && !d.alarmed) continue;
      if (words.every((w) => d.search.includes(w))) ids.push(id);
    }
    ids.sort((x, y) => {
      const a = sortValue(fleet.rows.get(x), sortKey), b = sortValue(fleet.rows.get(y), sortKey);
      if (a === b) return x < y ? -1 : x > y ? 1 : 0;
      if (a === null || a === undefined) return 1;
      if (b === null || b === undefined) return -1;
      return (a < b ? -1 : 1) * sortDir;
    });
    if (ids.length !== order.length || ids.some((id, i) => id !== order[i])) {
      $("rows").replaceChildren(...ids.map((id) => domRows.get(id).tr));
      order = ids;
    }
    drawSummary();
    if (fleet.eventsDirty) drawRecentEvents();
    fleet.structure = false;
    fleet.eventsDirty = false;
  }

  function drawSummary() {
    let online = 0, offline = 0, alarmed = 0;
    const versions = new Map();
    for (const r of fleet.rows.values()) {
      if (r.online === true) online += 1;
      if (r.online === false) offline += 1;
      if (alarms(r).some((a) => a !== "offline")) alarmed += 1;
      const key = version(r);
      const v = versions.get(key) || { name: r.name, version: r.version, devices: 0, offline: 0 };
      v.devices += 1;
      if (r.online === false) v.offline += 1;
      versions.set(key, v);
    }
    const counts = $("counts");
    counts.replaceChildren(
      el("span", "", `${fleet.rows.size} devices`), el("span", "", `${online} online`),
      el("span", offline ? "bad" : "", `${offline} offline`), el("span", alarmed ? "bad" : "", `${alarmed} with alarms`));
    const list = [...versions.entries()].sort((a, b) => (a[1].version ?? -1) - (b[1].version ?? -1));
    $("versions").replaceChildren(...list.map(([key, v]) => {
      const li = el("li", "", `${key}: ${v.devices} device${v.devices === 1 ? "" : "s"}` +
        (v.offline ? ` (${v.offline} offline)` : ""));
      li.dataset.version = v.version === null ? "unknown" : String(v.version);
      li.dataset.devices = String(v.devices);
      return li;
    }));
    const skipped = [...fleet.skipped.entries()].map(([k, n]) => `${k}: ${n}`).join(", ");
    $("skipped").textContent = skipped ? `skipped malformed messages (${skipped})` : "";
    drawRollouts();
  }

  function scalar(v) {
    if (v === null || v === undefined) return "?";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function drawRollouts() {
    const box = $("rollouts-box");
    box.hidden = fleet.rollouts.size === 0;
    const out = [];
    for (const [group, doc] of [...fleet.rollouts.entries()].sort()) {
      const div = el("div", "rollout");
      div.dataset.group = group;
      const head = Object.entries(doc).filter(([k, v]) => k !== "waves" && (v === null || typeof v !== "object"))
        .map(([k, v]) => `${k}: ${scalar(v)}`).join(" · ");
      div.appendChild(el("div", "", `group ${group}` + (head ? ` · ${head}` : "")));
      if (Array.isArray(doc.waves) && doc.waves.length) {
        const keys = [...new Set(doc.waves.flatMap((w) => (w && typeof w === "object" ? Object.keys(w) : [])))];
        const t = el("table");
        const hr = el("tr");
        hr.appendChild(el("th", "", "wave"));
        for (const k of keys) hr.appendChild(el("th", "", k));
        t.appendChild(hr);
        doc.waves.forEach((w, i) => {
          const tr = el("tr");
          tr.appendChild(el("td", "", String(i + 1)));
          for (const k of keys) tr.appendChild(el("td", "", scalar(w && typeof w === "object" ? w[k] : null)));
          t.appendChild(tr);
        });
        div.appendChild(t);
      }
      out.push(div);
    }
    $("rollouts").replaceChildren(...out);
  }

  function eventLine(id, e) {
    const b = bundle(e.bundle);
    const at = num(e.at);
    const parts = [at === null ? "?" : new Date(at * 1000).toISOString().replace("T", " ").slice(0, 23), id,
      `${text(e.from) ?? "?"} -> ${text(e.to) ?? "?"}`, text(e.event) ?? "?"];
    if (b !== null) parts.push(`${b[0] ?? "?"} v${b[1] ?? "?"}`);
    const reason = text(e.reason);
    if (reason) parts.push(`(${reason})`);
    const li = el("li", e.to === "rollback" ? "failed" : "", parts.join(" ")); // a reason alone is no failure (no_update)
    li.dataset.from = text(e.from) ?? "";
    li.dataset.to = text(e.to) ?? "";
    li.dataset.version = b !== null && b[1] !== null ? String(b[1]) : "";
    return li;
  }

  function drawRecentEvents() {
    $("recent-events").replaceChildren(...fleet.recent.slice(-50).reverse().map(([id, e]) => eventLine(id, e)));
  }

  // ---- the device page -------------------------------------------------------------------------------------
  function openDevice(id) {
    closeDevice();
    view.device = id;
    $("fleet-view").hidden = true;
    $("device-view").hidden = false;
    $("device-title").textContent = id;
    const box = $("charts");
    box.replaceChildren();
    for (const [title, fields] of SERIES) {
      const div = el("div", "chart");
      div.appendChild(el("h3", "", title));
      box.appendChild(div);
      const opts = {
        width: 440, height: 180,
        scales: { x: { time: true } },
        series: [{}, ...fields.map(([, label], i) => ({ label, stroke: ["#2f6fde", "#d9822b", "#b3261e"][i],
          spanGaps: false }))],
        axes: [{}, { size: 55 }],
      };
      view.charts.push({ plot: new uPlot(opts, chartData(id, fields), div), fields });
    }
    drawDevice();
  }

  function chartData(id, fields) {
    const s = fleet.series.get(id);
    if (s === undefined) return [[], ...fields.map(() => [])];
    return [s.t, ...fields.map(([f]) => s[f])];
  }

  function closeDevice() {
    for (const c of view.charts) c.plot.destroy();
    view.charts = [];
    view.device = null;
    $("device-view").hidden = true;
    $("fleet-view").hidden = false;
  }

  function drawDevice() {
    const id = view.device;
    const r = fleet.rows.get(id);
    const facts = r === undefined ? [] : [
      ["online", r.online === null ? "?" : r.online ? "online" : "OFFLINE"], ["group", r.group ?? "?"],
      ["serving", version(r)], ["candidate", r.candidate_version === null ? "none" : `v${r.candidate_version}`],
      ["state", r.state ?? "?"], ["agent", r.agent_version ?? "?"], ["last seen", clock(r.last_seen)],
      ["telemetry seq", r.telemetry_seq === null ? "?" : String(r.telemetry_seq)],
      ["queued", r.queue_messages === null ? "?" : String(r.queue_messages)], ["alarms", alarms(r).join(" ") || "none"],
    ];
    $("device-facts").replaceChildren(...facts.flatMap(([k, v]) => {
      const dd = el("dd", "", v);
      dd.dataset.key = k;
      return [el("dt", "", k), dd];
    }));
    for (const c of view.charts) c.plot.setData(chartData(id, c.fields));
    const events = fleet.events.get(id) || [];
    $("timeline").replaceChildren(...events.slice().reverse().map((e) => eventLine(id, e)));
  }

  function route() {
    const m = /^#\/device\/(.+)$/.exec(location.hash);
    if (m) openDevice(decodeURIComponent(m[1]));
    else closeDevice();
    fleet.structure = true;
    schedule();
  }

  // ---- controls ----------------------------------------------------------------------------------------------
  function wireControls() {
    for (const th of document.querySelectorAll("#fleet-table th")) {
      th.addEventListener("click", () => {
        const key = th.dataset.key;
        sortDir = key === sortKey ? -sortDir : 1;
        sortKey = key;
        for (const h of document.querySelectorAll("#fleet-table th")) h.classList.remove("sorted-asc", "sorted-desc");
        th.classList.add(sortDir === 1 ? "sorted-asc" : "sorted-desc");
        fleet.structure = true;
        schedule();
      });
    }
    $("filter").addEventListener("input", (e) => { filterText = e.target.value; fleet.structure = true; schedule(); });
    $("alarms-only").addEventListener("change", (e) => {
      alarmsOnly = e.target.checked; fleet.structure = true; schedule();
    });
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      connect($("broker-url").value.trim(), $("username").value, $("password").value);
    });
    window.addEventListener("hashchange", route);
  }

  // ---- MQTT ----------------------------------------------------------------------------------------------------
  function setConn(textValue, up) {
    const c = $("conn");
    c.textContent = textValue;
    c.className = up ? "conn-up" : "conn-down";
    c.dataset.state = up ? "connected" : "disconnected";
  }

  function connect(url, username, password) {
    if (client !== null) client.end(true);
    const opts = { clientId: `edgeship-dashboard-${Math.random().toString(16).slice(2, 10)}`, clean: true,
      protocolVersion: 4, reconnectPeriod: 2000, connectTimeout: 10000, resubscribe: true };
    if (username) { opts.username = username; opts.password = password; } // in memory only, to the broker only
    setConn(`connecting to ${url}`, false);
    client = mqtt.connect(url, opts);
    const p = fleet.prefix;
    client.on("connect", () => {
      setConn(`connected to ${url}`, true);
      // state and events at QoS 1 (each one matters); telemetry at QoS 0: the next message supersedes it
      client.subscribe({ [`${p}devices/+/state`]: { qos: 1 }, [`${p}devices/+/events`]: { qos: 1 },
        [`${p}devices/+/telemetry`]: { qos: 0 }, [`${p}rollouts/+`]: { qos: 1 } }, (err, granted) => {
        const refused = (granted || []).filter((g) => g.qos === 128).map((g) => g.topic);
        if (err) setConn(`subscribe failed: ${err.message}`, false);
        else if (refused.length) setConn(`connected; the broker refused ${refused.join(", ")}`, true);
      });
    });
    client.on("message", onMessage);
    client.on("reconnect", () => setConn(`reconnecting to ${url}`, false));
    client.on("offline", () => setConn(`offline: ${url}`, false));
    client.on("error", (err) => setConn(`broker: ${err.message}`, false));
  }

  async function start() {
    try {
      const r = await fetch("config.json", { cache: "no-store" });
      if (r.ok) config = await r.json();
    } catch (e) { /* a copy of the page opened as a file: the form still works */ }
    const params = new URLSearchParams(location.search);
    // a fleet is one topic level: anything else (a wildcard, a slash) would read other fleets' topics
    const asked = params.get("fleet");
    const fleetName = asked !== null && ID_RE.test(asked) ? asked : config.fleet;
    fleet = new Fleet(`edgeship/${fleetName}/`);
    $("fleet-name").textContent = `fleet ${fleetName}`;
    document.title = `edgeship fleet ${fleetName}`;
    $("broker-url").value = config.broker_ws;
    wireControls();
    route();
    if (config.broker_ws) connect(config.broker_ws, "", "");
    else setConn("type the broker's ws:// URL and connect", false);
  }

  window.__edgeshipFold = { Fleet, alarms }; // the fold, for tests
  document.addEventListener("DOMContentLoaded", start);
})();
