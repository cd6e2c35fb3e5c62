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

test('decodeCertsOnly: reads what openssl crl2pkcs7 -nocrl writes, in order; refuses signed content, signers, no certificate, BER', (t) => {
  const w = workdir(t);
  w.openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'a.key', '-subj', '/CN=first', '-days', '1', '-out', 'a.pem']);
  w.openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'b.key', '-subj', '/CN=second', '-days', '1', '-out', 'b.pem']);
  w.openssl(['crl2pkcs7', '-nocrl', '-certfile', 'a.pem', '-certfile', 'b.pem', '-outform', 'DER', '-out', 'theirs.p7b']);
  const certs = pkix.decodeCertsOnly(w.read('theirs.p7b'));
  assert.deepEqual(certs.map((c) => new X509Certificate(c).subject), ['CN=first', 'CN=second']);
  // Our own encoder round-trips.
  assert.deepEqual(pkix.decodeCertsOnly(pkix.encodeCertsOnly([w.read('a.pem').toString()])).map((c) => new X509Certificate(c).subject), ['CN=first']);

  // A signed message (one signer) is not a Simple PKI Response.
  w.write('msg.txt', 'hello');
  w.openssl(['cms', '-sign', '-in', 'msg.txt', '-signer', 'a.pem', '-inkey', 'a.key', '-outform', 'DER', '-out', 'signed.p7', '-nodetach']);
  assert.throws(() => pkix.decodeCertsOnly(w.read('signed.p7')), /encapContentInfo|signerInfos/);
  // No certificate at all.
  const { der } = pkix;
  const empty = der.seq(der.oid('1.2.840.113549.1.7.2'), der.contextTag(0, der.seq(der.integer(1), der.tlv(der.TAG.SET, Buffer.alloc(0)), der.seq(der.oid('1.2.840.113549.1.7.1')), der.tlv(der.TAG.SET, Buffer.alloc(0)))));
  assert.throws(() => pkix.decodeCertsOnly(empty), /no certificate/);
  // Another content type, garbage, indefinite length.
  assert.throws(() => pkix.decodeCertsOnly(der.seq(der.oid('1.2.840.113549.1.7.1'), der.contextTag(0, der.octetString(Buffer.from('x'))))), /id-signedData/);
  assert.throws(() => pkix.decodeCertsOnly(Buffer.from('not der at all')));
  assert.throws(() => pkix.decodeCertsOnly(Buffer.from([0x30, 0x80, 0, 0])), /indefinite/);
});
