// A run's page: polls ../api/v1/runs/<run>/history, asking only for the steps it lacks, and
// draws the groups' norms and the seeds' ratios (chart.js). Names are text, never markup.
"use strict";

(() => {
  const POLL_MS = 1000;
  const $ = (id) => document.getElementById(id);

  // The run's name: /runs/<percent-encoded name>, or /runs/?run=<name> (for "." and "..",
  // which a browser folds out of a path).
  function runName() {
    const q = new URLSearchParams(location.search).get("run");
    if (q !== null) return q;
    const tail = location.pathname.split("/").pop();
    try {
      return decodeURIComponent(tail);
    } catch {
      return tail;
    }
  }

  const run = runName();
  const api = `../api/v1/runs/${encodeURIComponent(run)}/history`;
  document.title = `${run} - esper-telemetryd`;
  $("run").textContent = run;

  // name -> {name, role, params, color, xs, ys, rx, ry, bands, nonfinite:Set, violations:Set,
  //          spikes, stale, inconsistent, hidden}
  const groups = new Map();
  let order = [];
  let lastStep = null;
  let ended = false;
  let updated = 0;
  let errorText = "";
  let nextColor = 0;

  const norms = new EsperChart.Chart($("norms"), $("norms-readout"), {
    empty: "waiting for steps",
  });
  const ratios = new EsperChart.Chart($("ratios"), $("ratios-readout"), {
    reference: 1,
    empty: "no seed/host ratios (needs a host and seeds)",
  });

  // Keep the points after our last one; drop the ones the daemon folded (before ``first``).
  // Returns whether anything changed.
  function merge(xs, ys, pts, first) {
    const n = xs.length;
    const last = n ? xs[n - 1] : -Infinity;
    for (const [s, v] of pts) {
      if (s > last) {
        xs.push(s);
        ys.push(v);
      }
    }
    let k = 0;
    if (first !== null) while (k < xs.length && xs[k] < first) k++;
    if (k) {
      xs.splice(0, k);
      ys.splice(0, k);
    }
    return xs.length !== n || k > 0;
  }

  // Returns whether the charts must be drawn again.
  function apply(doc) {
    const replace = doc.since === null;
    let changed = replace;
    const seen = new Set();
    for (const g of doc.groups) {
      seen.add(g.name);
      let s = groups.get(g.name);
      if (!s || replace) {
        s = {
          name: g.name,
          color: s ? s.color : EsperChart.color(nextColor++, g.role),
          xs: [],
          ys: [],
          rx: [],
          ry: [],
          bands: [],
          nonfinite: new Set(),
          violations: new Set(),
          hidden: s ? s.hidden : false,
        };
        groups.set(g.name, s);
        changed = true;
      }
      s.role = g.role;
      s.params = g.params;
      s.spikes = g.spikes;
      s.stale = g.stale;
      s.inconsistent = g.inconsistent;
      if (merge(s.xs, s.ys, g.points, g.first_step)) changed = true;
      if (g.ratio && merge(s.rx, s.ry, g.ratio, g.first_step)) changed = true;
      const bands = s.bands.length;
      if (g.folded.length) {
        // The bucket still filling comes again each time: a change only if it grew.
        const from = g.folded[0][0];
        const held = s.bands.filter((b) => b[0] >= from);
        const same = (a, b) => a.length === 4 && a.every((v, i) => v === b[i]);
        if (held.length !== g.folded.length || !held.every((b, i) => same(b, g.folded[i]))) {
          s.bands = s.bands.filter((b) => b[0] < from).concat(g.folded);
          changed = true;
        }
      }
      if (g.folded_from !== null) s.bands = s.bands.filter((b) => b[0] >= g.folded_from);
      if (s.bands.length !== bands) changed = true;
      const oldest = s.bands.length ? s.bands[0][0] : s.xs.length ? s.xs[0] : -Infinity;
      const marks = s.nonfinite.size + s.violations.size;
      for (const t of g.nonfinite) s.nonfinite.add(t);
      for (const t of g.violations) s.violations.add(t);
      for (const set of [s.nonfinite, s.violations]) {
        for (const t of set) if (t < oldest) set.delete(t);
      }
      if (s.nonfinite.size + s.violations.size !== marks) changed = true;
    }
    for (const name of [...groups.keys()]) {
      if (!seen.has(name)) {
        groups.delete(name);
        changed = true;
      }
    }
    const names = doc.groups.map((g) => g.name);
    if (names.join("\u0000") !== order.join("\u0000")) changed = true;
    order = names;
    lastStep = doc.last_step;
    ended = doc.ended;
    return changed;
  }

  // What to ask for next: the points after the last step every group that keeps up holds
  // (a group 64 steps behind the rest does not hold the others back), and the folded
  // buckets from the one each group is still filling.
  function query() {
    if (!groups.size || lastStep === null) return "";
    const lasts = [...groups.values()].map((s) => (s.xs.length ? s.xs[s.xs.length - 1] : -1));
    const top = Math.max(...lasts);
    const since = Math.min(...lasts.filter((l) => l >= top - 64));
    const fills = [...groups.values()].map((s) =>
      s.bands.length ? s.bands[s.bands.length - 1][0] - 1 : -1
    );
    return `?since=${since}&folded_since=${Math.min(...fills)}`;
  }

  // The charts (when ``charts``: new data, or a group hidden or shown), the legend, the status.
  function render(charts = true) {
    const list = order.map((n) => groups.get(n)).filter(Boolean);
    legend(list);
    status(list);
    if (!charts) return;
    const seeds = list.filter((s) => s.rx.length);
    norms.set(
      list.map((s) => ({
        name: s.name,
        color: s.color,
        xs: s.xs,
        ys: s.ys,
        bands: s.bands,
        hidden: s.hidden,
      })),
      [
        { steps: union(list, "nonfinite"), color: "#cf222e" },
        { steps: union(list, "violations"), color: "#bc4c00", dash: [4, 3] },
      ]
    );
    ratios.set(
      seeds.map((s) => ({ name: s.name, color: s.color, xs: s.rx, ys: s.ry, hidden: s.hidden })),
      [{ steps: union(seeds, "nonfinite"), color: "#cf222e" }],
      norms.span() // one step axis for both charts
    );
  }

  function union(list, key) {
    const out = new Set();
    for (const s of list) if (!s.hidden) for (const t of s[key]) out.add(t);
    return [...out].sort((a, b) => a - b);
  }

  function legend(list) {
    const box = $("legend");
    const items = new Map([...box.children].map((el) => [el.dataset.group, el]));
    list.forEach((s, i) => {
      let el = items.get(s.name);
      if (!el) {
        el = document.createElement("li");
        el.dataset.group = s.name;
        const sw = document.createElement("span");
        sw.className = "swatch";
        const name = document.createElement("span");
        name.className = "name";
        const value = document.createElement("span");
        value.className = "value";
        el.append(sw, name, value);
        el.title = "click to hide or show";
        el.addEventListener("click", () => {
          const g = groups.get(el.dataset.group);
          if (g) {
            g.hidden = !g.hidden;
            render();
          }
        });
      }
      items.delete(s.name);
      if (box.children[i] !== el) box.insertBefore(el, box.children[i] || null);
      el.children[0].style.background = s.color;
      el.children[1].textContent = `${s.name} (${s.role})`;
      const v = s.ys.length ? s.ys[s.ys.length - 1] : null;
      const lastNonfinite = s.xs.length && s.nonfinite.has(s.xs[s.xs.length - 1]);
      const flags = [];
      if (s.stale) flags.push("stale");
      if (s.inconsistent) flags.push(`inconsistent: ${s.inconsistent}`);
      if (s.violations.size) flags.push(`${s.violations.size} violation steps`);
      if (s.nonfinite.size) flags.push(`${s.nonfinite.size} non-finite`);
      if (s.spikes) flags.push(`${s.spikes} spikes`);
      const r = s.ry.length ? `  ratio ${EsperChart.formatValue(s.ry[s.ry.length - 1])}` : "";
      el.children[2].textContent =
        (lastNonfinite ? "non-finite" : EsperChart.formatValue(v)) +
        r +
        (flags.length ? `  [${flags.join(", ")}]` : "");
      el.dataset.points = String(s.xs.length);
      el.classList.toggle("hidden", !!s.hidden);
      el.classList.toggle("bad", s.violations.size > 0 || s.nonfinite.size > 0 || !!s.stale);
    });
    for (const el of items.values()) el.remove();
  }

  function status(list) {
    const el = $("status");
    const age = updated ? ((Date.now() - updated) / 1000).toFixed(0) : null;
    const parts = [];
    if (lastStep !== null) parts.push(`step ${lastStep}`);
    parts.push(`${list.length} groups`);
    if (ended) parts.push("ended");
    if (age !== null) parts.push(`updated ${age}s ago`);
    if (errorText) parts.push(errorText);
    el.textContent = parts.join(" · ");
    el.classList.toggle("error", !!errorText);
    document.body.dataset.lastStep = lastStep === null ? "" : String(lastStep);
  }

  async function poll() {
    try {
      const resp = await fetch(api + query(), { cache: "no-store" });
      if (resp.status === 404) {
        errorText = "this daemon does not hold the run (not started yet, or expired); retrying";
      } else if (!resp.ok) {
        errorText = `the daemon answered HTTP ${resp.status}; retrying`;
      } else {
        const doc = await resp.json();
        const started = performance.now();
        const changed = apply(doc);
        updated = Date.now();
        errorText = "";
        render(changed);
        document.body.dataset.applyMs = (performance.now() - started).toFixed(1);
      }
    } catch (e) {
      errorText = "cannot reach the daemon; retrying";
    }
    status(order.map((n) => groups.get(n)).filter(Boolean));
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
