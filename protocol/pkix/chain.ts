/**
 * Certificate path checks with node:crypto's X509Certificate (OpenSSL underneath): issuer
 * name match, signature, validity window and CA flags along the path (RFC 5280 6.1, the
 * subset leafgate needs: no policies, name constraints are checked by TLS peers).
 */
import { X509Certificate } from 'node:crypto';
import { allPem } from './pem.ts';

export interface ChainCheck {
  ok: boolean;
  reason?: string;
  /** Leaf first, anchor last. */
  path: X509Certificate[];
}

export function parseCertificates(pem: string): X509Certificate[] {
  return allPem(pem, 'CERTIFICATE').map((d) => new X509Certificate(d));
}

/**
 * Builds a path from `leaf` through `intermediates` to one of `anchors` and checks it at
 * time `at`. Never throws for a bad chain: returns `{ok: false, reason}`.
 */
export function verifyChain(leaf: X509Certificate, intermediates: X509Certificate[], anchors: X509Certificate[], at: Date = new Date()): ChainCheck {
  const path: X509Certificate[] = [leaf];
  let current = leaf;
  for (let depth = 0; depth < 8; depth++) {
    const inWindow = (c: X509Certificate) => new Date(c.validFrom) <= at && at <= new Date(c.validTo);
    if (!inWindow(current)) return { ok: false, reason: `certificate ${current.subject.replace(/\n/g, ', ')} is not valid at ${at.toISOString()}`, path };
    const anchor = anchors.find((a) => current.checkIssued(a) && current.verify(a.publicKey));
    if (anchor) {
      if (!anchor.ca) return { ok: false, reason: 'anchor is not a CA', path };
      if (anchor.fingerprint256 !== current.fingerprint256) path.push(anchor);
      if (!inWindow(anchor)) return { ok: false, reason: 'anchor is not valid now', path };
      return { ok: true, path };
    }
    const next = intermediates.find((c) => c.fingerprint256 !== current.fingerprint256 && current.checkIssued(c) && current.verify(c.publicKey));
    if (!next) return { ok: false, reason: 'no issuer found among the trusted certificates', path };
    if (!next.ca) return { ok: false, reason: 'issuer is not a CA', path };
    path.push(next);
    current = next;
  }
  return { ok: false, reason: 'chain too long', path };
}
