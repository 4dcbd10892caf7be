/* Barber analytics dashboard: signs in through the gateway and draws the etl service's
 * analytics API (leaderboard for admins, a daily series per barber) with Chart.js.
 * Every URL is relative to the page, so it works at /etl/dashboard behind the gateway. */
(function () {
  "use strict";

  const STORAGE_KEY = "barber.dashboard.session";
  const DAY_MS = 86400000;
  // The API's default period: the last 30 days, today included (UTC).
  const DEFAULT_DAYS = 30;

  // The page's folder (/etl/); the sign-in lives beside the etl prefix on the gateway.
  const API_BASE = new URL(".", window.location.href);
  const SIGNIN_URL = new URL("../authen/authen/signin", API_BASE);

  // `short` heads the table's columns; `label` is for charts, tooltips and the column's title.
  const METRICS = [
    { key: "chats_started", short: "Chats", label: "Chats started", kind: "count" },
    { key: "new_customers", short: "New", label: "New customers", kind: "count" },
    { key: "returning_customers", short: "Returning", label: "Returning customers", kind: "count" },
    { key: "customer_messages", short: "Customer msgs", label: "Customer messages", kind: "count" },
    { key: "barber_messages", short: "Barber msgs", label: "Barber messages", kind: "count" },
    { key: "replies", short: "Replies", label: "Replies", kind: "count" },
    { key: "reply_time_median_s", short: "Median reply", label: "Median reply time", kind: "duration" },
    { key: "reply_time_p90_s", short: "P90 reply", label: "90th percentile reply time", kind: "duration" },
    { key: "unanswered_chats", short: "Unanswered", label: "Unanswered chats", kind: "count" },
  ];
  // The name column sorts by first name, the way names are shown.
  const NAME_SORT = { key: "first_name", short: "Barber", label: "Name", kind: "name" };
  const METRIC_BY_KEY = Object.fromEntries([NAME_SORT, ...METRICS].map((m) => [m.key, m]));

  const COLORS = {
    customer: "#4f46e5",
    barber: "#0d9488",
    chats: "#2563eb",
    fresh: "#16a34a",
    returning: "#f59e0b",
    median: "#7c3aed",
    p90: "#e11d48",
  };

  const $ = (id) => document.getElementById(id);
  const numberFormat = new Intl.NumberFormat("en");

  function freshLeaderboard() {
    return { from: "", to: "", sort: "customer_messages", order: "desc", limit: 25, offset: 0, total: 0, rows: [] };
  }

  const state = {
    session: null, // {token, userId, type, name}
    lb: freshLeaderboard(),
    barberId: null,
    charts: {},
  };

  // ---------------------------------------------------------------- formatting
  function formatCount(v) {
    return v === null || v === undefined ? "—" : numberFormat.format(v);
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Number(seconds);
    if (s > 0 && s < 0.05) return "< 0.1 s";
    if (s < 10) return `${s.toFixed(1).replace(/\.0$/, "")} s`;
    const whole = Math.round(s);
    if (whole < 60) return `${whole} s`;
    if (whole < 3600) {
      const m = Math.floor(whole / 60);
      const r = whole % 60;
      return r ? `${m} min ${r} s` : `${m} min`;
    }
    const minutes = Math.round(whole / 60);
    const h = Math.floor(minutes / 60);
    const m = minutes % 60;
    return m ? `${h} h ${m} min` : `${h} h`;
  }

  // Durations are charted in one unit picked from the largest value, so the axis reads 0, 5, 10 min.
  function durationUnit(values) {
    const max = Math.max(0, ...values.filter((v) => v !== null && v !== undefined).map(Number));
    if (max >= 2 * 3600) return { div: 3600, name: "hours" };
    if (max >= 120) return { div: 60, name: "minutes" };
    return { div: 1, name: "seconds" };
  }

  function inUnit(values, unit) {
    return values.map((v) => (v === null || v === undefined ? null : Number(v) / unit.div));
  }

  const NICE_DURATIONS = [1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
    2 * 86400, 7 * 86400, 30 * 86400];

  // Reply times are skewed (minutes usually, hours when a message waits overnight): past a
  // 20-fold spread a linear axis flattens the typical replies to zero, so the axis turns
  // logarithmic, in seconds, with ticks at round durations.
  function replyScale(values) {
    const positive = values.filter((v) => v !== null && v !== undefined && Number(v) > 0).map(Number);
    const lo = Math.min(...positive);
    const hi = Math.max(...positive);
    if (positive.length && hi / lo >= 20) {
      return {
        data: (vs) => vs.map((v) => (v === null || v === undefined ? null : Math.max(Number(v), 0.1))),
        axis: {
          type: "logarithmic",
          title: { display: true, text: "log scale" },
          afterBuildTicks: (axis) => {
            const ticks = NICE_DURATIONS.filter((v) => v >= axis.min && v <= axis.max);
            if (ticks.length) axis.ticks = ticks.map((value) => ({ value }));
          },
          ticks: { callback: (v) => formatDuration(v) },
        },
      };
    }
    const unit = durationUnit(values);
    return { data: (vs) => inUnit(vs, unit), axis: { beginAtZero: true, title: { display: true, text: unit.name } } };
  }

  function formatMetric(key, value) {
    return METRIC_BY_KEY[key] && METRIC_BY_KEY[key].kind === "duration" ? formatDuration(value) : formatCount(value);
  }

  function barberName(b) {
    const full = [b.first_name, b.last_name].filter(Boolean).join(" ");
    return full || b.username || `Barber #${b.barber_id}`;
  }

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function defaultRange() {
    const today = new Date();
    return { from: isoDay(new Date(today.getTime() - (DEFAULT_DAYS - 1) * DAY_MS)), to: isoDay(today) };
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  // ---------------------------------------------------------------- messages
  function showAlert(text, kind) {
    const box = $("alert");
    box.textContent = text;
    box.className = `alert alert-${kind || "error"}`;
    box.hidden = false;
  }

  function clearAlert() {
    $("alert").hidden = true;
    $("alert").textContent = "";
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  function explain(err) {
    if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
    const detail = err.detail ? `: ${err.detail}` : "";
    switch (err.status) {
      case 0: return `The server could not be reached${detail}. Check the connection and try again.`;
      case 400: return `The request was refused${detail}.`;
      case 401: return `You are not signed in, or your session has expired${detail}. Please sign in again.`;
      case 403: return `You are not allowed to see this${detail}.`;
      case 404: return `Not found${detail}.`;
      case 429: return `Too many requests${detail}. Wait a moment and try again.`;
      default:
        return err.status >= 500
          ? `The analytics service had a problem (${err.status})${detail}. Try again shortly.`
          : `The request failed (${err.status})${detail}.`;
    }
  }

  // ---------------------------------------------------------------- HTTP
  async function request(url, options) {
    let resp;
    try {
      resp = await fetch(url, options);
    } catch (e) {
      throw new ApiError(0, e.message);
    }
    let body = null;
    const text = await resp.text();
    if (text) {
      try {
        body = JSON.parse(text);
      } catch (e) {
        body = null;
      }
    }
    if (!resp.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : resp.statusText;
      throw new ApiError(resp.status, detail);
    }
    return body;
  }

  async function api(path, params, options) {
    const url = new URL(path, API_BASE);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
    }
    const headers = { Accept: "application/json" };
    if (state.session) headers.Authorization = `Bearer ${state.session.token}`;
    try {
      return await request(url, { ...(options || {}), headers });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut();
        showAlert(explain(err));
        throw new HandledError();
      }
      throw err;
    }
  }

  // A failure already shown to the user (a 401 sends them back to the sign-in form).
  class HandledError extends Error {}

  function report(err) {
    if (!(err instanceof HandledError)) showAlert(explain(err));
  }

  // ---------------------------------------------------------------- session
  // The token's claims, read only to choose which view to show: the API decides access.
  function claimsOf(token) {
    const parts = token.split(".");
    if (parts.length !== 3) return null;
    try {
      const json = atob(parts[1].replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(parts[1].length / 4) * 4, "="));
      return JSON.parse(json);
    } catch (e) {
      return null;
    }
  }

  function sessionFromToken(token, userId, name) {
    const claims = claimsOf(token);
    if (!claims) throw new Error("This is not a valid token.");
    if (claims.exp && claims.exp * 1000 < Date.now()) throw new Error("This token has expired.");
    const id = userId !== undefined ? Number(userId) : Number(claims.sub);
    return { token, userId: id, type: claims.typ || "unknown", name: name || `user #${id}` };
  }

  function saveSession(session) {
    state.session = session;
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  }

  function loadSession() {
    const raw = sessionStorage.getItem(STORAGE_KEY);
    if (!raw) return null;
    try {
      const saved = JSON.parse(raw);
      return sessionFromToken(saved.token, saved.userId, saved.name);
    } catch (e) {
      sessionStorage.removeItem(STORAGE_KEY);
      return null;
    }
  }

  function signOut() {
    state.session = null;
    state.barberId = null;
    state.lb = freshLeaderboard();
    sessionStorage.removeItem(STORAGE_KEY);
    // The next account starts from the default view, not from this one's.
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
    for (const chart of Object.values(state.charts)) chart.destroy();
    state.charts = {};
    $("password").value = "";
    $("token-input").value = "";
    document.querySelector(".token-entry").open = false;
    render();
  }

  async function signIn(username, password) {
    const body = await request(SIGNIN_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username, password }),
    });
    saveSession(sessionFromToken(body.token, body.user_id, username));
  }

  // ---------------------------------------------------------------- views
  function show(view) {
    for (const id of ["signin-view", "leaderboard-view", "daily-view", "nothing-view"]) {
      $(id).hidden = !view.includes(id);
    }
  }

  function render() {
    const s = state.session;
    $("session").hidden = !s;
    if (!s) {
      show(["signin-view"]);
      $("username").focus();
      return;
    }
    $("who").textContent = `${s.name} · ${{ admin: "Admin", employee: "Barber", customer: "Customer" }[s.type] || s.type}`;
    readHash();
    if (s.type === "admin") {
      show(["leaderboard-view"]);
      $("daily-close").hidden = false;
      $("daily-range-form").hidden = true;
      const barberId = state.barberId;
      loadLeaderboard().then(() => {
        if (barberId !== null && state.session) openBarber(barberId, false);
      });
    } else if (s.type === "employee") {
      show(["daily-view"]);
      $("daily-close").hidden = true;
      $("daily-range-form").hidden = false;
      const range = state.lb.from ? { from: state.lb.from, to: state.lb.to } : defaultRange();
      $("daily-from").value = range.from;
      $("daily-to").value = range.to;
      loadDaily(s.userId, range.from, range.to);
    } else {
      show(["nothing-view"]);
    }
  }

  function chart(id, config) {
    if (state.charts[id]) state.charts[id].destroy();
    state.charts[id] = new window.Chart($(id), config);
    return state.charts[id];
  }

  const baseOptions = {
    responsive: true,
    maintainAspectRatio: false,
    animation: { duration: 250 },
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 12, usePointStyle: true } } },
  };

  // ---------------------------------------------------------------- leaderboard
  function rangeIsValid(from, to) {
    if (!from || !to) {
      showAlert("Choose both a start and an end date.");
      return false;
    }
    if (from > to) {
      showAlert("The start date must not be after the end date.");
      return false;
    }
    return true;
  }

  function renderLeaderboardHead() {
    const head = $("lb-head");
    head.replaceChildren(el("th", { scope: "col", class: "rank" }, "#"));
    for (const m of [NAME_SORT, ...METRICS]) {
      const active = state.lb.sort === m.key;
      const arrow = active ? (state.lb.order === "desc" ? " ▼" : " ▲") : "";
      const th = el("th", { scope: "col", class: m === NAME_SORT ? "" : "num" },
        el("button", { type: "button", class: "sort", title: `Sort by ${m.label.toLowerCase()}`,
          dataset: { sort: m.key }, onclick: () => sortBy(m.key) }, m.short + arrow));
      th.setAttribute("aria-sort", active ? (state.lb.order === "desc" ? "descending" : "ascending") : "none");
      head.append(th);
    }
  }

  function sortBy(key) {
    if (state.lb.sort === key) state.lb.order = state.lb.order === "desc" ? "asc" : "desc";
    else {
      state.lb.sort = key;
      // Fast replies are the good end of the time metrics, large counts of the others; names go A to Z.
      state.lb.order = METRIC_BY_KEY[key].kind === "count" ? "desc" : "asc";
    }
    state.lb.offset = 0;
    loadLeaderboard();
  }

  // The view lives in the address's fragment (#from=&to=&sort=&order=&limit=&offset=&barber=), so a
  // reload or a shared link opens the same view; a fragment never reaches a server or its logs.
  function readHash() {
    const p = new URLSearchParams(window.location.hash.slice(1));
    const lb = state.lb;
    const isDay = (v) => /^\d{4}-\d{2}-\d{2}$/.test(v || "");
    if (isDay(p.get("from")) && isDay(p.get("to"))) {
      lb.from = p.get("from");
      lb.to = p.get("to");
    }
    if (METRIC_BY_KEY[p.get("sort")]) lb.sort = p.get("sort");
    if (p.get("order") === "asc" || p.get("order") === "desc") lb.order = p.get("order");
    const limit = parseInt(p.get("limit"), 10);
    if (limit > 0 && limit <= 500) lb.limit = limit;
    const offset = parseInt(p.get("offset"), 10);
    if (offset >= 0) lb.offset = offset;
    const barber = parseInt(p.get("barber"), 10);
    state.barberId = barber > 0 ? barber : null;
  }

  function writeHash(params) {
    window.history.replaceState(null, "", "#" + new URLSearchParams(params).toString());
  }

  function writeLeaderboardHash() {
    const lb = state.lb;
    const params = { from: lb.from, to: lb.to, sort: lb.sort, order: lb.order, limit: lb.limit, offset: lb.offset };
    if (state.barberId !== null) params.barber = state.barberId;
    writeHash(params);
  }

  function selectLimit(limit) {
    const select = $("limit");
    if (![...select.options].some((o) => o.value === String(limit))) select.append(el("option", {}, limit));
    select.value = String(limit);
  }

  async function loadLeaderboard() {
    const lb = state.lb;
    if (!lb.from) Object.assign(lb, defaultRange());
    $("from").value = lb.from;
    $("to").value = lb.to;
    selectLimit(lb.limit);
    renderLeaderboardHead();
    if (!rangeIsValid(lb.from, lb.to)) return;
    $("leaderboard").setAttribute("aria-busy", "true");
    try {
      const data = await api("analytics/barbers", {
        from: lb.from, to: lb.to, sort: lb.sort, order: lb.order, limit: lb.limit, offset: lb.offset,
      });
      clearAlert();
      lb.total = data.total;
      lb.rows = data.barbers || [];
      renderLeaderboard(data);
      writeLeaderboardHash();
    } catch (err) {
      report(err);
    } finally {
      $("leaderboard").removeAttribute("aria-busy");
    }
  }

  function renderLeaderboard(data) {
    const lb = state.lb;
    const rows = data.barbers || [];
    const body = $("lb-body");
    body.replaceChildren();
    if (!rows.length) {
      body.append(el("tr", {}, el("td", { colspan: String(METRICS.length + 2), class: "empty" },
        "No barber activity in this period. Has the ETL run yet?")));
    }
    rows.forEach((row, i) => {
      const tr = el("tr", {
        class: "clickable" + (row.barber_id === state.barberId ? " selected" : ""),
        tabindex: "0",
        dataset: { barberId: String(row.barber_id) },
        onclick: () => openBarber(row.barber_id),
        onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openBarber(row.barber_id); } },
      },
      el("td", { class: "rank" }, lb.offset + i + 1),
      el("td", { class: "name" }, el("span", { class: "strong" }, barberName(row)),
        el("span", { class: "muted small" }, row.username ? ` @${row.username}` : "")));
      for (const m of METRICS) {
        // data-value keeps the exact figure behind the rounded text (for copying, and for tests).
        const value = row[m.key] === null || row[m.key] === undefined ? "" : String(row[m.key]);
        tr.append(el("td", { class: "num", dataset: { metric: m.key, value } }, formatMetric(m.key, row[m.key])));
      }
      body.append(tr);
    });
    const first = rows.length ? lb.offset + 1 : 0;
    const last = lb.offset + rows.length;
    $("page-info").textContent = `${first}–${last} of ${formatCount(data.total)}`;
    $("lb-summary").textContent = `${data.from} to ${data.to}`;
    $("prev").disabled = lb.offset === 0;
    $("next").disabled = last >= data.total;
    drawLeaderboardChart(rows);
  }

  function drawLeaderboardChart(rows) {
    const sorted = METRIC_BY_KEY[state.lb.sort];
    const metric = sorted && sorted !== NAME_SORT ? sorted : METRIC_BY_KEY.customer_messages;
    $("lb-chart-title").textContent = `${metric.label} by barber`;
    const raw = rows.map((r) => r[metric.key]);
    const duration = metric.kind === "duration";
    const unit = duration ? durationUnit(raw) : { div: 1, name: "" };
    chart("lb-chart", {
      type: "bar",
      data: {
        labels: rows.map(barberName),
        datasets: [{
          label: metric.label,
          data: duration ? inUnit(raw, unit) : raw,
          backgroundColor: duration ? COLORS.median : COLORS.customer,
          borderRadius: 4,
          maxBarThickness: 48,
        }],
      },
      options: {
        ...baseOptions,
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (ctx) => `${metric.label}: ${formatMetric(metric.key, raw[ctx.dataIndex])}` } },
        },
        scales: {
          y: { beginAtZero: true, ticks: { precision: duration ? undefined : 0 },
            title: { display: duration, text: unit.name } },
          x: { grid: { display: false } },
        },
        onClick: (_evt, elements) => {
          if (elements.length) openBarber(rows[elements[0].index].barber_id);
        },
      },
    });
  }

  // One barber's series under the leaderboard, with the period's exact percentiles when their
  // row is on the page (a day's median cannot be combined into the period's).
  function openBarber(barberId, scroll = true) {
    state.barberId = barberId;
    for (const tr of $("lb-body").querySelectorAll("tr")) {
      tr.classList.toggle("selected", tr.dataset.barberId === String(barberId));
    }
    writeLeaderboardHash();
    $("daily-view").hidden = false;
    const row = state.lb.rows.find((r) => r.barber_id === barberId);
    return loadDaily(barberId, state.lb.from, state.lb.to, row, scroll);
  }

  // ---------------------------------------------------------------- daily series
  async function loadDaily(barberId, from, to, leaderboardRow, scroll) {
    if (!rangeIsValid(from, to)) return;
    $("daily-view").setAttribute("aria-busy", "true");
    try {
      const data = await api(`analytics/barbers/${encodeURIComponent(barberId)}/daily`, { from, to });
      clearAlert();
      renderDaily(data, leaderboardRow);
      if (scroll) $("daily-view").scrollIntoView({ behavior: "smooth", block: "start" });
    } catch (err) {
      const own = state.session && state.session.type === "employee";
      if (own && err instanceof ApiError && err.status === 404) {
        // A barber who signed up after the last ETL run is not in the warehouse yet.
        showAlert("Your figures are not in the analytics yet: they appear after the next ETL run.", "info");
      } else {
        report(err);
      }
    } finally {
      $("daily-view").removeAttribute("aria-busy");
    }
  }

  function sum(days, key) {
    return days.reduce((acc, d) => acc + (Number(d[key]) || 0), 0);
  }

  function renderDaily(data, leaderboardRow) {
    const days = data.days || [];
    const own = state.session && state.session.type === "employee";
    $("daily-title").textContent = `${own ? "Your figures" : barberName(data.barber)} · ${data.from} to ${data.to}`;
    $("daily-view").dataset.barberId = String(data.barber.barber_id);

    // Period totals; the period's exact reply percentiles only come with the leaderboard row.
    const kpis = [
      ["Chats started", formatCount(sum(days, "chats_started"))],
      ["New customers", formatCount(sum(days, "new_customers"))],
      ["Customer messages", formatCount(sum(days, "customer_messages"))],
      ["Barber messages", formatCount(sum(days, "barber_messages"))],
      ["Replies", formatCount(sum(days, "replies"))],
    ];
    if (leaderboardRow) {
      kpis.push(["Median reply", formatDuration(leaderboardRow.reply_time_median_s)]);
      kpis.push(["P90 reply", formatDuration(leaderboardRow.reply_time_p90_s)]);
    }
    $("kpis").replaceChildren(...kpis.map(([label, value]) =>
      el("div", { class: "kpi" }, el("div", { class: "kpi-value" }, value), el("div", { class: "kpi-label" }, label))));

    const labels = days.map((d) => d.day);
    const dayScale = { grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 12 } };
    chart("chart-messages", {
      type: "bar",
      data: {
        labels,
        datasets: [
          { label: "From customers", data: days.map((d) => d.customer_messages), backgroundColor: COLORS.customer, borderRadius: 3 },
          { label: "From the barber", data: days.map((d) => d.barber_messages), backgroundColor: COLORS.barber, borderRadius: 3 },
        ],
      },
      options: { ...baseOptions, scales: { x: dayScale, y: { beginAtZero: true, ticks: { precision: 0 } } } },
    });
    // Two bars a day: chats started, and the customers who wrote split into new and returning.
    chart("chart-chats", {
      type: "bar",
      data: {
        labels,
        datasets: [
          { label: "Chats started", data: days.map((d) => d.chats_started), backgroundColor: COLORS.chats, stack: "chats", borderRadius: 3 },
          { label: "New customers", data: days.map((d) => d.new_customers), backgroundColor: COLORS.fresh, stack: "customers" },
          { label: "Returning customers", data: days.map((d) => d.returning_customers), backgroundColor: COLORS.returning, stack: "customers" },
        ],
      },
      options: { ...baseOptions, scales: { x: { ...dayScale, stacked: true }, y: { beginAtZero: true, stacked: true, ticks: { precision: 0 } } } },
    });
    const medians = days.map((d) => d.reply_time_median_s);
    const p90s = days.map((d) => d.reply_time_p90_s);
    const scale = replyScale([...medians, ...p90s]);
    const raw = { Median: medians, "90th percentile": p90s };
    // Days without a reply have no reply time: the line breaks there rather than dropping to
    // zero or bridging the gap with a curve that suggests figures nobody measured.
    const line = { cubicInterpolationMode: "monotone", pointRadius: 3, pointHoverRadius: 5, spanGaps: false };
    chart("chart-reply", {
      type: "line",
      data: {
        labels,
        datasets: [
          { label: "Median", data: scale.data(medians), borderColor: COLORS.median, backgroundColor: COLORS.median, ...line },
          { label: "90th percentile", data: scale.data(p90s), borderColor: COLORS.p90, backgroundColor: COLORS.p90,
            borderDash: [6, 4], ...line },
        ],
      },
      options: {
        ...baseOptions,
        plugins: {
          ...baseOptions.plugins,
          tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${formatDuration(raw[ctx.dataset.label][ctx.dataIndex])}` } },
        },
        scales: { x: dayScale, y: scale.axis },
      },
    });

    $("daily-head").replaceChildren(el("th", { scope: "col" }, "Day"),
      ...METRICS.map((m) => el("th", { scope: "col", class: "num", title: m.label }, m.short)));
    $("daily-body").replaceChildren(...days.map((d) => el("tr", {}, el("td", {}, d.day),
      ...METRICS.map((m) => el("td", { class: "num" }, formatMetric(m.key, d[m.key]))))));
  }

  // ---------------------------------------------------------------- wiring
  function wire() {
    $("signin-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      clearAlert();
      const button = $("signin-submit");
      button.disabled = true;
      try {
        await signIn($("username").value.trim(), $("password").value);
        $("password").value = "";
        render();
      } catch (err) {
        showAlert(err instanceof ApiError && err.status === 401
          ? "Wrong username or password."
          : explain(err));
      } finally {
        button.disabled = false;
      }
    });
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      clearAlert();
      try {
        saveSession(sessionFromToken($("token-input").value.trim().replace(/^Bearer\s+/i, "")));
        render();
      } catch (err) {
        showAlert(err.message);
      }
    });
    $("signout").addEventListener("click", () => {
      clearAlert();
      signOut();
    });
    $("range-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      state.lb.from = $("from").value;
      state.lb.to = $("to").value;
      state.lb.limit = Number($("limit").value);
      state.lb.offset = 0;
      state.lb.rows = [];
      await loadLeaderboard();
      // The open barber follows the new period.
      if (state.barberId !== null && !$("daily-view").hidden && state.lb.rows.length) openBarber(state.barberId, false);
    });
    $("daily-range-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const from = $("daily-from").value;
      const to = $("daily-to").value;
      if (rangeIsValid(from, to)) writeHash({ from, to });
      loadDaily(state.session.userId, from, to);
    });
    $("prev").addEventListener("click", () => {
      state.lb.offset = Math.max(0, state.lb.offset - state.lb.limit);
      loadLeaderboard();
    });
    $("next").addEventListener("click", () => {
      state.lb.offset += state.lb.limit;
      loadLeaderboard();
    });
    $("daily-close").addEventListener("click", () => {
      state.barberId = null;
      writeLeaderboardHash();
      $("daily-view").hidden = true;
      for (const tr of $("lb-body").querySelectorAll("tr.selected")) tr.classList.remove("selected");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!window.Chart) {
      showAlert("The chart library failed to load; reload the page.");
      return;
    }
    window.Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    window.Chart.defaults.color = "#475569";
    wire();
    state.session = loadSession();
    render();
  });
})();
