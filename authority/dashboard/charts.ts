/**
 * Inline SVG bar charts drawn on the server from aggregated rows: no script, no CDN, no
 * inline style (the CSP forbids it): geometry in attributes, colours from dashboard.css
 * classes. Each chart has a <title>/<desc> and a table of the same numbers for screen readers.
 */
import { html, type SafeHtml } from './html.ts';

export interface Series {
  name: string;
  /** CSS class of its bars (s1, s2). */
  cls: string;
  values: number[];
}

export function barChart(opts: { title: string; labels: string[]; series: Series[]; caption: string }): SafeHtml {
  const W = 640;
  const H = 200;
  const padL = 40;
  const padB = 28;
  const padT = 10;
  const n = opts.labels.length;
  // Stacked bars: each bucket's total is the sum of the series.
  const totals = opts.labels.map((_, i) => opts.series.reduce((a, s) => a + (s.values[i] ?? 0), 0));
  const top = niceMax(Math.max(1, ...totals));
  const plotW = W - padL - 8;
  const plotH = H - padT - padB;
  const bw = plotW / Math.max(1, n);
  const y = (v: number) => padT + plotH - (v / top) * plotH;
  const bars: SafeHtml[] = [];
  for (let i = 0; i < n; i++) {
    let base = 0;
    for (const s of opts.series) {
      const v = s.values[i] ?? 0;
      if (v > 0) {
        const y0 = y(base);
        const y1 = y(base + v);
        bars.push(html`<rect class="${s.cls}" x="${(padL + i * bw + 1).toFixed(1)}" y="${y1.toFixed(1)}" width="${Math.max(1, bw - 2).toFixed(1)}" height="${Math.max(0.5, y0 - y1).toFixed(1)}"><title>${opts.labels[i]}: ${s.name} ${v}</title></rect>`);
      }
      base += v;
    }
  }
  const ticks = [0, top / 2, top].map((v) => html`<g class="tick"><line x1="${padL}" x2="${W - 8}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}"></line><text x="${padL - 4}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end">${Math.round(v)}</text></g>`);
  const every = Math.max(1, Math.ceil(n / 8));
  const labels = opts.labels.map((l, i) => (i % every === 0 ? html`<text class="xl" x="${(padL + i * bw + bw / 2).toFixed(1)}" y="${H - 8}" text-anchor="middle">${l}</text>` : ''));
  return html`<figure class="chart">
<svg viewBox="0 0 ${W} ${H}" role="img" aria-labelledby="${slug(opts.title)}-t" preserveAspectRatio="xMidYMid meet"><title id="${slug(opts.title)}-t">${opts.title}</title>${ticks}${bars}${labels}</svg>
<figcaption>${opts.caption} ${opts.series.map((s) => html`<span class="key ${s.cls}">${s.name}</span> `)}</figcaption>
<details><summary>Numbers</summary><table><thead><tr><th scope="col">period</th>${opts.series.map((s) => html`<th scope="col">${s.name}</th>`)}</tr></thead>
<tbody>${opts.labels.map((l, i) => html`<tr><td>${l}</td>${opts.series.map((s) => html`<td class="num">${s.values[i] ?? 0}</td>`)}</tr>`)}</tbody></table></details>
</figure>`;
}

function niceMax(v: number): number {
  if (v <= 4) return 4;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

const slug = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, '-');
