/**
 * How a gateway recognises the authority over TLS. Both the root and every certificate under
 * it are shared by many parties (gateways, their Sub-CAs), so "chains to the root" says
 * nothing about who answers. The authority is the holder of a certificate that
 *   1. was issued by the infrastructure CA pinned at enrollment (not any CA under the root:
 *      a gateway Sub-CA or the device CA cannot make one), and
 *   2. carries AUTHORITY_URI as a URI SAN, which the authority never issues to a gateway
 *      (gateway CSRs may not carry URIs), so another gateway's certificate does not pass.
 * The host name check still applies on top.
 */
import { checkServerIdentity, type PeerCertificate } from 'node:tls';

export const AUTHORITY_URI = 'urn:leafgate:authority';

const normalizeFp = (fp: string) => fp.replace(/:/g, '').toUpperCase();

/**
 * A `checkServerIdentity` for TLS connections to the authority. `infraCaFingerprint` is the
 * SHA-256 fingerprint of the infrastructure CA pinned at enrollment.
 */
export function authorityIdentityCheck(infraCaFingerprint: string): (host: string, cert: PeerCertificate) => Error | undefined {
  const pinned = normalizeFp(infraCaFingerprint);
  return (host, cert) => {
    const hostError = checkServerIdentity(host, cert);
    if (hostError) return hostError;
    const issuer = (cert as PeerCertificate & { issuerCertificate?: PeerCertificate }).issuerCertificate;
    if (!issuer || issuer === cert || normalizeFp(issuer.fingerprint256 ?? '') !== pinned) {
      return new Error('the server certificate is not issued by the pinned infrastructure CA: not the authority');
    }
    const uris = (cert.subjectaltname ?? '').split(', ').filter((n) => n.startsWith('URI:')).map((n) => n.slice(4));
    if (!uris.includes(AUTHORITY_URI)) return new Error(`the server certificate does not carry ${AUTHORITY_URI}: not the authority`);
    return undefined;
  };
}
