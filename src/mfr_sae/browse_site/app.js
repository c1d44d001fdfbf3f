// The latent browser of `mfr-sae browse` (src/mfr_sae/browse.py writes data/*.js beside this file).
// Routes: #m0 (a member's latents), #m0/l12 (one latent), #summary (what the members share).
"use strict";

const PAGE = 100; // rows of the index shown at once
const view = document.getElementById("view");
const state = { member: 0, sort: "frequency", descending: true, shared: "all", minFrequency: 0, token: "", page: 0 };

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error("cannot load " + src));
    document.head.appendChild(script);
  });
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function token(id) {
  const text = MFR.tokens[id];
  return text === undefined ? "#" + id : text.replace(/\n/g, "\u23CE");
}

function number(value, digits = 3) {
  return value === 0 ? "0" : Number(value).toPrecision(digits);
}

const members = () => MFR.run.members;
const others = (m) => members().map((_, o) => o).filter((o) => o !== m);

// a latent's agreement: its lowest best-match cosine over the other members (shared when at least shared_cosine)
function agreement(m, i) {
  const best = MFR.members[m].best;
  const values = others(m).map((o) => best[o][i]);
  return values.length ? Math.min(...values) : 1;
}

function latentHref(m, i) {
  return "#m" + m + "/l" + i;
}

function nav(current) {
  const links = members().map((member, m) =>
    el("a", { href: "#m" + m, class: current === "m" + m ? "current" : "" }, "member " + member.id + " (k " + member.k + ")"));
  links.push(el("a", { href: "#summary", class: current === "summary" ? "current" : "" }, "shared by all members"));
  document.getElementById("nav").replaceChildren(...links);
}

// ------------------------------------------------------------------ the index of a member's latents

const COLUMNS = [
  { key: "latent", label: "latent", value: (m, i) => i },
  { key: "frequency", label: "firing frequency", value: (m, i) => MFR.members[m].frequency[i], show: (v) => number(v) },
  { key: "mean", label: "mean activation", value: (m, i) => MFR.members[m].mean[i], show: (v) => number(v) },
  { key: "max", label: "max activation", value: (m, i) => MFR.members[m].max[i], show: (v) => number(v) },
  { key: "agreement", label: "best match (lowest over members)", value: agreement, show: (v) => number(v) },
];

function matchesToken(m, i, wanted) {
  const data = MFR.members[m];
  const tokens = data.fires_on[i].concat(data.promotes[i]);
  return tokens.some((id) => token(id).toLowerCase().includes(wanted));
}

function rowsOf(m) {
  const data = MFR.members[m];
  const wanted = state.token.trim().toLowerCase();
  const threshold = MFR.run.shared_cosine;
  let rows = data.frequency.map((_, i) => i).filter((i) => data.frequency[i] >= state.minFrequency);
  if (state.shared !== "all") rows = rows.filter((i) => (agreement(m, i) >= threshold) === (state.shared === "shared"));
  if (wanted) rows = rows.filter((i) => matchesToken(m, i, wanted));
  const column = COLUMNS.find((c) => c.key === state.sort);
  const sign = state.descending ? -1 : 1;
  rows.sort((a, b) => sign * (column.value(m, a) - column.value(m, b)) || a - b);
  return rows;
}

function control(label, input) {
  return el("label", {}, label, input);
}

