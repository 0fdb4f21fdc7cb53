// forkllm's page: chat over /v1/chat/completions, and a live view of the request's generation
// tree drawn from the `tree_event` chunks the server streams with "tree_events": true
// (forkllm/server/tree_events.py). Nothing is reconstructed afterwards: every node, fork, prune,
// score and vote on screen is an event the engine reported. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

const state = {
  key: localStorage.getItem("forkllm-key") || "",
  model: null,
  history: [], // [{role, content}] of the conversation so far
  controller: null,
};

// ---- the server ---------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorOf(resp) {
  let text = await resp.text();
  try {
    const e = JSON.parse(text).error || {};
    text = e.message || text;
    if (e.param) text += ` (${e.param})`;
  } catch (_) { /* not JSON: show as is */ }
  return `${resp.status}: ${text}`;
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    dialog.hidden = false;
    $("key-input").value = state.key;
    $("key-input").focus();
    $("key-form").onsubmit = (ev) => {
      ev.preventDefault();
      state.key = $("key-input").value.trim();
      localStorage.setItem("forkllm-key", state.key);
      dialog.hidden = true;
      resolve();
    };
  });
}

// fetch, asking for the API key (once) when the server says it needs one
async function call(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const resp = await fetch(path, { ...options, headers: headers() });
    if (resp.status !== 401 || attempt > 0) return resp;
    await askKey();
  }
}

async function loadModel() {
  const resp = await call("/v1/models");
  if (!resp.ok) { $("model").textContent = await errorOf(resp); return; }
  const data = await resp.json();
  state.model = data.data[0].id;
  $("model").textContent = state.model;
}

