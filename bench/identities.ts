/**
 * Device identities for the benchmarks, straight from the authority's LocalCa (no
 * onboarding): a fresh EC P-256 key and a device certificate for the id, valid for a day.
 */
import { generateKeyPairSync } from 'node:crypto';
import type { LocalCa } from '../authority/index.ts';
import { BACKDATE_MS } from '../authority/ca/index.ts';
import { pkix } from '../protocol/index.ts';

export interface BenchIdentity {
  /** PKCS#8 PEM. */
  keyPem: string;
  certPem: string;
  /** The device CA's certificate (PEM), for clients that send it along. */
  caPem: string;
}

export async function issueBenchIdentity(ca: LocalCa, id: string, now = Date.now()): Promise<BenchIdentity> {
  const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const issued = await ca.issue('device', {
    subjectDer: pkix.encodeName(id), spkiDer: pair.publicKey.export({ type: 'spki', format: 'der' }), profile: { kind: 'device', keyType: 'ec' },
    notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + 86_400_000),
  });
  return { keyPem: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, certPem: issued.pem, caPem: issued.chain[0] };
}