function renderIndex(m) {
  state.member = m;
  nav("m" + m);
  const threshold = MFR.run.shared_cosine;
  const rows = rowsOf(m);
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const rerender = (change) => () => { change(); renderIndex(m); };
  const sharedSelect = el("select", { id: "shared-filter", onchange: (e) => { state.shared = e.target.value; state.page = 0; renderIndex(m); } },
    el("option", { value: "all" }, "all latents"),
    el("option", { value: "shared" }, "shared by all members"),
    el("option", { value: "alone" }, "not shared by all"));
  sharedSelect.value = state.shared;
  const tokenInput = el("input", { id: "token-filter", type: "search", placeholder: "a token it fires on or promotes", value: state.token });
  tokenInput.addEventListener("change", (e) => { state.token = e.target.value; state.page = 0; renderIndex(m); });
  const frequencyInput = el("input", { id: "frequency-filter", type: "number", min: "0", step: "0.0001", value: String(state.minFrequency) });
  frequencyInput.addEventListener("change", (e) => { state.minFrequency = Number(e.target.value) || 0; state.page = 0; renderIndex(m); });
  const head = el("tr", {}, ...COLUMNS.map((c) => el("th", {
    "data-key": c.key,
    class: state.sort === c.key ? (state.descending ? "sorted-desc" : "sorted-asc") : "",
    onclick: rerender(() => { state.descending = state.sort === c.key ? !state.descending : true; state.sort = c.key; }),
  }, c.label)), el("th", { class: "text" }, "shared"), el("th", { class: "text" }, "fires on"), el("th", { class: "text" }, "promotes"));
  const body = rows.slice(state.page * PAGE, (state.page + 1) * PAGE).map((i) => el("tr", { "data-latent": String(i) },
    ...COLUMNS.map((c) => el("td", {}, c.key === "latent" ? el("a", { href: latentHref(m, i) }, String(i)) : c.show(c.value(m, i)))),
    el("td", { class: "text" }, agreement(m, i) >= threshold ? el("span", { class: "shared" }, "all") : ""),
    el("td", { class: "text" }, ...MFR.members[m].fires_on[i].map((id) => el("span", { class: "tok" }, token(id)))),
    el("td", { class: "text" }, ...MFR.members[m].promotes[i].map((id) => el("span", { class: "tok" }, token(id))))));
  view.replaceChildren(
    el("div", { class: "controls" },
      control("show ", sharedSelect), control("token ", tokenInput), control("firing frequency at least ", frequencyInput)),
    el("p", { id: "row-count" }, rows.length + " of " + MFR.members[m].frequency.length + " latents"),
    el("div", { class: "table-wrap" }, el("table", { id: "latents" }, el("thead", {}, head), el("tbody", {}, ...body))),
    el("div", { class: "pager" },
      el("button", { onclick: rerender(() => { state.page = Math.max(0, state.page - 1); }) }, "previous"),
      "page " + (state.page + 1) + " of " + pages,
      el("button", { onclick: rerender(() => { state.page = Math.min(pages - 1, state.page + 1); }) }, "next")));
}

// ------------------------------------------------------------------ one latent

function histogram(counts) {
  const bins = counts.length;
  const used = counts.map((c, b) => (c > 0 ? b : -1)).filter((b) => b >= 0);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "histogram");
  svg.setAttribute("viewBox", "0 0 300 140");
  if (!used.length) return svg;
  const first = used[0], last = used[used.length - 1], top = Math.max(...counts);
  const width = 300 / (last - first + 1);
  for (let b = first; b <= last; b++) {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = (120 * counts[b]) / top;
    rect.setAttribute("x", (b - first) * width);
    rect.setAttribute("y", 120 - height);
    rect.setAttribute("width", Math.max(width - 1, 1));
    rect.setAttribute("height", height);
    const low = Math.pow(10, -3 + (6 * b) / bins);
    rect.innerHTML = "<title>" + number(low, 2) + " to " + number(low * Math.pow(10, 6 / bins), 2) + ": " + counts[b] + "</title>";
    svg.appendChild(rect);
  }
  for (const [b, anchor] of [[first, "start"], [last + 1, "end"]]) {
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    label.setAttribute("x", (b - first) * width);
    label.setAttribute("y", 136);
    label.setAttribute("font-size", "11");
    label.setAttribute("text-anchor", anchor);
    label.textContent = number(Math.pow(10, -3 + (6 * b) / bins), 2);
    svg.appendChild(label);
  }
  return svg;
}

function contextLine(context) {
  const peak = Math.max(...context.acts, 1e-12);
  const spans = context.tokens.map((id, t) => {
    const share = Math.max(context.acts[t], 0) / peak;
    return el("span", {
      class: t === context.at ? "fired" : "",
      title: "activation " + number(context.acts[t]),
      style: "background: rgba(255, 120, 0, " + (0.85 * share).toFixed(3) + ")",
    }, token(id));
  });
  return el("div", { class: "context" }, el("span", { class: "value" }, number(context.value)), ...spans);
}

