// The dashboard page: figures from /api/* (the gateway's answers, relayed), live budgets from
// /events (server-sent WatchFunds snapshots). Read-only: nothing here changes anything.
"use strict";

const HISTORY_POINTS = 720; // burn-down points kept per budget (12 minutes at one a second)
const TODAY_REFRESH_MS = 30_000;
const TODAY_AFTER_CHANGE_MS = 2_000;
const REPORTS_REFRESH_MS = 120_000;
const COMPLAINTS_REFRESH_MS = 60_000;

const state = {
  snapshot: null,
  history: new Map(), // "campaign/category" -> [{at, fen}]
  alerts: new Map(), // alert_id -> alert
  today: null,
  todayFailed: false,
  reports: null,
  reportsFailed: false,
  runs: null,
  runsFailed: false,
  exceptions: null, // {run_id, lines, truncated}
  complaints: null, // {today, days, open_now, overdue_now}
  complaintsFailed: false,
  lastTotals: null,
  todayTimer: null,
};

function element(name, attributes, ...children) {
  const made = document.createElement(name);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "dataset") Object.assign(made.dataset, value);
    else if (key === "text") made.textContent = value;
    else made.setAttribute(key, value);
  }
  for (const child of children) made.append(child);
  return made;
}

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/login?error=expired");
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function formatTime(iso) {
  if (!iso) return "—";
  const locale = language() === "zh" ? "zh-CN" : "en-GB";
  return new Date(iso).toLocaleString(locale, { timeZone: "Asia/Shanghai", hour12: false });
}

function percent(ratio) {
  return `${(ratio * 100).toFixed(1)}%`;
}

function rate(value) {
  return value.toFixed(1);
}

// --------------------------------------------------------------------- budgets (live)

function budgetKey(budget) {
  return `${budget.campaign_id}/${budget.category}`;
}

function figure(name, value, field) {
  return element("div", { class: "figure" },
    element("dt", { text: t(name) }),
    element("dd", { dataset: { field: field || name }, text: value }));
}

function budgetCard(budget) {
  const key = budgetKey(budget);
  const exhaustion = budget.projected_exhaustion_at ? formatTime(budget.projected_exhaustion_at) : t("not_burning");
  const card = element("article", { class: "card", dataset: { budget: key } },
    element("h3", {},
      element("span", { text: budget.campaign_name || budget.campaign_id }),
      element("span", { class: "category", text: ` · ${categoryName(budget.category)}` }),
      element("span", { class: "used", dataset: { field: "used" }, text: percent(budget.used_ratio) })));
  card.append(budgetBar(budget));
  const figures = element("dl", { class: "budget-figures" },
    figure("budget", formatYuan(budget.budget)),
    figure("released", formatYuan(budget.released)),
    figure("spent", formatYuan(budget.spent)),
    figure("reserved", formatYuan(budget.reserved)),
    figure("refunded", formatYuan(budget.refunded)),
    figure("remaining", formatYuan(budget.remaining)),
    figure("claims_per_minute", rate(budget.claims_per_minute)),
    figure("redemptions_per_minute", rate(budget.redemptions_per_minute)),
    figure("burn_per_minute", formatYuan(budget.burn_per_minute)),
    figure("exhaustion", exhaustion));
  card.append(figures);
  card.append(element("p", { class: "chart-title", text: t("burn_down") }));
  card.append(burnDown(state.history.get(key) || [], budget.budget.fen, budget.projected_exhaustion_at));
  return card;
}

function renderBudgets() {
  const container = document.getElementById("budgets");
  if (!state.snapshot) return;
  container.replaceChildren(...state.snapshot.budgets.map(budgetCard));
  document.getElementById("taken-at").textContent = formatTime(state.snapshot.taken_at);
}

function remember(snapshot) {
  const at = snapshot.taken_at ? Date.parse(snapshot.taken_at) : Date.now();
  for (const budget of snapshot.budgets) {
    const points = state.history.get(budgetKey(budget)) || [];
    points.push({ at, fen: budget.remaining.fen });
    if (points.length > HISTORY_POINTS) points.splice(0, points.length - HISTORY_POINTS);
    state.history.set(budgetKey(budget), points);
  }
  for (const alert of snapshot.alerts) state.alerts.set(alert.alert_id, alert);
  // Today's figures come from the ledger: fetch them again soon after the budgets move.
  const totals = snapshot.budgets.map((budget) => `${budget.spent.fen}:${budget.refunded.fen}`).join(",");
  if (state.lastTotals !== null && totals !== state.lastTotals) scheduleToday(TODAY_AFTER_CHANGE_MS);
  state.lastTotals = totals;
}

