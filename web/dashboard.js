// Atlas Voice admin dashboard: fetches /api/dashboard and draws tiles, SVG charts and a table.
// Self-contained (no libraries). Every number carries a data-testid and its raw value in
// data-value; every chart point or bar carries data-value (and data-bucket / data-label).
"use strict";

(() => {
  const TOKEN_KEY = "atlasAdminToken";
  const RANGES = ["1h", "24h", "7d", "30d", "all"];
  const STAGES = [
    ["voice_to_voice", "Voice-to-voice"],
    ["stt", "STT (speech end → transcript)"],
    ["llm_ttfb", "LLM first token"],
    ["tts_ttfa", "TTS first audio"],
  ];
  const REFRESH_MS = 60000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  const state = { state: "loading", status: null, error: null, data: null, range: "24h", refresh: () => load() };
  window.atlasDashboard = state;

  // --- token: ?token= once, then sessionStorage; sent as a Bearer header --------------------------
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || sessionStorage.getItem(TOKEN_KEY) || "";
  if (params.has("token")) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
  }
  const urlRange = params.get("range");
  if (RANGES.includes(urlRange)) state.range = urlRange;
  syncUrl();

  function syncUrl() {
    const p = new URLSearchParams(location.search);
    p.delete("token");
    p.set("range", state.range);
    history.replaceState(null, "", location.pathname + "?" + p.toString());
  }

  // --- formatting ------------------------------------------------------------------------------
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "–");
  const fmtMs = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") + " ms" : "–");
  const fmtUsd = (v) => (isNum(v) ? "$" + (Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(4)) : "–");
  const fmtPct = (v) => (isNum(v) ? (v * 100).toFixed(1) + "%" : "–");
  const fmtDec = (v) => (isNum(v) ? v.toFixed(1) : "–");
  const fmtDuration = (s) => {
    if (!isNum(s)) return "–";
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    return m + " min " + Math.round(s - m * 60) + " s";
  };
  const pad = (n) => String(n).padStart(2, "0");
  const fmtUtc = (iso) => {
    if (!iso) return "–";
    const d = new Date(iso);
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
      `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
  };
  const bucketLabel = (iso, bucket) => {
    const d = new Date(iso);
    const day = `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
    return bucket === "day" ? day : `${day} ${pad(d.getUTCHours())}:00`;
  };

  // --- messages ---------------------------------------------------------------------------------
  function showMessage(text, kind) {
    const el = $("message");
    el.textContent = text;
    el.className = "message" + (kind === "info" ? " info" : "");
    el.dataset.kind = kind || "error";
    el.hidden = !text;
  }

  function setState(name, extra) {
    Object.assign(state, { state: name }, extra || {});
    document.body.dataset.state = name;
  }

  function askForToken(text, kind) {
    showMessage(text, kind);
    $("token-form").hidden = false;
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token-input").value.trim();
    $("token-input").value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-form").hidden = true;
    load();
  });

  // --- range selector ---------------------------------------------------------------------------
  function markRange() {
    for (const b of document.querySelectorAll("#range button")) {
      b.setAttribute("aria-pressed", String(b.dataset.range === state.range));
    }
  }
  for (const b of document.querySelectorAll("#range button")) {
    b.addEventListener("click", () => {
      state.range = b.dataset.range;
      markRange();
      syncUrl();
      load();
    });
  }
  markRange();

  // --- loading ----------------------------------------------------------------------------------
  let seq = 0;
  async function load() {
    if (!token) {
      setState("auth-required", { status: null, error: "no token" });
      askForToken("Enter the admin token (ATLAS_ADMIN_TOKEN), or open this page as /dashboard?token=<token>.", "info");
      return;
    }
    const mine = ++seq;
    setState("loading");
    let resp, body;
    try {
      resp = await fetch("/api/dashboard?since=" + encodeURIComponent(state.range), {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
      });
      body = await resp.json().catch(() => null);
    } catch (e) {
      if (mine !== seq) return;
      setState("error", { status: 0, error: String(e) });
      showMessage("Could not reach the server: " + e.message + ". Retrying every minute.");
      return;
    }
    if (mine !== seq) return; // a newer request (another range) is under way
    const code = body && body.code ? body.code : "";
    const detail = body && body.message ? body.message : resp.statusText;
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      token = "";
      $("content").hidden = true;
      setState("auth-failed", { status: 401, error: code });
      askForToken("The admin token was rejected (401 " + (code || "ADMIN_AUTH_FAILED") + "). " +
        "Open this page as /dashboard?token=<ATLAS_ADMIN_TOKEN> or enter the token below.");
      return;
    }
    if (!resp.ok || !body) {
      const name = resp.status === 404 && code === "ADMIN_DISABLED" ? "disabled" : "error";
      setState(name, { status: resp.status, error: code || String(resp.status) });
      const what = resp.status === 503 ? "The session store could not be read" : "The dashboard API failed";
      showMessage(`${what} (${resp.status}${code ? " " + code : ""}): ${detail}`);
      return;
    }
    $("token-form").hidden = true;
    render(body);
    setState("ready", { status: 200, error: null, data: body });
  }

  // --- rendering --------------------------------------------------------------------------------
  function tile(id, value, text) {
    const el = $(id);
    el.textContent = text;
    el.dataset.value = isNum(value) ? String(value) : "";
  }

  function render(d) {
    const t = d.totals;
    $("content").hidden = false;
    if (t.sessions === 0 && t.turns === 0) {
      showMessage(d.since ? `No sessions since ${fmtUtc(d.since)} UTC.` : "No sessions recorded yet.", "info");
    } else {
      showMessage("");
    }
    $("updated").textContent = `updated ${fmtUtc(d.generated_at)} UTC · ${d.bucket === "day" ? "daily" : "hourly"} buckets · store: ${d.store || "?"}`;

    const v2v = d.stages.voice_to_voice;
    tile("tile-sessions", t.sessions, fmtInt(t.sessions));
    tile("tile-sessions-active", t.sessions_active, t.sessions_active ? `${fmtInt(t.sessions_active)} in progress` : "");
    tile("tile-turns", t.turns, fmtInt(t.turns));
    tile("tile-v2v-p50", v2v.p50, fmtMs(v2v.p50));
    tile("tile-v2v-p95", v2v.p95, fmtMs(v2v.p95));
    tile("tile-total-cost", t.total_cost_usd, fmtUsd(t.total_cost_usd));
    tile("tile-avg-cost", t.avg_cost_per_session_usd, fmtUsd(t.avg_cost_per_session_usd));
    tile("tile-error-rate", t.error_rate, fmtPct(t.error_rate));
    tile("tile-errors", t.errors, `${fmtInt(t.errors)} turns with an error`);
    tile("tile-interruptions", t.interruptions, fmtInt(t.interruptions));
    tile("tile-audio-minutes", t.audio_minutes, fmtDec(t.audio_minutes));
    tile("tile-satisfaction", t.satisfaction_rate, fmtPct(t.satisfaction_rate));
    tile("tile-ratings", t.ratings, `${fmtInt(t.ratings || 0)} ratings · target over 85%`);
    tile("tile-issues", t.issue_rate, fmtPct(t.issue_rate));
    $("tile-satisfaction").classList.toggle("bad", t.satisfaction_rate != null && t.satisfaction_rate < 0.85);
    $("tile-issues").classList.toggle("bad", t.issue_rate != null && t.issue_rate >= 0.05);
    renderComments(d.feedback_comments || []);
    renderVariants(d.variants || []);

    renderStages(d);
    renderLatencyCharts(d);

    const times = d.series.map((b) => b.start);
    barChart($("chart-sessions"), {
      labels: times.map((s) => bucketLabel(s, d.bucket)), keys: times, values: d.series.map((b) => b.sessions),
      format: fmtInt, integer: true, cls: "bar", keyAttr: "bucket",
    });
    scatterChart($("chart-session-cost"), d.session_costs);
    barChart($("chart-cost-day"), {
      labels: d.cost_per_day.map((x) => x.day.slice(5)), keys: d.cost_per_day.map((x) => x.day),
      values: d.cost_per_day.map((x) => x.cost_usd), format: fmtUsd, usd: true, cls: "bar cost", keyAttr: "day",
    });
    barChart($("chart-errors"), {
      labels: d.errors_by_code.map((x) => x.code), keys: d.errors_by_code.map((x) => x.code),
      values: d.errors_by_code.map((x) => x.count), format: fmtInt, integer: true, cls: "bar errors", keyAttr: "code",
      empty: "no errors",
    });
    renderRecent(d.recent_sessions);
  }

  function renderStages(d) {
    const body = $("stages-body");
    body.replaceChildren();
    for (const [stage, label] of STAGES) {
      const s = d.stages[stage];
      const tr = document.createElement("tr");
      tr.dataset.stage = stage;
      tr.append(cell(label), numCell(s.count, fmtInt(s.count), `stage-${stage}-count`),
        numCell(s.p50, fmtMs(s.p50), `stage-${stage}-p50`), numCell(s.p95, fmtMs(s.p95), `stage-${stage}-p95`));
      body.append(tr);
    }
  }

  function renderLatencyCharts(d) {
    const box = $("latency-charts");
    box.replaceChildren();
    const xs = d.series.map((b) => Date.parse(b.start));
    for (const [stage, label] of STAGES) {
      const fig = document.createElement("figure");
      const cap = document.createElement("figcaption");
      cap.textContent = label + " (ms)";
      const legend = document.createElement("div");
      legend.className = "legend stage-" + stage;
      for (const q of ["p50", "p95"]) {
        const span = document.createElement("span");
        span.className = q;
        span.append(document.createElement("i"), q);
        legend.append(span);
      }
      const svg = document.createElementNS(SVG_NS, "svg");
      svg.id = "chart-latency-" + stage;
      svg.setAttribute("data-testid", "chart-latency-" + stage);
      svg.dataset.chart = "latency";
      svg.dataset.stage = stage;
      fig.append(cap, legend, svg);
      box.append(fig);
      lineChart(svg, {
        xs, keys: d.series.map((b) => b.start), bucket: d.bucket, format: fmtMs, stage,
        series: ["p50", "p95"].map((q) => ({ name: q, values: d.series.map((b) => b[q][stage]) })),
      });
    }
  }

  function renderVariants(rows) {
    const body = $("variants-body");
    body.textContent = "";
    $("variants-section").hidden = rows.length === 0;
    for (const v of rows) {
      const tr = document.createElement("tr");
      tr.dataset.variant = v.variant;
      const cells = [
        ["variant", v.variant, v.variant],
        ["sessions", v.sessions, fmtInt(v.sessions)],
        ["v2v-p50", v.v2v_p50, fmtMs(v.v2v_p50)],
        ["v2v-p95", v.v2v_p95, fmtMs(v.v2v_p95)],
        ["error-rate", v.error_rate, fmtPct(v.error_rate)],
        ["cost", v.avg_cost_per_session_usd, fmtUsd(v.avg_cost_per_session_usd)],
        ["satisfaction", v.satisfaction_rate, fmtPct(v.satisfaction_rate)],
        ["issues", v.issue_rate, fmtPct(v.issue_rate)],
        ["ratings", v.ratings, fmtInt(v.ratings)],
      ];
      for (const [key, value, text] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        td.dataset.key = key;
        td.dataset.value = isNum(value) ? String(value) : "";
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  function renderComments(rows) {
    const list = $("comments");
    list.textContent = "";
    $("comments-section").hidden = rows.length === 0;
    for (const r of rows) {
      const li = document.createElement("li");
      const stars = document.createElement("strong");
      stars.textContent = `${r.rating}/5`;
      li.append(stars, " ", r.comment);  // text nodes: a comment is never HTML
      list.appendChild(li);
    }
  }

  function renderRecent(rows) {
    const body = $("recent-body");
    body.replaceChildren();
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("No sessions in this range.");
      td.colSpan = 11;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.dataset.sessionId = r.id;
      if (!r.ended_at) tr.className = "active";
      const models = [r.stt, r.llm, r.tts].filter(Boolean).join(" · ");
      tr.append(
        cell(fmtUtc(r.started_at), "started_at", r.started_at),
        cell(r.transport || "–", "transport"),
        numCell(r.duration_seconds, fmtDuration(r.duration_seconds), null, "duration_seconds"),
        numCell(r.turns_count, fmtInt(r.turns_count), null, "turns_count"),
        numCell(r.avg_latency_ms, fmtMs(r.avg_latency_ms), null, "avg_latency_ms"),
        numCell(r.p95_latency_ms, fmtMs(r.p95_latency_ms), null, "p95_latency_ms"),
        numCell(r.interruptions_count, fmtInt(r.interruptions_count), null, "interruptions_count"),
        numCell(r.errors_count, fmtInt(r.errors_count), null, "errors_count"),
        numCell(r.cost_usd, fmtUsd(r.cost_usd), null, "cost_usd"),
        cell(r.end_reason || (r.ended_at ? "–" : "in progress"), "end_reason"),
        cell(models || "–", "models"),
      );
      body.append(tr);
    }
  }

  function cell(text, col, value) {
    const td = document.createElement("td");
    td.textContent = text;
    if (col) td.dataset.col = col;
    if (value !== undefined) td.dataset.value = value;
    return td;
  }

  function numCell(value, text, testid, col) {
    const td = cell(text, col);
    td.className = "num";
    td.dataset.value = isNum(value) ? String(value) : "";
    if (testid) td.dataset.testid = testid;
    return td;
  }

  // --- SVG charts -------------------------------------------------------------------------------
  const W = 480, H = 210, M = { l: 56, r: 12, t: 10, b: 42 };

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.append(node);
    return node;
  }

  function titled(node, text) {
    el("title", {}, node).textContent = text;
    return node;
  }

  function niceMax(v, integer) {
    if (integer) return 4 * Math.max(1, Math.ceil(niceMax(v) / 4)); // four whole-number steps
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // Axis labels for dollars: enough decimals for the scale, the same for every tick.
  const usdAxis = (yMax) => {
    let digits = 2;
    while (digits < 8 && Math.abs(Math.round((yMax / 4) * 10 ** digits) - (yMax / 4) * 10 ** digits) > 1e-6) digits++;
    return (v) => "$" + v.toFixed(digits);
  };

  function frame(svg, yMax, format) {
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    const y = (v) => M.t + (H - M.t - M.b) * (1 - v / yMax);
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      el("line", { class: i ? "gridline" : "axis", x1: M.l, x2: W - M.r, y1: y(v), y2: y(v) }, svg);
      el("text", { x: M.l - 6, y: y(v) + 4, "text-anchor": "end" }, svg).textContent = format(v);
    }
    return y;
  }

  function emptyChart(svg, text) {
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.dataset.empty = "true";
    el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = text || "no data";
  }

  function xLabels(svg, positions, labels) {
    const n = labels.length;
    const every = Math.max(1, Math.ceil(n / 6));
    for (let i = 0; i < n; i += every) {
      el("text", { x: positions[i], y: H - M.b + 16, "text-anchor": "middle", class: "xlabel" }, svg).textContent = labels[i];
    }
  }

  function lineChart(svg, o) {
    const all = o.series.flatMap((s) => s.values).filter(isNum);
    if (!all.length) return emptyChart(svg, "no turns with this stage");
    delete svg.dataset.empty;
    const y = frame(svg, niceMax(Math.max(...all)), (v) => Math.round(v).toLocaleString("en-US"));
    const x0 = Math.min(...o.xs), x1 = Math.max(...o.xs);
    const x = (t) => (x1 === x0 ? (M.l + W - M.r) / 2 : M.l + ((W - M.l - M.r) * (t - x0)) / (x1 - x0));
    const g = el("g", { class: "stage-" + o.stage }, svg);
    for (const s of o.series) {
      let d = "", pen = false;
      s.values.forEach((v, i) => {
        if (!isNum(v)) { pen = false; return; }
        d += (pen ? "L" : "M") + x(o.xs[i]).toFixed(1) + "," + y(v).toFixed(1);
        pen = true;
      });
      if (d) el("path", { class: `line ${s.name} stage-${o.stage}`, d, "data-series": s.name }, g);
      s.values.forEach((v, i) => {
        if (!isNum(v)) return;
        titled(el("circle", {
          class: `point ${s.name}`, cx: x(o.xs[i]).toFixed(1), cy: y(v).toFixed(1), r: 2.6,
          "data-series": s.name, "data-stage": o.stage, "data-bucket": o.keys[i], "data-value": String(v),
        }, g), `${bucketLabel(o.keys[i], o.bucket)} ${s.name}: ${o.format(v)}`);
      });
    }
    xLabels(svg, o.xs.map(x), o.keys.map((k) => bucketLabel(k, o.bucket)));
  }

  function barChart(svg, o) {
    if (!o.values.length) return emptyChart(svg, o.empty);
    delete svg.dataset.empty;
    const yMax = niceMax(Math.max(...o.values), o.integer);
    const y = frame(svg, yMax, o.usd ? usdAxis(yMax) : o.format);
    const slot = (W - M.l - M.r) / o.values.length;
    const width = Math.max(1, Math.min(48, slot * 0.75));
    const centers = [];
    o.values.forEach((v, i) => {
      const cx = M.l + slot * (i + 0.5);
      centers.push(cx);
      const top = y(Math.max(0, v));
      titled(el("rect", {
        class: o.cls, x: (cx - width / 2).toFixed(1), y: top.toFixed(1), width: width.toFixed(1),
        height: Math.max(0, y(0) - top).toFixed(1), "data-value": String(v), ["data-" + o.keyAttr]: o.keys[i],
        "data-label": o.labels[i],
      }, svg), `${o.labels[i]}: ${o.format(v)}`);
    });
    xLabels(svg, centers, o.labels);
  }

  function scatterChart(svg, points) {
    if (!points.length) return emptyChart(svg);
    delete svg.dataset.empty;
    const values = points.map((p) => p.cost_usd);
    const yMax = niceMax(Math.max(...values));
    const y = frame(svg, yMax, usdAxis(yMax));
    const xs = points.map((p) => Date.parse(p.started_at));
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const x = (t) => (x1 === x0 ? (M.l + W - M.r) / 2 : M.l + ((W - M.l - M.r) * (t - x0)) / (x1 - x0));
    points.forEach((p, i) => {
      titled(el("circle", {
        class: "dot", cx: x(xs[i]).toFixed(1), cy: y(p.cost_usd).toFixed(1), r: 3.5,
        "data-session-id": p.id, "data-started-at": p.started_at, "data-value": String(p.cost_usd),
      }, svg), `${fmtUtc(p.started_at)} UTC: ${fmtUsd(p.cost_usd)}`);
    });
    const ticks = [x0, x1].filter((v, i, a) => a.indexOf(v) === i);
    for (const t of ticks) {
      el("text", { x: x(t), y: H - M.b + 16, "text-anchor": "middle", class: "xlabel" }, svg)
        .textContent = fmtUtc(new Date(t).toISOString()).slice(5, 16);
    }
  }

  setInterval(() => { if (state.state === "ready") load(); }, REFRESH_MS);
  load();
})();
