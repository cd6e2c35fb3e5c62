/**
 * The certs-only PKCS#7 encoder (EST responses) against OpenSSL: `openssl pkcs7 -print_certs`
 * reads back every certificate in our order, and the structure matches what
 * `openssl crl2pkcs7 -nocrl` writes for the same certificates.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import test from 'node:test';
import { pkix } from '../protocol/index.ts';
import { asn1Shape, workdir } from './support/openssl.ts';

test('encodeCertsOnly: openssl reads every certificate back in order, with the shape of crl2pkcs7 -nocrl', (t) => {
  const w = workdir(t);
  w.openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'a.key', '-subj', '/CN=first', '-days', '1', '-out', 'a.pem']);
  w.openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'b.key', '-subj', '/CN=second', '-days', '1', '-out', 'b.pem']);
  const a = w.read('a.pem').toString();
  const b = w.read('b.pem').toString();

  const p7 = pkix.encodeCertsOnly([a + b]);
  w.write('ours.p7b', p7);
  const printed = w.openssl(['pkcs7', '-inform', 'DER', '-in', 'ours.p7b', '-print_certs']);
  const back = [...printed.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)].map((m) => new X509Certificate(m[0]));
  assert.deepEqual(back.map((c) => c.subject), ['CN=first', 'CN=second']);
  assert.ok(back[0].raw.equals(new X509Certificate(a).raw));

  w.openssl(['crl2pkcs7', '-nocrl', '-certfile', 'a.pem', '-certfile', 'b.pem', '-outform', 'DER', '-out', 'theirs.p7b']);
  const shape = (f: string) => asn1Shape(w.openssl(['asn1parse', '-inform', 'DER', '-in', f]));
  assert.deepEqual(shape('ours.p7b'), shape('theirs.p7b'));

  // Base64 in lines of 64 (an EST body), decoding to the same DER.
  const b64 = pkix.certsOnlyBase64([a]);
  assert.ok(b64.split('\n').every((l) => l.length <= 64));
  assert.ok(Buffer.from(b64, 'base64').equals(pkix.encodeCertsOnly([a])));
  assert.throws(() => pkix.encodeCertsOnly([]), /no certificate/);
});
