/** Assertions shared by the refusal tests: nothing issued, and the refusal is audited. */
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { pkix, type ErrorCode, type InstructionMessage } from '../../protocol/index.ts';
import type { AuditRow } from '../../authority/store/index.ts';
import type { Stack } from './stack.ts';

/** No certificate row exists for `subjectId`. */
export async function assertNothingIssued(stack: Stack, subjectId: string): Promise<void> {
  const rows = await stack.authority.store.listCertificates({ subjectId });
  assert.deepEqual(rows.map((r) => r.serial), [], `no certificate may be issued to ${subjectId}`);
  const audit = await stack.authority.store.listAudit({ deviceId: subjectId });
  assert.deepEqual(audit.filter((a) => a.action === 'issue'), [], `no issue audit row for ${subjectId}`);
}

/** An audit row for the device with outcome 'refused' and `code` (and `requestId` / `action` when given). */
export async function assertRefusalAudited(stack: Stack, deviceId: string, code: ErrorCode, opts: { requestId?: string; action?: string } = {}): Promise<AuditRow> {
  const audit = await stack.authority.store.listAudit({ deviceId });
  const hit = audit.find((a) => a.outcome === 'refused' && a.code === code && (opts.requestId === undefined || a.requestId === opts.requestId) && (opts.action === undefined || a.action === opts.action));
  assert.ok(hit, `expected a refused audit row with ${code} for ${deviceId}${opts.requestId ? ` / ${opts.requestId}` : ''}; have ${JSON.stringify(audit.map((a) => [a.action, a.outcome, a.code, a.requestId]))}`);
  return hit;
}

/** A CSR as the instruction asks (CN, SANs), for the given key pair. */
export function csrFor(instruction: InstructionMessage, pair: { privateKey: KeyObject; publicKey: KeyObject }, commonName = instruction.subject.commonName): string {
  return pkix.buildCsr({ commonName, sans: instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
}

export const ecKey = (namedCurve: string) => generateKeyPairSync('ec', { namedCurve });
export const rsaKey = (modulusLength: number) => generateKeyPairSync('rsa', { modulusLength });
