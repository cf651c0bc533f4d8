// Line charts drawn as SVG in the page: series of (x, y) points, each optionally with a band
// (x, low, high) drawn beneath it. Colours and sizes are SVG attributes (no inline styles).

import { el } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const PALETTE = ['#2f5fd0', '#d0542f', '#1f8a4c', '#8e44ad', '#b7791f', '#16a2b8', '#c0392b', '#5d6d7e', '#e67e22', '#2c3e50'];
const WIDTH = 560;
const HEIGHT = 260;
const MARGIN = { left: 56, right: 12, top: 10, bottom: 30 };

function svg(tag, attrs = {}) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

/** About five round tick values spanning [low, high]. */
function ticks(low, high) {
  const span = high - low || Math.abs(high) || 1;
  const raw = span / 5;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(value) {
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-2 || magnitude >= 1e4)) return value.toExponential(1);
  return Number(value.toPrecision(3)).toString();
}

/** A chart: `draw(series)` redraws it; each series is {name, points: [[x, y]], band?: [[x, lo, hi]]}. */
export class LineChart {
  constructor(title, xLabel = 'epoch') {
    this.xLabel = xLabel;
    this.plot = svg('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: WIDTH, height: HEIGHT, role: 'img' });
    this.legend = el('div', { class: 'legend' });
    this.node = el('div', { class: 'chart' }, el('div', { class: 'title' }, title), this.plot, this.legend);
    this.series = [];
  }

  draw(series) {
    this.series = series;
    this.plot.replaceChildren();
    this.legend.replaceChildren();
    const xs = [];
    const ys = [];
    for (const s of series) {
      for (const [x, y] of s.points) { xs.push(x); ys.push(y); }
      for (const [x, lo, hi] of s.band || []) { xs.push(x); ys.push(lo, hi); }
    }
    const finite = ys.filter(Number.isFinite);
    if (xs.length === 0 || finite.length === 0) {
      const empty = svg('text', { x: WIDTH / 2, y: HEIGHT / 2, 'text-anchor': 'middle' });
      empty.textContent = 'no data yet';
      this.plot.append(empty);
      return;
    }
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...finite), Math.max(...finite)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * (WIDTH - MARGIN.left - MARGIN.right);
    const sy = (y) => HEIGHT - MARGIN.bottom - ((y - y0) / (y1 - y0)) * (HEIGHT - MARGIN.top - MARGIN.bottom);
    for (const t of ticks(y0, y1)) {
      this.plot.append(svg('line', { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: sy(t), y2: sy(t), stroke: '#eceef3' }));
      const text = svg('text', { x: MARGIN.left - 4, y: sy(t) + 3, 'text-anchor': 'end' });
      text.textContent = label(t);
      this.plot.append(text);
    }
    // Epochs are whole numbers: no tick between two of them.
    for (const t of ticks(x0, x1).filter((v) => this.xLabel !== 'epoch' || Number.isInteger(v))) {
      const text = svg('text', { x: sx(t), y: HEIGHT - MARGIN.bottom + 14, 'text-anchor': 'middle' });
      text.textContent = label(t);
      this.plot.append(text);
    }
    const axis = svg('text', { x: WIDTH - MARGIN.right, y: HEIGHT - 4, 'text-anchor': 'end' });
    axis.textContent = this.xLabel;
    this.plot.append(axis);
    this.plot.append(svg('path', { d: `M${MARGIN.left},${MARGIN.top}V${HEIGHT - MARGIN.bottom}H${WIDTH - MARGIN.right}`, stroke: '#9aa1b2', fill: 'none' }));
    series.forEach((s, index) => {
      const colour = PALETTE[index % PALETTE.length];
      if (s.band && s.band.length > 0) {
        const upper = s.band.map(([x, , hi]) => `${sx(x)},${sy(hi)}`);
        const lower = s.band.slice().reverse().map(([x, lo]) => `${sx(x)},${sy(lo)}`);
        this.plot.append(svg('path', { d: `M${upper.join('L')}L${lower.join('L')}Z`, fill: colour, 'fill-opacity': 0.15, stroke: 'none', class: 'band' }));
      }
      const points = s.points.filter(([, y]) => Number.isFinite(y));
      if (points.length > 0) {
        const d = points.map(([x, y], i) => `${i ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');
        this.plot.append(svg('path', { d, stroke: colour, 'stroke-width': 1.8, fill: 'none', class: 'series', 'data-points': points.length }));
        if (points.length === 1) {
          const [x, y] = points[0];
          this.plot.append(svg('circle', { cx: sx(x), cy: sy(y), r: 3, fill: colour }));
        }
      }
      const swatch = svg('svg', { width: 12, height: 12 });
      swatch.append(svg('rect', { width: 12, height: 12, fill: colour }));
      this.legend.append(el('span', {}, swatch, s.name));
    });
  }
}
