// esper-telemetryd's chart: values against the step on a logarithmic axis, on a <canvas>.
//
// One path per series (a group's norms or a seed's ratios), broken where a value is missing;
// older steps that the daemon folded into min/max buckets drawn as a band per series;
// vertical marks at given steps (non-finite gradients, isolation violations); a crosshair
// and a readout of the series nearest the pointer. Names reach the screen only through
// fillText and textContent, never as markup.
//
// The canvas carries what it drew, for tests and curious readers: data-series (series
// drawn), data-points (the fewest points of a drawn series), data-last-step (the largest
// step drawn), data-draws (times the chart was painted: new data or a new size; a hover
// only copies the painting), data-draw-ms (how long the latest painting took).
"use strict";

const EsperChart = (() => {
  const PAD = { left: 62, right: 14, top: 12, bottom: 30 };
  const FONT = "12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

  // Hues spread by the golden angle: neighbours in the legend differ, 128 groups stay apart.
  function color(i, role) {
    if (role === "host") return "#1f2328";
    const hue = (i * 137.508 + 200) % 360;
    return `hsl(${hue.toFixed(1)}, 68%, 42%)`;
  }

  function formatValue(v) {
    if (v === null || v === undefined) return "-";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(3);
    return v.toPrecision(4);
  }

  function tickLabel(v) {
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-2) {
      const e = Math.round(Math.log10(a));
      const m = a / Math.pow(10, e);
      return Math.abs(m - 1) < 1e-9 ? `1e${e}` : `${+m.toPrecision(2)}e${e}`;
    }
    return String(+v.toPrecision(3));
  }

  // Step ticks: 1, 2 or 5 times a power of ten, about every 90 px.
  function stepTicks(x0, x1, px) {
    const span = Math.max(1, x1 - x0);
    const raw = span / Math.max(1, px / 90);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw) || 10 * p;
    const out = [];
    for (let t = Math.ceil(x0 / step) * step; t <= x1; t += step) out.push(t);
    return out;
  }

  // Log ticks: each decade, with 2 and 5 when the range spans few decades.
  function logTicks(lo, hi) {
    const out = [];
    const d0 = Math.floor(Math.log10(lo));
    const d1 = Math.ceil(Math.log10(hi));
    const fine = d1 - d0 <= 3;
    for (let d = d0; d <= d1; d++) {
      for (const m of fine ? [1, 2, 5] : [1]) {
        const v = m * Math.pow(10, d);
        if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
      }
    }
    return out;
  }

  // The index of the point whose step is nearest ``x`` in the sorted ``xs``.
  function nearest(xs, x) {
    let lo = 0;
    let hi = xs.length - 1;
    if (hi < 0) return -1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (xs[mid] < x) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && Math.abs(xs[lo - 1] - x) <= Math.abs(xs[lo] - x)) return lo - 1;
    return lo;
  }

  class Chart {
    // canvas: the <canvas>; readout: an element the hover text goes into (textContent).
    constructor(canvas, readout, options = {}) {
      this.canvas = canvas;
      this.readout = readout;
      this.reference = options.reference ?? null; // a value drawn as a dashed line
      this.empty = options.empty || "no data yet";
      this.series = [];
      this.marks = [];
      this.steps = null;
      this.hover = null;
      this.frame = 0;
      this.draws = 0;
      this.box = null;
      // The chart is painted into ``base`` when the data or the size change; a frame copies
      // it and draws the hover on top, so moving the pointer never repaints 128 paths.
      this.base = document.createElement("canvas");
      this.dirty = true;
      canvas.addEventListener("mousemove", (e) => {
        const r = canvas.getBoundingClientRect();
        this.hover = { x: e.clientX - r.left, y: e.clientY - r.top };
        this.request(false);
      });
      canvas.addEventListener("mouseleave", () => {
        this.hover = null;
        this.request(false);
      });
      if (typeof ResizeObserver !== "undefined") {
        new ResizeObserver(() => this.request()).observe(canvas);
      }
    }

    // series: [{name, color, xs, ys, bands: [[first, last, lo, hi]], hidden}]
    // marks: [{steps: [..], color, dash}]
    // steps: [first, last] to show (charts stacked on one page share it); default: the data's
    set(series, marks, steps) {
      this.series = series;
      this.marks = marks || [];
      this.steps = steps || null;
      this.request();
    }

    // The steps the data spans: [first, last], or null.
    span() {
      let x0 = Infinity;
      let x1 = -Infinity;
      for (const s of this.series) {
        if (s.hidden) continue;
        if (s.xs.length) {
          x0 = Math.min(x0, s.xs[0]);
          x1 = Math.max(x1, s.xs[s.xs.length - 1]);
        }
        for (const b of s.bands || []) {
          x0 = Math.min(x0, b[0]);
          x1 = Math.max(x1, b[1]);
        }
      }
      return x0 <= x1 ? [x0, x1] : null;
    }

    request(repaint = true) {
      if (repaint) this.dirty = true;
      if (!this.frame) {
        this.frame = requestAnimationFrame(() => {
          this.frame = 0;
          this.draw();
        });
      }
    }

    domain() {
      let x0 = Infinity;
      let x1 = -Infinity;
      let y0 = Infinity;
      let y1 = -Infinity;
      for (const s of this.series) {
        if (s.hidden) continue;
        const { xs, ys } = s;
        if (xs.length) {
          x0 = Math.min(x0, xs[0]);
          x1 = Math.max(x1, xs[xs.length - 1]);
        }
        for (let i = 0; i < ys.length; i++) {
          const v = ys[i];
          if (v > 0 && v < Infinity) {
            if (v < y0) y0 = v;
            if (v > y1) y1 = v;
          }
        }
        for (const [a, b, lo, hi] of s.bands || []) {
          x0 = Math.min(x0, a);
          x1 = Math.max(x1, b);
          if (lo > 0 && lo < y0) y0 = lo;
          if (hi > 0 && hi > y1) y1 = hi;
        }
      }
      if (this.reference !== null && y0 <= y1) {
        y0 = Math.min(y0, this.reference);
        y1 = Math.max(y1, this.reference);
      }
      if (!(x0 <= x1)) return null;
      if (this.steps) [x0, x1] = this.steps;
      if (!(y0 <= y1)) {
        y0 = 1e-3;
        y1 = 1;
      }
      // At least one decade shown; a little room above and below.
      let l0 = Math.log10(y0);
      let l1 = Math.log10(y1);
      if (l1 - l0 < 1) {
        const mid = (l0 + l1) / 2;
        l0 = mid - 0.5;
        l1 = mid + 0.5;
      }
      const pad = (l1 - l0) * 0.04;
      if (x0 === x1) x1 = x0 + 1;
      return { x0, x1, l0: l0 - pad, l1: l1 + pad };
    }

    draw() {
      const t0 = performance.now();
      const canvas = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const cssW = canvas.clientWidth;
      const cssH = canvas.clientHeight;
      const w = Math.round(cssW * dpr);
      const h = Math.round(cssH * dpr);
      if (!w || !h) return; // not laid out (yet)
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = this.base.width = w;
        canvas.height = this.base.height = h;
        this.dirty = true;
      }
      if (this.dirty) {
        const started = performance.now();
        this.dirty = false;
        const bctx = this.base.getContext("2d");
        bctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        bctx.clearRect(0, 0, cssW, cssH);
        this.paint(bctx, cssW, cssH);
        canvas.dataset.drawMs = (performance.now() - started).toFixed(1);
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, w, h);
      ctx.drawImage(this.base, 0, 0);
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      this.drawHover(ctx);
      canvas.dataset.frameMs = (performance.now() - t0).toFixed(1);
    }

    paint(ctx, cssW, cssH) {
      const canvas = this.canvas;
      ctx.font = FONT;
      const W = cssW - PAD.left - PAD.right;
      const H = cssH - PAD.top - PAD.bottom;
      const d = this.domain();
      this.draws += 1;
      const drawn = this.series.filter((s) => !s.hidden);
      canvas.dataset.draws = String(this.draws);
      canvas.dataset.series = String(d ? drawn.length : 0);
      canvas.dataset.points = String(
        d && drawn.length ? Math.min(...drawn.map((s) => s.xs.length)) : 0
      );
      canvas.dataset.lastStep = d ? String(d.x1) : "";
      if (!d || W < 10 || H < 10) {
        this.box = null;
        ctx.fillStyle = "#6e7781";
        ctx.fillText(this.empty, PAD.left + 8, PAD.top + 20);
        return;
      }
      const sx = W / (d.x1 - d.x0);
      const sy = H / (d.l1 - d.l0);
      const X = (x) => PAD.left + (x - d.x0) * sx;
      const bottom = PAD.top + H;
      const Y = (v) => (v > 0 ? PAD.top + (d.l1 - Math.log10(v)) * sy : bottom);
      this.box = { d, X, Y, W, H, sx };

      // Grid and axes.
      ctx.strokeStyle = "#eaeef2";
      ctx.fillStyle = "#57606a";
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (const v of logTicks(Math.pow(10, d.l0), Math.pow(10, d.l1))) {
        const y = Math.round(Y(v)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(PAD.left, y);
        ctx.lineTo(PAD.left + W, y);
        ctx.stroke();
        ctx.fillText(tickLabel(v), PAD.left - 6, y);
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      for (const t of stepTicks(d.x0, d.x1, W)) {
        const x = Math.round(X(t)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(x, PAD.top);
        ctx.lineTo(x, bottom);
        ctx.stroke();
        ctx.fillText(String(t), x, bottom + 6);
      }
      ctx.strokeStyle = "#afb8c1";
      ctx.strokeRect(PAD.left + 0.5, PAD.top + 0.5, W, H);

      ctx.save();
      ctx.beginPath();
      ctx.rect(PAD.left, PAD.top, W, H);
      ctx.clip();
      if (this.reference !== null) {
        ctx.setLineDash([6, 4]);
        ctx.strokeStyle = "#8c959f";
        ctx.beginPath();
        const y = Y(this.reference);
        ctx.moveTo(PAD.left, y);
        ctx.lineTo(PAD.left + W, y);
        ctx.stroke();
        ctx.setLineDash([]);
      }
      // Folded steps: one filled path of min/max boxes per series.
      ctx.globalAlpha = 0.22;
      for (const s of drawn) {
        if (!s.bands || !s.bands.length) continue;
        ctx.fillStyle = s.color;
        ctx.beginPath();
        for (const [a, b, lo, hi] of s.bands) {
          if (lo === null || hi === null) continue;
          const x = X(a);
          const y = Y(hi);
          ctx.rect(x, y, Math.max(1, X(b) - x), Math.max(1, Y(lo) - y));
        }
        ctx.fill();
      }
      ctx.globalAlpha = 1;
      // Lines: one path per series, broken at a missing value.
      ctx.lineWidth = 1;
      ctx.lineJoin = "bevel";
      for (const s of drawn) {
        const { xs, ys } = s;
        ctx.strokeStyle = s.color;
        ctx.beginPath();
        let pen = false;
        for (let i = 0; i < xs.length; i++) {
          const v = ys[i];
          if (v === null || !(v < Infinity)) {
            pen = false;
            continue;
          }
          const x = X(xs[i]);
          const y = Y(v);
          if (pen) ctx.lineTo(x, y);
          else {
            ctx.moveTo(x, y);
            ctx.lineTo(x + 0.5, y); // a lone point stays visible
            pen = true;
          }
        }
        ctx.stroke();
      }
      // Marks: a vertical line and a triangle on top at each step.
      for (const m of this.marks) {
        if (!m.steps.length) continue;
        ctx.strokeStyle = m.color;
        ctx.fillStyle = m.color;
        ctx.lineWidth = 1.5;
        ctx.setLineDash(m.dash || []);
        ctx.beginPath();
        for (const t of m.steps) {
          if (t < d.x0 || t > d.x1) continue;
          const x = Math.round(X(t)) + 0.5;
          ctx.moveTo(x, PAD.top);
          ctx.lineTo(x, bottom);
        }
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.beginPath();
        for (const t of m.steps) {
          if (t < d.x0 || t > d.x1) continue;
          const x = X(t);
          ctx.moveTo(x - 5, PAD.top);
          ctx.lineTo(x + 5, PAD.top);
          ctx.lineTo(x, PAD.top + 8);
          ctx.closePath();
        }
        ctx.fill();
      }
      ctx.restore();
    }

    drawHover(ctx) {
      const drawn = this.series.filter((s) => !s.hidden);
      const h = this.hover;
      const box = this.box;
      if (!h || !box || h.x < PAD.left || h.x > PAD.left + box.W) {
        if (this.readout) this.readout.textContent = "";
        return;
      }
      const { d, X, Y } = box;
      const step = d.x0 + (h.x - PAD.left) / box.sx;
      let best = null;
      for (const s of drawn) {
        const i = nearest(s.xs, step);
        if (i < 0) continue;
        const v = s.ys[i];
        if (v === null || !(v < Infinity)) continue;
        const dist = Math.abs(Y(v) - h.y) + Math.abs(X(s.xs[i]) - h.x) * 0.25;
        if (!best || dist < best.dist) best = { s, i, v, dist };
      }
      ctx.strokeStyle = "rgba(31,35,40,0.35)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(Math.round(h.x) + 0.5, PAD.top);
      ctx.lineTo(Math.round(h.x) + 0.5, PAD.top + box.H);
      ctx.stroke();
      if (!best) {
        if (this.readout) this.readout.textContent = `step ${Math.round(step)}`;
        return;
      }
      const x = X(best.s.xs[best.i]);
      const y = Y(best.v);
      ctx.fillStyle = best.s.color;
      ctx.beginPath();
      ctx.arc(x, y, 4, 0, 2 * Math.PI);
      ctx.fill();
      if (this.readout) {
        this.readout.textContent = `step ${best.s.xs[best.i]}  ${best.s.name}: ${formatValue(best.v)}`;
      }
    }
  }

  return { Chart, color, formatValue };
})();