// --------------------------------------------------------------------- today, merchants

function figureCells(figures) {
  return [
    element("td", { class: "number", text: String(figures.consumers) }),
    element("td", { class: "number", text: String(figures.sales) }),
    element("td", { class: "number", dataset: { field: "redeemed" }, text: formatYuan(figures.redeemed) }),
    element("td", { class: "number", text: formatYuan(figures.order) }),
    element("td", { class: "number", text: String(figures.refunds) }),
    element("td", { class: "number", text: formatYuan(figures.refunded) }),
    element("td", { class: "number", text: String(figures.merchants) }),
  ];
}

function renderToday() {
  const body = document.querySelector("#today tbody");
  const merchantsBody = document.querySelector("#merchants tbody");
  const chart = document.getElementById("merchant-chart");
  if (!state.today) {
    const text = state.todayFailed ? t("unavailable") : "—";
    body.replaceChildren(element("tr", {}, element("td", { colspan: "9", class: "muted", text })));
    merchantsBody.replaceChildren();
    chart.replaceChildren();
    return;
  }
  const today = state.today;
  document.getElementById("today-date").textContent = `${today.business_date} (${formatTime(today.as_of)})`;
  const rows = today.categories.map((item) => element("tr", { dataset: { today: `${item.campaign_id}/${item.category}` } },
    element("td", { text: item.campaign_id }), element("td", { text: categoryName(item.category) }), ...figureCells(item)));
  rows.push(element("tr", { class: "total", dataset: { today: "district" } },
    element("td", { colspan: "2", text: t("district_total") }), ...figureCells(today.district_total)));
  body.replaceChildren(...rows);
  merchantsBody.replaceChildren(...today.top_merchants.map((merchant) => element("tr", {},
    element("td", { text: merchant.merchant_name || merchant.merchant_id }),
    element("td", { class: "number", text: String(merchant.sales) }),
    element("td", { class: "number", text: formatYuan(merchant.redeemed) }),
    element("td", { class: "number", text: formatYuan(merchant.order) }),
    element("td", { class: "number", text: formatYuan(merchant.refunded) }))));
  chart.replaceChildren(today.top_merchants.length ? merchantBars(today.top_merchants)
    : element("p", { class: "muted", text: t("none") }));
}

async function loadToday() {
  try {
    state.today = await getJson("/api/today");
    state.todayFailed = false;
  } catch (error) {
    state.todayFailed = true;
  }
  renderToday();
}

function scheduleToday(delayMs) {
  if (state.todayTimer !== null) return;
  state.todayTimer = window.setTimeout(async () => {
    state.todayTimer = null;
    await loadToday();
  }, delayMs);
}

// --------------------------------------------------------------------- alerts, reports

function alertText(alert) {
  if (alert.kind === "ALERT_KIND_BUDGET_THRESHOLD") {
    const subject = `${alert.campaign_id}/${categoryName(alert.category)}`;
    return t("alert_threshold", { subject, threshold: alert.threshold_percent, observed: (alert.observed * 100).toFixed(1) });
  }
  if (alert.kind === "ALERT_KIND_MERCHANT_SURGE") {
    return t("alert_surge", { merchant: alert.merchant_id, observed: alert.observed.toFixed(0), baseline: alert.baseline.toFixed(0) });
  }
  return alert.message;
}

function renderAlerts() {
  const list = document.getElementById("alerts");
  const alerts = [...state.alerts.values()].sort((a, b) => (b.raised_at || "").localeCompare(a.raised_at || ""));
  if (alerts.length === 0) {
    list.replaceChildren(element("li", { class: "muted", text: t("no_alerts") }));
    return;
  }
  list.replaceChildren(...alerts.slice(0, 100).map((alert) => element("li",
    { class: alert.kind === "ALERT_KIND_MERCHANT_SURGE" ? "alert surge" : "alert", dataset: { alert: alert.alert_id } },
    element("time", { text: formatTime(alert.raised_at) }), element("span", { text: alertText(alert) }))));
}

async function loadAlerts() {
  try {
    const answer = await getJson("/api/alerts");
    for (const alert of answer.alerts) state.alerts.set(alert.alert_id, alert);
  } catch (error) {
    // The live stream brings new alerts as well; the list stays as it was.
  }
  renderAlerts();
}

