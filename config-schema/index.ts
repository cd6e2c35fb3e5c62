/**
 * Configuration schemas of the processes (authority, gateway, device policy): JSON Schema
 * checked with ajv, errors that name the key and the expected value, and the README's
 * configuration reference generated from the same schema (`npm run docs:config`), so the
 * documentation cannot drift from what is accepted. Imports nothing of ours.
 */
import { readFileSync } from 'node:fs';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';

/** A JSON Schema object; `env` (annotation only) names the environment variable of a key. */
export type Schema = {
  type?: string | string[];
  description?: string;
  default?: unknown;
  env?: string;
  expected?: string;
  secret?: boolean;
  properties?: Record<string, Schema>;
  additionalProperties?: boolean | Schema;
  items?: Schema;
  enum?: unknown[];
  [k: string]: unknown;
};

/** A configuration that cannot be used: exit code 2, one line per error, each naming its key. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  constructor(
    readonly source: string,
    readonly errors: string[],
  ) {
    super(`${source}: ${errors.join('; ')}`);
  }
}

const ajv = new Ajv({ allErrors: true, strict: true, verbose: true, allowUnionTypes: true });
ajv.addKeyword({ keyword: 'env', schemaType: 'string' });
/** Annotation: what an operator should write, for errors a pattern alone would explain badly. */
ajv.addKeyword({ keyword: 'expected', schemaType: 'string' });
/** Annotation: a secret's value is never repeated in an error. */
ajv.addKeyword({ keyword: 'secret', schemaType: 'boolean' });
const compiled = new WeakMap<Schema, ValidateFunction>();

const pathOf = (instancePath: string) =>
  instancePath
    .split('/')
    .slice(1)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .join('.');

const shown = (v: unknown) => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) for (let j = 1; j <= b.length; j++) d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
  return d[a.length][b.length];
}

function describe(e: ErrorObject): string {
  const at = pathOf(e.instancePath);
  const key = (k: string) => (at ? `${at}.${k}` : k);
  const parent = e.parentSchema as Schema | undefined;
  const env = parent?.env ? ` (env ${parent.env})` : '';
  const got = parent?.secret ? '' : ` (got ${shown(e.data)})`;
  if (typeof parent?.expected === 'string' && e.keyword !== 'additionalProperties' && e.keyword !== 'required') return `${at}${env}: must be ${parent.expected}${got}`;
  switch (e.keyword) {
    case 'additionalProperties': {
      const unknown = String((e.params as { additionalProperty: string }).additionalProperty);
      const known = Object.keys(parent?.properties ?? {});
      const near = known.filter((k) => distance(k.toLowerCase(), unknown.toLowerCase()) <= 2);
      return `${key(unknown)}: unknown key${near.length ? ` (did you mean ${near.join(' or ')}?)` : known.length ? `; expected one of ${known.join(', ')}` : ''}`;
    }
    case 'required':
      return `${key(String((e.params as { missingProperty: string }).missingProperty))}: is required`;
    case 'type':
      return `${at || '(top level)'}${env}: must be ${String((e.params as { type: string }).type).replace(',', ' or ')}${got}`;
    case 'enum':
      return `${at}${env}: must be one of ${(e.params as { allowedValues: unknown[] }).allowedValues.map(shown).join(', ')}${got}`;
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      return `${at}${env}: must be ${(e.params as { comparison: string }).comparison} ${(e.params as { limit: number }).limit}${got}`;
    case 'pattern':
      return `${at}${env}: must match ${(e.params as { pattern: string }).pattern}${got}`;
    default:
      return `${at || '(top level)'}${env}: ${e.message ?? 'is invalid'}${got}`;
  }
}

/** Checks `value` against `schema`; throws a ConfigError naming every offending key. */
export function checkConfig(schema: Schema, value: unknown, source: string): void {
  let validate = compiled.get(schema);
  if (!validate) {
    validate = ajv.compile(schema);
    compiled.set(schema, validate);
  }
  if (validate(value)) return;
  // Type errors of a union (anyOf) repeat; one line per distinct message.
  throw new ConfigError(source, [...new Set((validate.errors ?? []).filter((e) => e.keyword !== 'anyOf').map(describe))]);
}

/** A failed cross-field check (one key against another): the same error type, same exit code. */
export function configError(source: string, key: string, expected: string): never {
  throw new ConfigError(source, [`${key}: ${expected}`]);
}

const typeOf = (s: Schema): string => {
  if (s.enum) return s.enum.map((v) => `\`${JSON.stringify(v)}\``).join(' \\| ');
  if (s.type === 'array') return `${s.items ? typeOf(s.items) : 'any'}[]`;
  if (Array.isArray(s.anyOf)) return (s.anyOf as Schema[]).map(typeOf).join(' \\| ');
  const bounds = [s.minimum !== undefined ? `>= ${s.minimum}` : '', s.exclusiveMinimum !== undefined ? `> ${s.exclusiveMinimum}` : '', s.maximum !== undefined ? `<= ${s.maximum}` : '', s.exclusiveMaximum !== undefined ? `< ${s.exclusiveMaximum}` : ''].filter(Boolean);
  return `${String(s.type ?? 'any')}${bounds.length ? ` (${bounds.join(', ')})` : ''}`;
};

/** One Markdown table row per leaf key (nested objects flattened as `a.b`). */
export function referenceRows(schema: Schema, prefix = ''): string[] {
  const rows: string[] = [];
  for (const [name, s] of Object.entries(schema.properties ?? {})) {
    const key = prefix + name;
    if (s.type === 'object' && s.properties) {
      rows.push(...referenceRows(s, `${key}.`));
      continue;
    }
    if (s.type === 'object' && typeof s.additionalProperties === 'object') {
      rows.push(...referenceRows(s.additionalProperties, `${key}.<name>.`));
      continue;
    }
    const cell = (t: string) => t.replace(/\|/g, '\\|').replace(/\n/g, ' ');
    const def = s.default === undefined ? '' : `\`${JSON.stringify(s.default)}\``;
    rows.push(`| \`${key}\` | ${typeOf(s)} | ${def} | ${s.env ? `\`${s.env}\`` : ''} | ${cell(s.description ?? '')} |`);
  }
  return rows;
}

export function referenceTable(schema: Schema): string {
  return ['| key | type | default | environment | meaning |', '| --- | --- | --- | --- | --- |', ...referenceRows(schema)].join('\n');
}

/** Replaces the text between `<!-- config:NAME -->` and `<!-- /config:NAME -->`. */
export function replaceMarkedSection(text: string, name: string, body: string): string {
  const start = `<!-- config:${name} -->`;
  const end = `<!-- /config:${name} -->`;
  const a = text.indexOf(start);
  const b = text.indexOf(end);
  if (a < 0 || b < a) throw new Error(`README has no ${start} ... ${end} section`);
  return `${text.slice(0, a + start.length)}\n${body}\n${text.slice(b)}`;
}

/** A JSON object from a file, or a ConfigError naming the file (exit code 2). */
export function readJsonConfig(path: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`config ${path}`, [`cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`]);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`config ${path}`, [`not JSON: ${(err as Error).message}`]);
  }
}
