/**
 * The dashboard's one escaping function and the template tag built on it. Every page is made
 * with `html\`...\``: each interpolated value is escaped by `esc` unless it is itself the
 * output of `html` (a SafeHtml), so device ids, CNs, SANs and audit details -- all untrusted,
 * a device or a gateway chose them -- can only ever end up as text. Nothing else in the
 * dashboard writes markup from strings.
 */

export class SafeHtml {
  constructor(readonly value: string) {}
  toString(): string {
    return this.value;
  }
}

const ENTITIES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;', '`': '&#96;' };

/** Escapes text for HTML element content and quoted attribute values. */
export function esc(value: unknown): string {
  return String(value ?? '').replace(/[&<>"'`]/g, (c) => ENTITIES[c]);
}

type Part = SafeHtml | string | number | boolean | null | undefined | Part[];

function render(v: Part): string {
  if (v instanceof SafeHtml) return v.value;
  if (Array.isArray(v)) return v.map(render).join('');
  if (v === null || v === undefined || v === false) return '';
  return esc(v);
}

export function html(strings: TemplateStringsArray, ...values: Part[]): SafeHtml {
  let out = strings[0];
  for (let i = 0; i < values.length; i++) out += render(values[i]) + strings[i + 1];
  return new SafeHtml(out);
}

/** A path under /dashboard with each segment and query value URL-encoded (then escaped by html). */
export function href(path: string, query: Record<string, string | number | undefined | null> = {}): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  const s = q.toString();
  return `/dashboard${path}${s ? `?${s}` : ''}`;
}

export const seg = encodeURIComponent;

export function when(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return '—';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d{3}Z$/, 'Z');
}

/** "in 12 d" / "3 h ago": relative to now, coarse. */
export function relative(ms: number | null | undefined, now: number): string {
  if (ms === null || ms === undefined) return '—';
  const d = ms - now;
  const a = Math.abs(d);
  const t = a >= 2 * 86_400_000 ? `${Math.round(a / 86_400_000)} d` : a >= 2 * 3_600_000 ? `${Math.round(a / 3_600_000)} h` : a >= 120_000 ? `${Math.round(a / 60_000)} min` : `${Math.round(a / 1000)} s`;
  return d >= 0 ? `in ${t}` : `${t} ago`;
}

export interface PageContext {
  title: string;
  operator?: string;
  csrf?: string;
  nav?: string;
}

const NAV: Array<[string, string]> = [['overview', ''], ['devices', '/devices'], ['certificates', '/certificates'], ['gateways', '/gateways'], ['sync', '/sync'], ['audit', '/audit']];

export function layout(ctx: PageContext, body: SafeHtml): string {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${ctx.title} · leafgate</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
<script src="/dashboard/static/dashboard.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <span class="brand">leafgate authority</span>
  ${ctx.operator
    ? html`<nav aria-label="Sections"><ul>${NAV.map(([name, path]) => html`<li><a href="/dashboard${path}"${ctx.nav === name ? html` aria-current="page"` : ''}>${name}</a></li>`)}</ul></nav>
  <form class="logout" method="post" action="/dashboard/logout"><input type="hidden" name="csrf" value="${ctx.csrf}"><span class="who">${ctx.operator}</span> <button type="submit">Log out</button></form>`
    : ''}
</header>
<main id="main">
<h1>${ctx.title}</h1>
${body}
</main>
</body>
</html>
`.value;
}

/** A hidden CSRF field; every form of the dashboard carries one. */
export const csrfField = (token: string) => html`<input type="hidden" name="csrf" value="${token}">`;
