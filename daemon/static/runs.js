// The daemon's landing page: its runs and their health, polled from api/v1/runs every 2 s;
// each run links to its page. Names are text, never markup.
"use strict";

(() => {
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);

  function age(s) {
    if (s === null) return "-";
    if (s < 10) return `${s.toFixed(1)}s`;
    if (s < 60) return `${s.toFixed(0)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  // "." and ".." cannot be path segments (a browser folds them away): those go in the query.
  function href(name) {
    if (name === "." || name === "..") return `runs/?run=${encodeURIComponent(name)}`;
    return `runs/${encodeURIComponent(name)}`;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
    return td;
  }

  function render(doc) {
    const body = $("runs");
    const rows = [];
    for (const r of doc.runs) {
      const tr = document.createElement("tr");
      tr.dataset.run = r.run;
      const a = document.createElement("a");
      a.href = href(r.run);
      a.textContent = r.run;
      a.dataset.run = r.run;
      const first = document.createElement("td");
      first.append(a);
      tr.append(first);
      cell(tr, r.last_step === null ? "-" : String(r.last_step), "num");
      cell(tr, String(r.groups), "num");
      const v = cell(tr, r.violated_groups.length ? `${r.violations} (now: ${r.violated_groups.join(", ")})` : String(r.violations), "num");
      cell(tr, String(r.nonfinite), "num");
      cell(tr, r.stale_groups.length ? r.stale_groups.join(", ") : "-");
      cell(tr, String(r.dropped + r.lost_messages), "num");
      cell(tr, r.ended ? `ended ${age(r.age_seconds)} ago` : age(r.age_seconds), "num");
      v.classList.toggle("bad", r.violated_groups.length > 0);
      tr.classList.toggle("bad", r.violated_groups.length > 0);
      tr.classList.toggle("warn", r.nonfinite > 0 || r.stale_groups.length > 0);
      tr.classList.toggle("ended", r.ended);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $("empty").hidden = doc.runs.length > 0;
    $("status").textContent = `${doc.runs.length} runs · updated ${new Date().toLocaleTimeString()}`;
    $("status").classList.remove("error");
  }

  async function poll() {
    try {
      const resp = await fetch("api/v1/runs", { cache: "no-store" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      render(await resp.json());
    } catch (e) {
      $("status").textContent = `cannot read the runs (${e.message}); retrying`;
      $("status").classList.add("error");
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