function downloadLink(date, table, extension, label) {
  return element("a", { href: `/reports/${date}/${table}.${extension}`, class: "download",
    dataset: { download: `${table}.${extension}` }, text: t(label) });
}

function renderReports() {
  const body = document.querySelector("#reports tbody");
  if (!state.reports || state.reports.length === 0) {
    const text = state.reportsFailed ? t("unavailable") : t("none");
    body.replaceChildren(element("tr", {}, element("td", { colspan: "11", class: "muted", text })));
    return;
  }
  body.replaceChildren(...state.reports.map((report) => element("tr", { dataset: { report: report.business_date } },
    element("td", { text: report.business_date }),
    element("td", { text: formatTime(report.cut_at) }),
    element("td", { class: "number", text: String(report.consumers) }),
    element("td", { class: "number", text: String(report.sales) }),
    element("td", { class: "number", text: formatYuan(report.redeemed) }),
    element("td", { class: "number", text: formatYuan(report.refunded) }),
    element("td", { class: "number", text: formatYuan(report.clawed_back) }),
    element("td", { class: "number",
      text: `${report.tickets_opened} / ${report.tickets_resolved} / ${report.tickets_overdue}` }),
    element("td", { class: "number", text: String(report.row_count) }),
    element("td", { class: "hash", title: report.content_hash, text: report.content_hash.slice(0, 12) }),
    element("td", { class: "downloads" }, downloadLink(report.business_date, "rows", "csv", "csv_rows"),
      downloadLink(report.business_date, "budgets", "csv", "csv_budgets"),
      downloadLink(report.business_date, "rows", "xlsx", "xlsx")))));
}

async function loadReports() {
  try {
    state.reports = (await getJson("/api/reports")).reports;
    state.reportsFailed = false;
  } catch (error) {
    state.reportsFailed = true;
  }
  renderReports();
}

// --------------------------------------------------------------------- bill reconciliation

function statusCount(run, status) {
  const found = run.counts.find((count) => count.status === status);
  return found ? found.lines : 0;
}

function renderReconciliation() {
  const body = document.querySelector("#reconciliation tbody");
  if (!state.runs || state.runs.length === 0) {
    const text = state.runsFailed ? t("unavailable") : t("none");
    body.replaceChildren(element("tr", {}, element("td", { colspan: "9", class: "muted", text })));
  } else {
    body.replaceChildren(...state.runs.map((run) => {
      const show = element("button", { type: "button", class: "link", dataset: { run: run.run_id }, text: t("show_exceptions") });
      show.addEventListener("click", () => loadExceptions(run.run_id));
      return element("tr", { dataset: { reconciliation: run.run_id } },
        element("td", { text: run.business_date }),
        element("td", { text: run.channel }),
        element("td", { text: run.file_name }),
        element("td", { class: "number", text: String(run.file_lines) }),
        element("td", { class: "number", text: String(statusCount(run, "RECONCILIATION_STATUS_MATCHED")) }),
        element("td", { class: "number", dataset: { field: "exceptions" }, text: String(run.exception_lines) }),
        element("td", { class: "number", text: formatYuan(run.channel_net_subsidy) }),
        element("td", { class: "number", text: formatYuan(run.ledger_net_subsidy) }),
        element("td", { class: "downloads" }, show,
          element("a", { href: `/reconciliation/${run.run_id}/exceptions.csv`, dataset: { download: "exceptions.csv" }, text: "CSV" }),
          element("a", { href: `/reconciliation/${run.run_id}/exceptions.xlsx`, dataset: { download: "exceptions.xlsx" }, text: t("xlsx") })));
    }));
  }
  const panel = document.getElementById("exceptions-panel");
  if (!state.exceptions) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  document.getElementById("exceptions-run").textContent = state.exceptions.run_id;
  const rows = state.exceptions.lines.map((line) => element("tr", { class: "exception", dataset: { status: line.status } },
    element("td", { text: t(line.status) }),
    element("td", { class: "number", text: line.line_number ? String(line.line_number) : "—" }),
    element("td", { text: line.channel_txn_id || "—" }),
    element("td", { class: "hash", text: line.authorization_id || "—" }),
    element("td", { text: line.merchant_id || "—" }),
    element("td", { class: "number", text: formatYuan(line.channel_subsidy) }),
    element("td", { class: "number", text: formatYuan(line.ledger_subsidy) }),
    element("td", { class: "number", text: formatYuan(line.difference) })));
  if (state.exceptions.truncated) {
    rows.push(element("tr", {}, element("td", { colspan: "8", class: "muted",
      text: t("truncated", { count: state.exceptions.lines.length }) })));
  }
  document.querySelector("#exceptions tbody").replaceChildren(...rows);
}

