/*
 * One signing worker of the PKCS#11 CA keys (authority/ca/pkcs11-ca-key.ts): plain CommonJS,
 * so a worker thread needs no TypeScript loader. pkcs11js calls are synchronous: here they
 * block this thread, never the authority's event loop.
 *
 * The worker opens its own session on the token (one session per worker: a PKCS#11 session
 * runs one operation at a time), logs in once (login state is per application, so a second
 * worker finds the user already logged in), finds its keys by label, then signs batches:
 * the hash is computed here, the token signs it (CKM_ECDSA over the digest, answered as raw
 * r || s and converted to a DER ECDSA-Sig-Value; CKM_RSA_PKCS over a DigestInfo for RSA).
 * A session the token dropped (removed, restarted, logged out) is reopened on the next batch.
 */
'use strict';
const { parentPort, workerData } = require('node:worker_threads');
const { createHash } = require('node:crypto');

const pk = require(workerData.pkcs11jsPath);
const p11 = new pk.PKCS11();
p11.load(workerData.module);

// DigestInfo prefixes (RFC 8017 9.2 note 1).
const DIGEST_INFO = {
  sha256: Buffer.from('3031300d060960864801650304020105000420', 'hex'),
  sha384: Buffer.from('3041300d060960864801650304020205000430', 'hex'),
  sha512: Buffer.from('3051300d060960864801650304020305000440', 'hex'),
};

let session = null;
let keys = new Map(); // label -> { handle, type: 'ec' | 'rsa', size (octets of r or of the modulus) }

function code(err) {
  const m = /CKR_[A-Z_]+/.exec(String((err && err.message) || err));
  return m ? m[0] : String((err && err.message) || err);
}

function open() {
  try {
    p11.C_Initialize({ flags: pk.CKF_OS_LOCKING_OK });
  } catch (err) {
    if (code(err) !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') throw err;
  }
  const slot = p11.C_GetSlotList(true).find((s) => p11.C_GetTokenInfo(s).label.trim() === workerData.tokenLabel);
  if (!slot) throw new Error(`CKR_TOKEN_NOT_PRESENT: no token labelled "${workerData.tokenLabel}"`);
  session = p11.C_OpenSession(slot, pk.CKF_SERIAL_SESSION);
  try {
    p11.C_Login(session, pk.CKU_USER, workerData.pin);
  } catch (err) {
    if (code(err) !== 'CKR_USER_ALREADY_LOGGED_IN') throw err;
  }
  keys = new Map();
  for (const k of workerData.keys) {
    p11.C_FindObjectsInit(session, [{ type: pk.CKA_CLASS, value: pk.CKO_PRIVATE_KEY }, { type: pk.CKA_LABEL, value: k.label }]);
    const handle = p11.C_FindObjects(session);
    p11.C_FindObjectsFinal(session);
    if (!handle) throw new Error(`no private key labelled "${k.label}"`);
    keys.set(k.label, { handle, type: k.type, size: k.size });
  }
}

function close() {
  if (session) {
    try {
      p11.C_CloseSession(session);
    } catch {
      // the token may be gone already
    }
  }
  session = null;
}

/** Raw r || s (PKCS#11 CKM_ECDSA) -> DER SEQUENCE { INTEGER r, INTEGER s }. */
function ecdsaDer(raw) {
  const half = raw.length / 2;
  const int = (b) => {
    let i = 0;
    while (i < b.length - 1 && b[i] === 0) i++;
    b = b.subarray(i);
    if (b[0] & 0x80) b = Buffer.concat([Buffer.from([0]), b]);
    return Buffer.concat([Buffer.from([0x02, b.length]), b]);
  };
  const body = Buffer.concat([int(raw.subarray(0, half)), int(raw.subarray(half))]);
  const len = body.length < 0x80 ? Buffer.from([body.length]) : Buffer.from([0x81, body.length]);
  return Buffer.concat([Buffer.from([0x30]), len, body]);
}

function signOne(job) {
  const key = keys.get(job.label);
  if (!key) return { error: `no key labelled "${job.label}" in this worker` };
  const digest = createHash(job.hash).update(job.data).digest();
  if (key.type === 'ec') {
    p11.C_SignInit(session, { mechanism: pk.CKM_ECDSA }, key.handle);
    const raw = p11.C_Sign(session, digest, Buffer.alloc(2 * key.size));
    if (raw.length !== 2 * key.size) return { error: `CKM_ECDSA answered ${raw.length} octets, ${2 * key.size} expected` };
    return ecdsaDer(raw);
  }
  const prefix = DIGEST_INFO[job.hash];
  if (!prefix) return { error: `hash ${job.hash} is not supported for RSA` };
  p11.C_SignInit(session, { mechanism: pk.CKM_RSA_PKCS }, key.handle);
  return p11.C_Sign(session, Buffer.concat([prefix, digest]), Buffer.alloc(key.size));
}

// Session-level failures: the session is reopened before the next batch.
const SESSION_LOST = /CKR_(SESSION_|USER_NOT_LOGGED_IN|DEVICE_|TOKEN_NOT_|OBJECT_HANDLE_INVALID|KEY_HANDLE_INVALID|CRYPTOKI_NOT_INITIALIZED|GENERAL_ERROR)/;

parentPort.on('message', (msg) => {
  if (msg.type === 'close') {
    close();
    parentPort.postMessage({ type: 'closed' });
    return;
  }
  const results = [];
  for (const job of msg.jobs) {
    try {
      if (!session) open();
      results.push(signOne(job));
    } catch (err) {
      const c = code(err);
      if (SESSION_LOST.test(c)) close();
      results.push({ error: c, lost: SESSION_LOST.test(c) });
    }
  }
  parentPort.postMessage({ type: 'signed', id: msg.id, results });
});

try {
  open();
  parentPort.postMessage({ type: 'ready' });
} catch (err) {
  close();
  parentPort.postMessage({ type: 'failed', error: code(err) });
}