function tokenList(ids, logits) {
  return el("div", {}, ...ids.map((id, j) => el("span", { class: "tok", title: "logit " + number(logits[j]) }, token(id))));
}

async function renderLatent(m, i) {
  nav("m" + m);
  const file = "m" + m + "_" + Math.floor(i / MFR.run.latents_per_file);
  if (!MFR.details[file]) await loadScript("data/latents/" + file + ".js");
  const detail = MFR.details[file][i % MFR.run.latents_per_file];
  const data = MFR.members[m];
  const matches = others(m).map((o) => el("li", {},
    el("a", { href: latentHref(o, data.match[o][i]) }, "member " + members()[o].id + ", latent " + data.match[o][i]),
    " at cosine " + number(data.best[o][i])));
  const shared = agreement(m, i) >= MFR.run.shared_cosine;
  view.replaceChildren(
    el("h2", { id: "latent-title" }, "Member " + members()[m].id + ", latent " + i + (shared ? " (shared by all members)" : "")),
    el("p", {}, "fires on " + number(100 * data.frequency[i]) + "% of tokens; mean activation " + number(data.mean[i]) +
      ", max " + number(data.max[i])),
    el("div", { class: "panels" },
      el("div", { class: "panel" }, el("h3", {}, "Best match in each other member"), el("ul", { id: "matches" }, ...matches)),
      el("div", { class: "panel", id: "histogram" }, el("h3", {}, "Non-zero activations"), histogram(detail.histogram)),
      el("div", { class: "panel" }, el("h3", {}, "Promotes"), tokenList(detail.promoted, detail.promoted_logits),
        el("h3", {}, "Suppresses"), tokenList(detail.suppressed, detail.suppressed_logits))),
    el("h3", {}, "Top activating contexts"),
    el("div", { id: "contexts" }, ...(detail.contexts.length ? detail.contexts.map(contextLine) : [el("p", {}, "never fired")])));
}

// ------------------------------------------------------------------ what the members share

function renderSummary() {
  nav("summary");
  const run = MFR.run;
  const rows = members().map((member, m) => el("tr", {}, el("td", { class: "text" }, "member " + member.id + " (k " + member.k + ")"),
    el("td", {}, number(100 * member.shared) + "%"),
    el("td", {}, run.baseline ? number(100 * run.baseline.shared[m]) + "%" : "")));
  view.replaceChildren(
    el("h2", {}, "Latents shared by all members"),
    el("p", {}, "A latent is shared when its best match in every other member is at cosine " + run.shared_cosine +
      " or more." + (run.baseline ? " Baseline: " + run.baseline.run : " Build with --baseline RUN to compare.")),
    el("div", { class: "table-wrap" }, el("table", { id: "summary-table" },
      el("thead", {}, el("tr", {}, el("th", { class: "text" }, "member"), el("th", {}, "shared, this run"), el("th", {}, "shared, baseline"))),
      el("tbody", {}, ...rows))),
    el("p", {}, el("img", { class: "figure", src: "summary.png", alt: "distribution of each latent's agreement" })));
}

async function route() {
  document.getElementById("run-name").textContent = MFR.run.run;
  const hash = location.hash.slice(1);
  const latent = hash.match(/^m(\d+)\/l(\d+)$/);
  const member = hash.match(/^m(\d+)$/);
  try {
    if (hash === "summary") renderSummary();
    else if (latent) await renderLatent(Number(latent[1]), Number(latent[2]));
    else renderIndex(member ? Number(member[1]) : state.member);
  } catch (error) {
    view.replaceChildren(el("p", {}, String(error)));
  }
  window.scrollTo(0, 0);
}

(async function start() {
  await Promise.all(members().map((_, m) => loadScript("data/member" + m + ".js")));
  window.addEventListener("hashchange", route);
  await route();
})();