async function loadReconciliation() {
  try {
    state.runs = (await getJson("/api/reconciliation")).runs;
    state.runsFailed = false;
  } catch (error) {
    state.runsFailed = true;
  }
  renderReconciliation();
}

async function loadExceptions(runId) {
  try {
    state.exceptions = await getJson(`/api/reconciliation/${encodeURIComponent(runId)}/exceptions`);
  } catch (error) {
    state.exceptions = null;
  }
  renderReconciliation();
}

// --------------------------------------------------------------------- complaints desk

function renderComplaints() {
  const now = document.getElementById("complaints-now");
  const body = document.querySelector("#complaints tbody");
  const counts = state.complaints;
  if (!counts) {
    now.replaceChildren();
    const text = state.complaintsFailed ? t("unavailable") : "—";
    body.replaceChildren(element("tr", {}, element("td", { colspan: "5", class: "muted", text })));
    return;
  }
  const today = counts.today || { opened: 0, resolved: 0, overdue: 0 };
  now.replaceChildren(
    figure("tickets_opened_today", String(today.opened), "opened_today"),
    figure("tickets_resolved_today", String(today.resolved), "resolved_today"),
    figure("tickets_overdue_today", String(today.overdue), "overdue_today"),
    figure("tickets_open_now", String(counts.open_now), "open_now"),
    figure("tickets_overdue_now", String(counts.overdue_now), "overdue_now"));
  body.replaceChildren(...counts.days.map((day) => element("tr", { dataset: { complaints: day.business_date } },
    element("td", { text: day.business_date }),
    element("td", { class: "number", text: String(day.opened) }),
    element("td", { class: "number", text: String(day.resolved) }),
    element("td", { class: "number", text: String(day.rejected) }),
    element("td", { class: "number", text: String(day.overdue) }))));
}

async function loadComplaints() {
  try {
    state.complaints = await getJson("/api/complaints");
    state.complaintsFailed = false;
  } catch (error) {
    state.complaintsFailed = true;
  }
  renderComplaints();
}

// --------------------------------------------------------------------- live stream

function setStatus(name) {
  const status = document.getElementById("live-status");
  status.dataset.state = name;
  status.textContent = t(`live_${name}`);
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("open", () => setStatus(state.snapshot ? "live" : "connecting"));
  source.addEventListener("snapshot", (event) => {
    state.snapshot = JSON.parse(event.data);
    remember(state.snapshot);
    setStatus("live");
    renderBudgets();
    if (state.snapshot.alerts.length) renderAlerts();
  });
  source.addEventListener("upstream", () => setStatus("reconnecting"));
  source.addEventListener("ended", () => {
    source.close();
    window.location.assign("/login?error=expired");
  });
  source.addEventListener("error", async () => {
    setStatus("reconnecting");
    if (source.readyState === EventSource.CLOSED) {
      // The server refused the stream (no session): find out, then reconnect or sign in.
      try {
        await getJson("/api/me");
        window.setTimeout(connect, 3000);
      } catch (error) {
        // getJson has sent the browser to the sign-in page.
      }
    }
  });
}

function renderAll() {
  setStatus(document.getElementById("live-status").dataset.state);
  renderBudgets();
  renderToday();
  renderAlerts();
  renderReports();
  renderReconciliation();
  renderComplaints();
}

document.addEventListener("DOMContentLoaded", async () => {
  installToggle(renderAll);
  setStatus("connecting");
  try {
    const me = await getJson("/api/me");
    document.getElementById("caller").textContent = me.caller_id;
  } catch (error) {
    return;
  }
  connect();
  await Promise.all([loadToday(), loadAlerts(), loadReports(), loadReconciliation(), loadComplaints()]);
  window.setInterval(() => scheduleToday(0), TODAY_REFRESH_MS);
  window.setInterval(loadReports, REPORTS_REFRESH_MS);
  window.setInterval(loadReconciliation, REPORTS_REFRESH_MS);
  window.setInterval(loadComplaints, COMPLAINTS_REFRESH_MS);
});
