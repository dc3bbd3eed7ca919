// A signed-in user's past calls: GET /api/history with their token, one call's turns on demand.
// The token is the page's (sessionStorage "atlas-token", as the talk page keeps it) or pasted here.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = (window.atlasHistory = { state: "loading", sessions: [], error: null });

  const fmtDate = (iso) => {
    const d = new Date(iso);
    return isNaN(d) ? "?" : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  };
  const fmtLength = (s) => (s == null ? "in progress" : s < 60 ? `${Math.round(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);
  const fmtCost = (v) => (v == null ? "–" : "$" + (v >= 1 ? v.toFixed(2) : v.toFixed(4)));

  function token() {
    return sessionStorage.getItem("atlas-token") || "";
  }

  function say(text, kind) {
    $("message").textContent = text;
    $("message").className = "message " + (kind || "");
  }

  async function api(path) {
    const r = await fetch(path, { headers: { Authorization: `Bearer ${token()}` }, cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const err = new Error(body.message || `HTTP ${r.status}`);
      err.code = body.code || String(r.status);
      throw err;
    }
    return body;
  }

  function field(label, value) {
    const span = document.createElement("span");
    span.className = "field";
    const small = document.createElement("small");
    small.textContent = label;
    span.append(small, document.createTextNode(value));
    return span;
  }

  async function showTurns(li, s, button) {
    button.disabled = true;
    try {
      const data = await api(`/api/history/${encodeURIComponent(s.sessionId)}`);
      const list = document.createElement("ol");
      list.className = "turns";
      if (!data.transcriptStored) {
        const p = document.createElement("p");
        p.className = "muted";
        p.textContent = `${data.turns.length} turns; this agent does not keep what was said.`;
        li.appendChild(p);
      } else {
        for (const t of data.turns) {
          for (const [who, text] of [["you", t.user], ["atlas", t.bot]]) {
            if (!text) continue;
            const item = document.createElement("li");
            item.className = who;
            item.textContent = text; // text, never HTML
            list.appendChild(item);
          }
        }
        li.appendChild(list);
      }
      button.remove();
    } catch (e) {
      button.disabled = false;
      say(`Could not load that call: ${e.message}`, "error");
    }
  }

  function render(sessions) {
    const list = $("sessions");
    list.textContent = "";
    for (const s of sessions) {
      const li = document.createElement("li");
      li.dataset.session = s.sessionId;
      const head = document.createElement("div");
      head.className = "head";
      const when = document.createElement("strong");
      when.textContent = fmtDate(s.startedAt);
      head.append(
        when,
        field("length", fmtLength(s.durationSeconds)),
        field("turns", String(s.turns)),
        field("cost", fmtCost(s.costUsd)),
        field("rating", s.rating ? `${s.rating}/5` : "not rated"),
      );
      li.appendChild(head);
      if (s.comment) {
        const c = document.createElement("p");
        c.className = "comment";
        c.textContent = `“${s.comment}”`;
        li.appendChild(c);
      }
      if (s.turns > 0) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = "Show what was said";
        b.onclick = () => showTurns(li, s, b);
        li.appendChild(b);
      }
      list.appendChild(li);
    }
  }

  async function load() {
    if (!token()) {
      state.state = "signed-out";
      $("signin").hidden = false;
      say("Sign in to see your calls.");
      return;
    }
    try {
      const data = await api("/api/history");
      state.sessions = data.sessions;
      state.state = "ready";
      $("signin").hidden = true;
      say(data.sessions.length ? "" : "No calls yet. Your calls appear here after you talk to Atlas.");
      render(data.sessions);
    } catch (e) {
      state.state = "error";
      state.error = e.code;
      if (e.code === "AUTH_FAILED") {
        $("signin").hidden = false;
        say("Your sign-in has expired or is not valid: sign in again.", "error");
      } else if (e.code === "HISTORY_DISABLED") {
        say("This server has no signed-in users, so it keeps no history.", "error");
      } else {
        say(`Your calls could not be loaded: ${e.message}`, "error");
      }
    }
  }

  $("signin").onsubmit = (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("atlas-token", $("token").value.trim());
    load();
  };
  load();
})();