// yields each JSON chunk of an SSE response
async function* chunks(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---- the request --------------------------------------------------------------------------------
function num(id) { const v = $(id).value; return v === "" ? null : Number(v); }

function requestBody(messages) {
  const strategy = $("strategy").value;
  const body = {
    model: state.model, messages, stream: true, tree_events: true,
    max_tokens: num("max-tokens"), temperature: num("temperature"),
    stream_options: { include_usage: true },
  };
  // top-p applies to plain sampling, voting and threads (beam search and particles sample at 1)
  if (num("top-p") !== 1 && !["beam_search", "particle_filter"].includes(strategy)) body.top_p = num("top-p");
  const seed = num("seed");
  if (seed !== null) body.seed = seed;
  const n = num("n") || 1;
  if (strategy === "plain") {
    body.n = n;
  } else if (strategy === "threads") {
    const prompts = $("thread-prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
    body.threads = { fanout: prompts, max_tokens: body.max_tokens };
  } else {
    const spec = { strategy, max_tokens: body.max_tokens };
    if (strategy === "beam_search") {
      spec.width = num("width"); spec.expand = num("expand"); spec.max_step_tokens = num("step-tokens");
    } else if (strategy === "particle_filter") {
      spec.n = n; spec.max_step_tokens = num("step-tokens");
    } else {
      spec.n = n;
    }
    body.scaling = spec;
    delete body.max_tokens;
  }
  return body;
}

function showStrategyFields() {
  const s = $("strategy").value;
  for (const el of document.querySelectorAll("#settings [data-for]")) {
    el.hidden = !el.dataset.for.split(" ").includes(s);
  }
  if (s !== "plain" && num("n") === 1) $("n").value = 4;
}

// ---- the chat log -------------------------------------------------------------------------------
function addMessage(role, text, cls = "") {
  const el = document.createElement("div");
  el.className = `msg ${role} ${cls}`;
  el.innerHTML = `<div class="who"></div><div class="body"></div>`;
  el.querySelector(".who").textContent = role;
  el.querySelector(".body").textContent = text;
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return el;
}

// an assistant turn: one column per choice (n samples side by side), or per thread
function assistantView() {
  const el = addMessage("assistant", "");
  const body = el.querySelector(".body");
  body.classList.remove("body");
  body.classList.add("samples");
  const cols = new Map();
  const meta = document.createElement("div");
  meta.className = "meta";
  el.appendChild(meta);
  return {
    el, meta,
    column(key, tag) {
      if (!cols.has(key)) {
        const c = document.createElement("div");
        c.className = "sample";
        c.dataset.key = key;
        c.innerHTML = `<span class="tag"></span><span class="text"></span>`;
        c.querySelector(".tag").textContent = tag;
        body.appendChild(c);
        cols.set(key, c);
      }
      return cols.get(key);
    },
    append(key, tag, text) {
      const c = this.column(key, tag);
      c.querySelector(".text").textContent += text;
      $("log").scrollTop = $("log").scrollHeight;
    },
    text(key) { return cols.has(key) ? cols.get(key).querySelector(".text").textContent : ""; },
  };
}

async function send(ev) {
  ev && ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  const view = assistantView();
  tree.reset();
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  const started = performance.now();
  const plainN = $("strategy").value === "plain" ? num("n") || 1 : 1;
  const tagOf = (i) => (plainN > 1 ? `sample ${i}` : "answer");
  let answer = "", usage = null;
  try {
    const resp = await call("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(requestBody(messages)), signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    for await (const chunk of chunks(resp)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.tree_event) tree.event(chunk.tree_event);
      if (chunk.thread_event) {
        const t = chunk.thread_event;
        if (t.event === "delta" && t.thread > 0) view.append("t" + t.thread, `thread ${t.thread}`, t.text);
      }
      for (const choice of chunk.choices || []) {
        const content = choice.delta && choice.delta.content;
        if (content) view.append("c" + choice.index, tagOf(choice.index), content);
      }
      if (chunk.scaling) tree.decided(chunk.scaling, view);
      if (chunk.usage) usage = chunk.usage;
    }
    answer = view.text("c0");
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    const secs = (performance.now() - started) / 1000;
    let meta = usage
      ? `${usage.completion_tokens} tokens in ${secs.toFixed(1)} s (${(usage.completion_tokens / secs).toFixed(1)} tok/s)`
      : `${secs.toFixed(1)} s`;
    if (view.scaling) {
      meta += ` · the server counted ${view.scaling.forks} forks, ${view.scaling.prunes} prunes`;
      view.meta.dataset.forks = view.scaling.forks;
      view.meta.dataset.prunes = view.scaling.prunes;
    }
    view.meta.textContent = meta;
  } catch (e) {
    view.el.remove();
    if (e.name === "AbortError") addMessage("assistant", "stopped", "error");
    else addMessage("error", String(e.message || e), "error");
  } finally {
    state.controller = null;
    $("send").disabled = false; $("stop").disabled = true;
    tree.render();
  }
}

// ---- the tree -----------------------------------------------------------------------------------
const tree = {
  reset() {
    this.nodes = new Map();
    this.order = [];
    this.forks = this.prunes = 0;
    this.pages = 0;
    this.generated = 0;
    this.rate = null;
    this.lastProgress = null;
    this.chosen = null;
    this.votes = null;
    $("votes").innerHTML = "";
    this.render();
  },

  node(id) { return this.nodes.get(id); },

  event(ev) {
    let n = ev.seq ? this.node(ev.seq) : null;
    switch (ev.kind) {
      case "root":
      case "fork":
        n = { id: ev.seq, parent: ev.parent || null, start: ev.start || 0, status: "running", children: [] };
        this.nodes.set(n.id, n);
        this.order.push(n.id);
        if (n.parent && this.node(n.parent)) this.node(n.parent).children.push(n.id);
        if (ev.kind === "fork") this.forks++;
        break;
      case "pause": if (n) n.status = "paused"; break;
      case "resume": if (n) n.status = "running"; break;
      case "join": if (n) { n.status = "joined"; n.into = ev.parent; } break;
      case "prune": if (n) { n.status = "pruned"; n.reason = ev.reason; } this.prunes++; break;
      case "finish": if (n && n.status !== "joined") { n.status = "finished"; n.reason = ev.reason; } break;
      case "score": if (n) n.score = ev.value; break;
      case "vote": if (n) n.vote = ev.data ? ev.data.answer : null; break;
      case "progress": this.progress(ev); break;
      case "done": this.done = true; break;
    }
    if (n) {
      n.tokens = ev.tokens;
      // a score or vote may come after the sequence ended and gave its pages back
      if (!["score", "vote"].includes(ev.kind)) { n.pages = ev.pages; n.shared = ev.shared; }
    }
    this.schedule();
  },

  progress(ev) {
    const d = ev.data || {};
    for (const [id, [tokens, pages, shared]] of Object.entries(d.seqs || {})) {
      const n = this.node(id);
      if (n) { n.tokens = tokens; n.pages = pages; n.shared = shared; }
    }
    this.pages = d.pages || 0;
    if (this.lastProgress && ev.t > this.lastProgress.t) {
      const r = (d.generated - this.lastProgress.generated) / (ev.t - this.lastProgress.t);
      this.rate = this.rate === null ? r : 0.6 * this.rate + 0.4 * r;
    }
    this.lastProgress = { t: ev.t, generated: d.generated };
    this.generated = d.generated;
  },

  // the strategy's result: the chosen sequence and the votes
  decided(scaling, view) {
    this.chosen = scaling.chosen;
    view.scaling = scaling;
    this.votes = scaling.votes;
    view.column("c0").querySelector(".tag").textContent = `answer (${scaling.strategy})`;
    view.column("c0").classList.add("chosen");
    this.render();
  },

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  },

  rows() {
    const rows = [];
    const visit = (id, depth) => {
      const n = this.node(id);
      rows.push({ n, depth });
      for (const c of n.children) visit(c, depth + 1);
    };
    for (const id of this.order) if (!this.node(id).parent) visit(id, 0);
    return rows;
  },

  onPath() {
    const path = new Set();
    for (let id = this.chosen; id && this.node(id); id = this.node(id).parent) path.add(id);
    return path;
  },

  render() {
    const svg = $("tree");
    svg.replaceChildren();
    const rows = this.nodes ? this.rows() : [];
    const box = $("tree-box");
    const rowH = 20, top = 26, left = 14, labelW = 230;
    const width = Math.max(360, box.clientWidth - 4);
    const plotW = width - left - labelW;
    const maxTok = Math.max(8, ...rows.map((r) => r.n.tokens || 0));
    const x = (t) => left + (plotW * t) / maxTok;
    svg.setAttribute("width", width);
    svg.setAttribute("height", top + rows.length * rowH + 10);
    const el = (tag, attrs, parent = svg) => {
      const e = document.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      parent.appendChild(e);
      return e;
    };
    el("text", { x: left, y: 14, class: "axis" }).textContent = "0";
    el("text", { x: x(maxTok), y: 14, class: "axis", "text-anchor": "end" }).textContent = `${maxTok} tokens`;
    const rowOf = new Map(rows.map((r, i) => [r.n.id, i]));
    const path = this.onPath();
    rows.forEach(({ n }, i) => {
      const y = top + i * rowH;
      const leaf = n.status === "finished";
      const g = el("g", {
        class: `node ${n.status}${leaf ? " leaf" : ""}${path.has(n.id) ? " on-path" : ""}`,
        "data-seq": n.id, "data-status": n.status,
      });
      if (n.vote !== undefined && n.vote !== null) g.setAttribute("data-vote", n.vote);
      if (n.parent && rowOf.has(n.parent)) {
        const py = top + rowOf.get(n.parent) * rowH;
        el("path", { class: "link", d: `M${x(n.start)},${py + 5} V${y + 5} H${x(n.start) + 2}` }, g);
      }
      const x0 = x(n.start), x1 = Math.max(x(n.tokens || 0), x0 + 2);
      // the part inherited from the parent is shared; draw the sequence's own tokens solid
      el("rect", { class: `bar ${n.status}`, x: x0, y, width: x1 - x0, height: 10, rx: 2 }, g);
      if (path.has(n.id) && n.id === this.chosen) {
        el("rect", { class: "halo", x: x0 - 2, y: y - 2, width: x1 - x0 + 4, height: 14, rx: 3 }, g);
      }
      const bits = [`${n.id.split(":").pop() === n.id ? "root" : "#" + n.id.split(":").pop()}`, `${n.tokens || 0}t`];
      if (n.pages !== undefined) bits.push(`${n.pages - n.shared}+${n.shared}p`);
      if (n.score !== undefined && n.score !== null) bits.push(`s=${Number(n.score).toFixed(2)}`);
      if (n.vote !== undefined) bits.push(`vote ${n.vote === null ? "—" : n.vote}`);
      if (n.status === "pruned") bits.push("✂");
      el("text", { x: x1 + 6, y: y + 9 }, g).textContent = bits.join(" · ");
      el("title", {}, g).textContent =
        `${n.id} (${n.status}${n.reason ? ", " + n.reason : ""})\nparent ${n.parent || "—"}, forked at token ${n.start}\n` +
        `${n.tokens || 0} output tokens; KV pages ${n.pages || 0} (${n.shared || 0} shared with other branches)`;
    });
    const live = rows.filter((r) => ["running", "paused"].includes(r.n.status)).length;
    const unshared = rows.filter((r) => ["running", "paused"].includes(r.n.status))
      .reduce((s, r) => s + (r.n.pages || 0), 0);
    const stats = [`${rows.length} sequences`, `${this.forks || 0} forks`, `${this.prunes || 0} prunes`, `${live} live`];
    const box2 = $("tree-stats");
    box2.dataset.forks = this.forks || 0;
    box2.dataset.prunes = this.prunes || 0;
    if (live) stats.push(`KV pages ${this.pages} (${unshared} unshared)`);
    if (this.rate !== null && this.rate !== undefined && live) stats.push(`${this.rate.toFixed(0)} tok/s`);
    $("tree-stats").textContent = stats.join(" · ");
    $("status").textContent = this.generated ? `${this.generated} tokens generated` : "";
    this.renderVotes(rows);
  },

  renderVotes(rows) {
    let votes = this.votes;
    if (!votes) {
      votes = {};
      for (const { n } of rows) if (n.vote !== undefined && n.vote !== null) votes[n.vote] = (votes[n.vote] || 0) + 1;
    }
    const entries = Object.entries(votes);
    if (!entries.length) { $("votes").innerHTML = ""; return; }
    const max = Math.max(...entries.map(([, v]) => v));
    const table = document.createElement("table");
    for (const [answer, v] of entries) {
      const tr = table.insertRow();
      tr.className = "vote";
      tr.dataset.answer = answer;
      tr.dataset.votes = v;
      tr.insertCell().textContent = answer;
      tr.insertCell().textContent = Number.isInteger(v) ? v : v.toFixed(2);
      const bar = tr.insertCell();
      bar.className = "barcell";
      bar.innerHTML = `<span style="width:${Math.round((100 * v) / max)}px"></span>`;
    }
    $("votes").replaceChildren(Object.assign(document.createElement("b"), { textContent: "Votes" }), table);
  },
};

// ---- wiring -------------------------------------------------------------------------------------
$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) send(ev);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.history = []; $("log").innerHTML = ""; tree.reset(); });
$("strategy").addEventListener("change", showStrategyFields);
$("key-button").addEventListener("click", () => askKey().then(loadModel));
window.addEventListener("resize", () => tree.render());
showStrategyFields();
tree.reset();
loadModel();
