/**
 * The store contract, run against both engines: the embedded SQLite file and the real
 * PostgreSQL server (LEAFGATE_TEST_DATABASE_URL, one random schema per test). Every query
 * of authority/store is written once; these tests prove it means the same on both.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { listMigrations, openStore, PostgresDriver, SqliteDriver, SqlStore, SqliteStore, type CertificateRow, type DeviceRow, type RequestRow } from '../authority/store/index.ts';
import { AuthorityEvents, LocalCa, Revocation, resolveAuthorityConfig } from '../authority/index.ts';
import { rewriteDdl, toPgPlaceholders } from '../authority/store/sql.ts';
import { countActiveSql } from '../authority/store/sql-store.ts';
import { pgSchema } from './support/pg.ts';
import { ENGINES, openTestStore } from './support/store.ts';

const open = openTestStore;

const NOW = 1_760_000_000_000;
const DAY = 86_400_000;
let serialSeq = 0;

function cert(subjectId: string, extra: Partial<CertificateRow> = {}): CertificateRow {
  const serial = extra.serial ?? `${randomBytes(8).toString('hex').toUpperCase()}${(++serialSeq).toString(16).toUpperCase()}`;
  return {
    serial, subjectId, kind: 'device', fingerprint: `FP:${serial}`, notBefore: NOW - DAY, notAfter: NOW + 9 * DAY, status: 'active', requestId: null,
    pem: `-----BEGIN CERTIFICATE-----\n${serial}\n-----END CERTIFICATE-----\n`, revokedAt: null, revocationReason: null, createdAt: NOW, ...extra,
  };
}

function request(deviceId: string, requestId: string, response: Record<string, unknown> = { ok: true }): RequestRow {
  return { deviceId, requestId, kind: 'csr', bodyHash: 'h', response, createdAt: NOW };
}

async function device(store: SqlStore, id: string, group = 'default') {
  assert.equal(await store.insertDevice({
    id, groupName: group, method: 'ddkg', status: 'registered', gatewayId: 'gw-1', ddkgSalt: 'salt', ddkgPublicKey: null, birthCertFingerprint: null, createdAt: NOW, updatedAt: NOW,
  }), true);
}

async function session(store: SqlStore, deviceId: string, id = randomBytes(8).toString('hex'), expiresAt = NOW + 600_000) {
  await store.insertAuthSession({ id, deviceId, gatewayId: 'gw-1', instruction: { validityDays: 10 }, expiresAt, usedAt: null });
  return id;
}

test('placeholders become $n outside quotes; DDL rewrites are the documented ones only', () => {
  assert.equal(toPgPlaceholders("SELECT * FROM t WHERE a = ? AND b = '?' AND \"c?\" = ? LIMIT ?"), "SELECT * FROM t WHERE a = $1 AND b = '?' AND \"c?\" = $2 LIMIT $3");
  assert.equal(rewriteDdl('seq INTEGER PRIMARY KEY AUTOINCREMENT, b BLOB', 'postgres'), 'seq BIGSERIAL PRIMARY KEY, b BYTEA');
  assert.equal(rewriteDdl('seq INTEGER PRIMARY KEY AUTOINCREMENT', 'sqlite'), 'seq INTEGER PRIMARY KEY AUTOINCREMENT');
});

for (const engine of ENGINES) {
  test(`[${engine}] migrations: every file applied once, in order; reopening applies nothing`, async (t) => {
    const { store, reopen } = await open(t, engine);
    const rows = await store.db.query('SELECT version, name FROM schema_migrations ORDER BY version');
    assert.deepEqual(rows.map((r) => [Number(r.version), r.name]), listMigrations().map((m) => [m.version, m.name]));
    const again = await reopen();
    assert.deepEqual(await again.migrate(), []);
    if (engine === 'postgres') {
      // The documented rewrites took effect: BLOB -> BYTEA, AUTOINCREMENT -> BIGSERIAL.
      const type = async (table: string, column: string) =>
        (await store.db.one('SELECT data_type, column_default FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?', [table, column]))!;
      assert.equal((await type('crls', 'der')).data_type, 'bytea');
      assert.equal((await type('audit_log', 'seq')).data_type, 'bigint');
      assert.match((await type('audit_log', 'seq')).column_default, /^nextval\(/);
    }
  });

  test(`[${engine}] tokens, devices, codes, challenges and auth sessions`, async (t) => {
    const { store } = await open(t, engine);
    await store.createEnrollmentToken('tok', 'gw-1', NOW + 1000);
    await store.createEnrollmentToken('old', 'gw-2', NOW - 1);
    assert.equal(await store.consumeEnrollmentToken('tok', NOW), 'gw-1');
    assert.equal(await store.consumeEnrollmentToken('tok', NOW), null, 'consumed once');
    assert.equal(await store.consumeEnrollmentToken('old', NOW), null, 'expired');
    assert.equal(await store.consumeEnrollmentToken('nope', NOW), null);

    await device(store, 'dev-a');
    assert.equal(await store.insertDevice({ ...(await store.getDevice('dev-a'))!, groupName: 'other' }), false, 'an existing device is not replaced');
    await store.updateDevice('dev-a', { status: 'enrolled', ddkgPublicKey: 'PEM' }, NOW + 5);
    const d = (await store.getDevice('dev-a'))!;
    assert.deepEqual([d.status, d.ddkgPublicKey, d.groupName, d.updatedAt, d.createdAt, d.hubState], ['enrolled', 'PEM', 'default', NOW + 5, NOW, null]);
    assert.equal(typeof d.updatedAt, 'number');
    await device(store, 'dev-b', 'g2');
    assert.deepEqual((await store.listDevices({ group: 'g2' })).map((x) => x.id), ['dev-b']);
    assert.deepEqual((await store.listDevices({})).map((x) => x.id), ['dev-a', 'dev-b']);

    await store.createEnrollmentCode('code', 'dev-a', 'default', NOW + 1000);
    assert.equal(await store.consumeEnrollmentCode('code', 'dev-b', 'default', NOW), false, 'bound to its device');
    assert.equal(await store.consumeEnrollmentCode('code', 'dev-a', 'g2', NOW), false, 'bound to its group');
    assert.equal(await store.consumeEnrollmentCode('code', 'dev-a', 'default', NOW), true);
    assert.equal(await store.consumeEnrollmentCode('code', 'dev-a', 'default', NOW), false, 'once');

    await store.insertChallenge({ id: 'ch-1', deviceId: 'dev-a', gatewayId: 'gw-1', method: 'ddkg', nonce: 'n', context: { a: [1, 'x'] }, expiresAt: NOW + 1000, usedAt: null });
    assert.deepEqual((await store.getChallenge('ch-1'))?.context, { a: [1, 'x'] });
    assert.equal(await store.useChallenge('ch-1', NOW), true);
    assert.equal(await store.useChallenge('ch-1', NOW), false, 'a replay');
    assert.equal((await store.getChallenge('ch-1'))?.usedAt, NOW);

    await session(store, 'dev-a', 's-old', NOW + 1000);
    await session(store, 'dev-a', 's-new', NOW + 2000);
    await session(store, 'dev-a', 's-dead', NOW - 1);
    assert.equal((await store.getLiveAuthSession('dev-a', NOW))?.id, 's-new', 'the newest live one');
    assert.deepEqual((await store.getLiveAuthSession('dev-a', NOW))?.instruction, { validityDays: 10 });
    assert.equal(await store.getLiveAuthSession('dev-a', NOW + 5000), null);
  });

  test(`[${engine}] register and auth commits are all or nothing`, async (t) => {
    const { store } = await open(t, engine);
    const dev = (id: string): DeviceRow => ({ id, groupName: 'default', method: 'ddkg', status: 'registered', gatewayId: 'gw-1', ddkgSalt: 'salt', ddkgPublicKey: null, birthCertFingerprint: null, createdAt: NOW, updatedAt: NOW });
    const challenge = (id: string, deviceId: string) => ({ id, deviceId, gatewayId: 'gw-1', method: 'ddkg' as const, nonce: 'n', context: { a: 1 }, expiresAt: NOW + 60_000, usedAt: null });
    const audit = (deviceId: string, action: string) => ({ at: NOW, action, outcome: 'ok' as const, deviceId });

    // A first registration writes the answer, the device row, the challenge and the audit line.
    assert.equal(await store.recordRegistration({ request: { ...request('dev-reg', 'r1'), kind: 'register' }, device: dev('dev-reg'), challenge: challenge('ch-1', 'dev-reg'), audit: audit('dev-reg', 'register') }), true);
    assert.equal((await store.getDevice('dev-reg'))?.status, 'registered');
    assert.equal((await store.getChallenge('ch-1'))?.deviceId, 'dev-reg');
    // The same requestId again: nothing is written, not even the second challenge.
    assert.equal(await store.recordRegistration({ request: { ...request('dev-reg', 'r1'), kind: 'register' }, device: null, challenge: challenge('ch-2', 'dev-reg'), audit: audit('dev-reg', 'register') }), false);
    assert.equal(await store.getChallenge('ch-2'), null);
    assert.equal((await store.listAudit({ deviceId: 'dev-reg' })).length, 1);

    // auth: a one-time code burnt together with the enrollment and the session.
    await store.createEnrollmentCode('code-1', 'dev-reg', 'default', NOW + 60_000);
    const session = (id: string) => ({ id, deviceId: 'dev-reg', gatewayId: 'gw-2', instruction: { validityDays: 10 }, expiresAt: NOW + 600_000, usedAt: null });
    const enroll = { status: 'enrolled' as const, ddkgPublicKey: 'PEM', gatewayId: 'gw-2' };
    assert.equal(await store.recordAuthentication({ deviceId: 'dev-reg', consumeCode: { codeHash: 'code-1', groupName: 'default' }, devicePatch: enroll, session: session('s-1'), audit: audit('dev-reg', 'auth'), now: NOW }), true);
    assert.equal((await store.getDevice('dev-reg'))?.status, 'enrolled');
    assert.equal((await store.getLiveAuthSession('dev-reg', NOW))?.id, 's-1');
    // The code again (used): nothing is written -- no session, no device change, no audit line.
    await store.updateDevice('dev-reg', { status: 'registered', ddkgPublicKey: null as unknown as string }, NOW);
    assert.equal(await store.recordAuthentication({ deviceId: 'dev-reg', consumeCode: { codeHash: 'code-1', groupName: 'default' }, devicePatch: enroll, session: session('s-2'), audit: audit('dev-reg', 'auth'), now: NOW + 1 }), false);
    assert.equal((await store.getDevice('dev-reg'))?.status, 'registered');
    assert.equal((await store.getLiveAuthSession('dev-reg', NOW))?.id, 's-1', 'no second session');
    assert.equal((await store.listAudit({ deviceId: 'dev-reg' })).filter((a) => a.action === 'auth').length, 1);
    // Without a code: the patch, the session and the audit line.
    assert.equal(await store.recordAuthentication({ deviceId: 'dev-reg', devicePatch: { gatewayId: 'gw-3' }, session: session('s-3'), audit: audit('dev-reg', 'auth'), now: NOW + 2 }), true);
    assert.equal((await store.getDevice('dev-reg'))?.gatewayId, 'gw-3');
  });

  test(`[${engine}] issuance is all or nothing and idempotent by requestId`, async (t) => {
    const { store } = await open(t, engine);
    await device(store, 'dev-i');
    const s1 = await session(store, 'dev-i');
    const c1 = cert('dev-i', { requestId: 'r1' });
    const audit = { at: NOW, action: 'issue', outcome: 'ok' as const, deviceId: 'dev-i', requestId: 'r1', serial: c1.serial, detail: { k: 'v' } };
    assert.equal(await store.recordIssuance({ request: request('dev-i', 'r1', { serial: c1.serial }), certificate: c1, authSessionId: s1, audit }), true);
    // The same requestId again: nothing stored, the first answer stays.
    const s2 = await session(store, 'dev-i');
    assert.equal(await store.recordIssuance({ request: request('dev-i', 'r1', { serial: 'OTHER' }), certificate: cert('dev-i'), authSessionId: s2, audit }), false);
    assert.deepEqual((await store.getRequest('dev-i', 'r1'))?.response, { serial: c1.serial });
    assert.equal((await store.listCertificates({ subjectId: 'dev-i' })).length, 1);
    assert.equal((await store.listAudit({ deviceId: 'dev-i' })).length, 1);
    assert.deepEqual((await store.listAudit({ deviceId: 'dev-i' }))[0].detail, { k: 'v' });

    // A consumed session: the whole issuance rolls back (no answer, no certificate, no audit).
    await assert.rejects(store.recordIssuance({ request: request('dev-i', 'r2'), certificate: cert('dev-i'), authSessionId: s1, audit }), /consumed concurrently/);
    assert.equal(await store.getRequest('dev-i', 'r2'), null);
    // A serial that exists already: the primary key refuses it and everything rolls back.
    await assert.rejects(store.recordIssuance({ request: request('dev-i', 'r3'), certificate: cert('dev-i', { serial: c1.serial }), authSessionId: s2, audit }));
    assert.equal(await store.getRequest('dev-i', 'r3'), null);
    assert.equal((await store.getLiveAuthSession('dev-i', NOW))?.id, s2, 'the session was not consumed');
    assert.equal((await store.listCertificates({ subjectId: 'dev-i' })).length, 1);
    assert.equal((await store.listAudit({ deviceId: 'dev-i' })).length, 1);
    assert.equal(await store.countActiveCertificates('dev-i', NOW), 1);
    assert.equal(await store.countActiveCertificates('dev-i', NOW + 10 * DAY), 0, 'expired ones do not count');

    // insertRequest: the answer and its audit row once.
    const reg = { ...request('dev-i', 'reg-1'), kind: 'register' as const };
    assert.equal(await store.insertRequest(reg, { at: NOW, action: 'register', outcome: 'ok', deviceId: 'dev-i' }), true);
    assert.equal(await store.insertRequest(reg, { at: NOW, action: 'register', outcome: 'ok', deviceId: 'dev-i' }), false);
    assert.equal((await store.listAudit({ deviceId: 'dev-i' })).length, 2);
  });

  test(`[${engine}] the active-certificate cap holds inside the issuance commit, also for two nodes at once`, async (t) => {
    const { store, reopen } = await open(t, engine);
    // Two nodes on one database (for SQLite: a second connection to the file).
    const other = await reopen();
    const audit = { at: NOW, action: 'issue', outcome: 'ok' as const };
    for (let round = 0; round < 5; round++) {
      const id = `dev-cap-${round}`;
      await device(store, id);
      const [s1, s2] = [await session(store, id), await session(store, id)];
      const results = await Promise.allSettled([
        store.recordIssuance({ request: request(id, 'a'), certificate: cert(id), authSessionId: s1, audit, maxActive: 1 }),
        other.recordIssuance({ request: request(id, 'b'), certificate: cert(id), authSessionId: s2, audit, maxActive: 1 }),
      ]);
      const ok = results.filter((r) => r.status === 'fulfilled' && r.value === true).length;
      const refused = results.filter((r) => r.status === 'rejected' && (r.reason as { code?: string }).code === 'policy_violation');
      assert.equal(ok, 1, `round ${round}: one issuance, got ${JSON.stringify(results.map((r) => r.status))}`);
      assert.equal(refused.length, 1, `round ${round}: the other is over the cap`);
      assert.equal(await store.countActiveCertificates(id, NOW), 1);
      // The refused one wrote nothing: no stored answer, its auth session still live.
      const answers = [await store.getRequest(id, 'a'), await store.getRequest(id, 'b')].filter(Boolean);
      assert.equal(answers.length, 1);
    }
    // Without maxActive the store does not count (the caller's policy decides).
    await device(store, 'dev-nocap');
    for (const r of ['x', 'y']) assert.equal(await store.recordIssuance({ request: request('dev-nocap', r), certificate: cert('dev-nocap'), authSessionId: await session(store, 'dev-nocap'), audit }), true);
    assert.equal(await store.countActiveCertificates('dev-nocap', NOW), 2);
  });

  test(`[${engine}] an external-CA claim per requestId: one holder across nodes, released by its holder only, taken over once expired`, async (t) => {
    const { store, reopen } = await open(t, engine);
    const other = await reopen();
    const claim = (node: string, at = NOW, ttl = 60_000) => ({ deviceId: 'dev-claim', requestId: 'r-1', node, claimedAt: at, expiresAt: at + ttl });
    // Two nodes at once: exactly one gets it, five times over.
    for (let round = 0; round < 5; round++) {
      const requestId = `race-${round}`;
      const got = await Promise.all([store, other, store, other].map((s, i) => s.claimExternalRequest({ ...claim(`node-${i}`), requestId })));
      assert.equal(got.filter(Boolean).length, 1, `round ${round}: ${JSON.stringify(got)}`);
    }
    assert.equal(await store.claimExternalRequest(claim('A')), true);
    assert.equal(await other.claimExternalRequest(claim('B', NOW + 1000)), false, 'a live claim is not taken');
    assert.equal(await store.claimExternalRequest(claim('A', NOW + 1000)), false, 'not even by its own node (a second request there)');
    assert.equal(await store.claimExternalRequest({ ...claim('B'), requestId: 'r-2' }), true, 'another requestId is another claim');
    // Only the holder releases it.
    await other.releaseExternalRequest('dev-claim', 'r-1', 'B');
    assert.equal((await store.getExternalClaim('dev-claim', 'r-1'))?.node, 'A');
    await store.releaseExternalRequest('dev-claim', 'r-1', 'A');
    assert.equal(await store.getExternalClaim('dev-claim', 'r-1'), null);
    assert.equal(await other.claimExternalRequest(claim('B', NOW + 2000)), true, 'free again once released');
    // The claim of a node that crashed expires and is taken over, once.
    const late = NOW + 2000 + 60_000;
    const takeover = await Promise.all([store.claimExternalRequest(claim('C', late)), other.claimExternalRequest(claim('D', late))]);
    assert.equal(takeover.filter(Boolean).length, 1, 'one node takes the expired claim over');
    assert.match((await store.getExternalClaim('dev-claim', 'r-1'))!.node, /^[CD]$/);
    assert.equal((await store.getExternalClaim('dev-claim', 'r-1'))!.expiresAt, late + 60_000);
  });

  test(`[${engine}] a certificate answer's CA chain is stored once and given back whole; answers stored inline still read`, async (t) => {
    const { store } = await open(t, engine);
    const chain = ['-----BEGIN CERTIFICATE-----\nDEVICE-CA\n-----END CERTIFICATE-----\n', '-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n'];
    const answers: Array<Record<string, unknown>> = [];
    for (const id of ['dev-c1', 'dev-c2', 'dev-c3']) {
      await device(store, id);
      const c = cert(id, { requestId: 'r1' });
      const answer = { requestId: 'r1', certificate: `PEM of ${id}`, chain, serial: c.serial };
      answers.push(answer);
      assert.equal(await store.recordIssuance({ request: request(id, 'r1', answer), certificate: c, authSessionId: await session(store, id), audit: { at: NOW, action: 'issue', outcome: 'ok' } }), true);
    }
    // A rolled-back issuance (consumed session) leaves nothing of its own chain behind.
    await device(store, 'dev-c4');
    const used = await session(store, 'dev-c4');
    assert.equal(await store.recordIssuance({ request: request('dev-c4', 'a'), certificate: cert('dev-c4'), authSessionId: used, audit: { at: NOW, action: 'issue', outcome: 'ok' } }), true);
    await assert.rejects(store.recordIssuance({ request: request('dev-c4', 'b', { requestId: 'b', chain: ['other'] }), certificate: cert('dev-c4'), authSessionId: used, audit: { at: NOW, action: 'issue', outcome: 'ok' } }));
    for (const [i, id] of ['dev-c1', 'dev-c2', 'dev-c3'].entries()) assert.deepEqual((await store.getRequest(id, 'r1'))?.response, answers[i]);
    const stored = await store.db.query('SELECT response FROM requests WHERE device_id LIKE ?', ['dev-c%']);
    assert.ok(stored.length >= 4 && stored.every((r) => !String(r.response).includes('DEVICE-CA')), 'no stored answer carries the chain itself');
    assert.deepEqual((await store.db.query('SELECT chain FROM answer_chains')).map((r) => JSON.parse(r.chain)), [chain]);
    // Another store on the same database (nothing cached) reads the chain from the table.
    const other = new SqlStore(store.db);
    assert.deepEqual((await other.getRequest('dev-c2', 'r1'))?.response, answers[1]);
    // An answer stored before the chain table, with its chain inline.
    await store.db.run('INSERT INTO requests (device_id, request_id, kind, body_hash, response, created_at) VALUES (?, ?, ?, ?, ?, ?)', ['dev-c1', 'old', 'csr', 'h', JSON.stringify({ requestId: 'old', chain: ['inline'] }), NOW]);
    assert.deepEqual((await store.getRequest('dev-c1', 'old'))?.response, { requestId: 'old', chain: ['inline'] });
  });

  test(`[${engine}] renewal supersedes, due list follows the policy fraction, revocation and CRL numbers`, async (t) => {
    const { store } = await open(t, engine);
    await device(store, 'dev-r');
    const old = cert('dev-r', { notBefore: NOW - 8 * DAY, notAfter: NOW + 2 * DAY });
    await store.recordGatewayEnrollment('gw-x', cert('gw-x', { kind: 'gateway' }), { at: NOW, action: 'enroll-gateway', outcome: 'ok', gatewayId: 'gw-x' });
    assert.equal((await store.getGateway('gw-x'))?.status, 'active');
    const s = await session(store, 'dev-r');
    assert.equal(await store.recordIssuance({ request: request('dev-r', 'r0'), certificate: old, authSessionId: s, audit: { at: NOW, action: 'issue', outcome: 'ok' } }), true);
    // 80 % of the lifetime has passed: due at 0.6667, not at 0.9.
    assert.deepEqual((await store.listDueForRenewal('default', 0.6667, NOW, 10)).map((c) => c.serial), [old.serial]);
    assert.deepEqual(await store.listDueForRenewal('default', 0.9, NOW, 10), []);
    assert.deepEqual(await store.listDueForRenewal('other', 0.6667, NOW, 10), []);

    const fresh = cert('dev-r');
    assert.equal(await store.recordRenewal({ request: { ...request('dev-r', 'rn'), kind: 'renew' }, certificate: fresh, supersedes: old.serial, audit: { at: NOW, action: 'renew', outcome: 'ok' } }), true);
    assert.equal((await store.getCertificate(old.serial))?.status, 'superseded');
    await assert.rejects(store.recordRenewal({ request: { ...request('dev-r', 'rn2'), kind: 'renew' }, certificate: cert('dev-r'), supersedes: old.serial, audit: { at: NOW, action: 'renew', outcome: 'ok' } }), /no longer active/);
    assert.equal(await store.getRequest('dev-r', 'rn2'), null);

    const revoked = await store.revokeCertificate(fresh.serial, 1, NOW + 7, { at: NOW + 7, action: 'revoke', outcome: 'ok', serial: fresh.serial });
    assert.deepEqual([revoked?.status, revoked?.revokedAt, revoked?.revocationReason], ['revoked', NOW + 7, 1]);
    assert.equal(await store.revokeCertificate(fresh.serial, 1, NOW, { at: NOW, action: 'revoke', outcome: 'ok' }), null, 'only an active one');
    assert.deepEqual((await store.listRevoked('device-ca')).map((c) => c.serial), [fresh.serial]);
    assert.deepEqual(await store.listRevoked('infra-ca'), []);

    // CRL numbers are bigints, exact beyond 2^53, and only ever go up.
    const big = 2n ** 62n + 3n;
    const der = randomBytes(300);
    assert.equal(await store.saveCrl({ issuer: 'device-ca', crlNumber: big, thisUpdate: NOW, nextUpdate: NOW + DAY, der }), true);
    assert.equal(await store.saveCrl({ issuer: 'device-ca', crlNumber: big, thisUpdate: NOW, nextUpdate: NOW + DAY, der: randomBytes(10) }), false);
    assert.equal(await store.saveCrl({ issuer: 'device-ca', crlNumber: 5n, thisUpdate: NOW, nextUpdate: NOW + DAY, der: randomBytes(10) }), false);
    const crl = (await store.getCrl('device-ca'))!;
    assert.equal(crl.crlNumber, big);
    assert.ok(crl.der.equals(der));
    assert.deepEqual([crl.thisUpdate, crl.nextUpdate], [NOW, NOW + DAY]);
    assert.equal(await store.saveCrl({ issuer: 'device-ca', crlNumber: big + 1n, thisUpdate: NOW, nextUpdate: NOW + DAY, der }), true);
    assert.equal(await store.getCrl('infra-ca'), null);
  });

  test(`[${engine}] registry sync marks, audit order, CA material, job claims`, async (t) => {
    const { store } = await open(t, engine);
    await device(store, 'dev-h');
    const s = await session(store, 'dev-h');
    const c = cert('dev-h');
    await store.recordIssuance({ request: request('dev-h', 'r'), certificate: c, authSessionId: s, audit: { at: NOW, action: 'issue', outcome: 'ok' } });
    assert.deepEqual((await store.listHubPending(10)).map((x) => x.serial), [c.serial]);
    await store.markHubSynced(c.serial, NOW, undefined, 'hub', 'revoked');
    assert.equal((await store.listHubPending(10)).length, 1, 'not marked: the state differs');
    await store.markHubSynced(c.serial, NOW, undefined, 'hub', 'active');
    assert.deepEqual(await store.listHubPending(10), []);
    assert.equal((await store.listHubPending(10, 'dps')).length, 1, 'targets are apart');
    await store.updateDevice('dev-h', { status: 'disabled' }, NOW);
    await store.setDeviceHubState('dev-h', 'present');
    assert.deepEqual(await store.listHubDecommissioned(10), ['dev-h']);
    await store.setDeviceHubState('dev-h', 'deleted');
    assert.deepEqual(await store.listHubDecommissioned(10), []);
    await assert.rejects(store.listHubPending(1, 'x; DROP TABLE devices' as never), /unknown registry target/);

    for (let i = 0; i < 3; i++) await store.appendAudit({ at: NOW + i, action: `a${i}`, outcome: 'ok' });
    const audit = await store.listAudit({ limit: 3 });
    assert.deepEqual(audit.map((a) => a.action), ['a2', 'a1', 'a0']);
    assert.ok(audit[0].seq > audit[1].seq && typeof audit[0].seq === 'number');

    const set = (tag: string) => (['root', 'device-ca', 'infra-ca'] as const).map((name) => ({ name, certPem: `${tag}-${name}-cert`, keyPem: `${tag}-${name}-key`, createdAt: NOW }));
    assert.deepEqual(await store.getCaMaterial(), []);
    assert.equal(await store.insertCaMaterialIfAbsent(set('first')), true);
    assert.equal(await store.insertCaMaterialIfAbsent(set('second')), false);
    assert.deepEqual((await store.getCaMaterial()).map((r) => r.certPem).sort(), set('first').map((r) => r.certPem).sort());

    assert.equal(await store.claimJob('scan', NOW, 60_000), true);
    assert.equal(await store.claimJob('scan', NOW + 59_999, 60_000), false);
    assert.equal(await store.claimJob('other', NOW, 60_000), true);
    assert.equal(await store.claimJob('scan', NOW + 60_000, 60_000), true);
  });
}

for (const engine of ENGINES) {
  test(`[${engine}] migration 006 keeps the CRL number of a base64 CRL; the authority signs the next number at start`, async (t) => {
    let driver: SqliteDriver | PostgresDriver;
    if (engine === 'sqlite') {
      const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-'));
      t.after(() => rmSync(dir, { recursive: true, force: true }));
      driver = new SqliteDriver(join(dir, 'old.db'));
    } else driver = new PostgresDriver({ url: (await pgSchema(t)).url });
    const store = new SqlStore(driver);
    t.after(() => store.close());
    // A database as the previous release left it: migrations 1-5, the CRL DER base64 in TEXT.
    await driver.migrate(listMigrations().filter((m) => m.version <= 5));
    await driver.run('INSERT INTO crls (issuer, crl_number, this_update, next_update, der) VALUES (?, ?, ?, ?, ?)', ['device-ca', 41, NOW, NOW + DAY, randomBytes(50).toString('base64')]);
    assert.deepEqual(await store.migrate(), listMigrations().filter((m) => m.version >= 6).map((m) => m.version));
    const carried = (await store.getCrl('device-ca'))!;
    assert.deepEqual([carried.crlNumber, carried.nextUpdate, carried.der.length], [41n, 0, 0]);

    const dir = mkdtempSync(join(tmpdir(), 'leafgate-ca-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const revocation = new Revocation({ store, ca: LocalCa.open(dir, 'test-passphrase-0123456789'), events: new AuthorityEvents(), crlValidityHours: 24 });
    await revocation.start();
    revocation.stop();
    assert.equal(revocation.crl().crlNumber, 42n);
    const stored = (await store.getCrl('device-ca'))!;
    assert.equal(stored.crlNumber, 42n);
    assert.ok(stored.der.equals(revocation.crl().der));
  });
}

test('[sqlite] the per-device active-certificate count uses the device index, not a walk over every active certificate', async (t) => {
  // Without planner statistics SQLite preferred the covering certificates_expiry index
  // (status, kind, not_after, subject_id) and scanned all active certificates per issuance.
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-plan-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const store = new SqliteStore(join(dir, 'a.db'));
  t.after(() => store.close());
  const plan = (await store.db.query<{ detail: string }>(`EXPLAIN QUERY PLAN ${countActiveSql('sqlite')}`, ['dev-x', 0])).map((r) => r.detail).join(' | ');
  assert.match(plan, /USING INDEX certificates_subject \(subject_id=\? AND status=\?\)/, plan);
  assert.doesNotMatch(plan, /certificates_expiry/, plan);
  assert.doesNotMatch(countActiveSql('postgres'), /INDEXED BY/, 'PostgreSQL keeps the portable statement');
});

test('[sqlite] concurrent transactions share one COMMIT; a failing one rolls back alone; no statement joins an open batch', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const store = new SqliteStore(join(dir, 'a.db'));
  t.after(() => store.close());
  const driver = store.db as SqliteDriver;
  const n = 40;
  for (let i = 0; i < n; i++) await device(store, `dev-${i}`);
  const sessions = await Promise.all(Array.from({ length: n }, (_, i) => session(store, `dev-${i}`)));
  const dup = cert('dev-0');
  const before = { ...driver.stats };
  const results = await Promise.allSettled(
    Array.from({ length: n }, (_, i) =>
      store.recordIssuance({
        request: request(`dev-${i}`, `r-${i}`),
        // Number 7 reuses number 3's serial: the primary key refuses it, in its own savepoint.
        certificate: i === 7 ? { ...dup, subjectId: 'dev-7', serial: 'SAME' } : i === 3 ? { ...dup, subjectId: 'dev-3', serial: 'SAME' } : cert(`dev-${i}`),
        authSessionId: sessions[i],
        audit: { at: NOW, action: 'issue', outcome: 'ok', deviceId: `dev-${i}` },
      }),
    ),
  );
  assert.equal(results[7].status, 'rejected');
  assert.deepEqual(results.filter((r) => r.status === 'fulfilled').length, n - 1);
  const committed = driver.stats.transactions - before.transactions;
  const batches = driver.stats.batches - before.batches;
  assert.equal(committed, n);
  assert.ok(batches < n, `${n} transactions in ${batches} commits`);
  assert.equal(await store.getRequest('dev-7', 'r-7'), null);
  assert.equal((await store.listAudit({ deviceId: 'dev-7' })).length, 0);
  assert.equal((await store.listCertificates({ kind: 'device' })).length, n - 1);

  // A read issued while a transaction is open waits for its COMMIT: it never sees (or joins) it.
  let inside = false;
  const tx = store.db.transaction(async (q) => {
    inside = true;
    await q.run("UPDATE devices SET status = 'enrolled' WHERE id = ?", ['dev-1']);
    await new Promise((r) => setImmediate(r));
    await q.run("UPDATE devices SET status = 'disabled' WHERE id = ?", ['dev-1']);
    inside = false;
  });
  const read = store.getDevice('dev-1').then((d) => ({ status: d?.status, inside }));
  await tx;
  assert.deepEqual(await read, { status: 'disabled', inside: false });
});

test('[postgres] two stores on one database: a requestId raced on both yields one answer; try-locks exclude each other', async (t) => {
  const { url } = await pgSchema(t);
  const a = await openStore(url);
  const b = await openStore(url);
  t.after(async () => {
    await a.close();
    await b.close();
  });
  await device(a, 'dev-p');
  for (let round = 0; round < 10; round++) {
    const sa = await session(a, 'dev-p');
    const sb = await session(b, 'dev-p');
    const ca = cert('dev-p');
    const cb = cert('dev-p');
    const [ra, rb] = await Promise.all([
      a.recordIssuance({ request: request('dev-p', `race-${round}`, { serial: ca.serial }), certificate: ca, authSessionId: sa, audit: { at: NOW, action: 'issue', outcome: 'ok', deviceId: 'dev-p', requestId: `race-${round}` } }),
      b.recordIssuance({ request: request('dev-p', `race-${round}`, { serial: cb.serial }), certificate: cb, authSessionId: sb, audit: { at: NOW, action: 'issue', outcome: 'ok', deviceId: 'dev-p', requestId: `race-${round}` } }),
    ]);
    assert.equal(Number(ra) + Number(rb), 1, `round ${round}: exactly one commit`);
    const stored = (await b.getRequest('dev-p', `race-${round}`))!.response.serial;
    assert.equal(stored, ra ? ca.serial : cb.serial);
  }
  assert.equal((await a.listCertificates({ subjectId: 'dev-p' })).length, 10);
  assert.equal((await a.listAudit({ deviceId: 'dev-p' })).length, 10);

  // exclusive(): held by a, b does not run; released, b runs.
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let entered!: () => void;
  const inA = new Promise<void>((r) => (entered = r));
  const first = a.exclusive('job', async () => {
    entered();
    await held;
    return 'a';
  });
  await inA;
  assert.deepEqual(await b.exclusive('job', async () => 'b'), { ran: false });
  assert.deepEqual(await b.exclusive('another-job', async () => 'b'), { ran: true, value: 'b' });
  release();
  assert.deepEqual(await first, { ran: true, value: 'a' });
  assert.deepEqual(await b.exclusive('job', async () => 'b'), { ran: true, value: 'b' });
});

test('[postgres] an unreachable server is a clear authority_unavailable error, without the password', async () => {
  await assert.rejects(openStore('postgres://leafgate:s3cret@127.0.0.1:1/none'), (err: any) => {
    assert.equal(err.code, 'authority_unavailable');
    assert.match(err.message, /cannot open the authority database: database unavailable \(postgres:\/\/leafgate@127\.0\.0\.1:1\/none\)/);
    assert.doesNotMatch(err.message, /s3cret/);
    return true;
  });
  await assert.rejects(openStore('postgres://x@127.0.0.1:1/db?schema=a;drop'), /schema must be a plain identifier/);
});

test('[sqlite] writes outside transactions join the durable group commit (fsync: true) and stay autocommits with fsync: false', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  for (const fsync of [true, false]) {
    const store = new SqliteStore(join(dir, `single-${fsync}.db`), { fsync });
    const driver = store.db as SqliteDriver;
    const before = { ...driver.stats };
    // Single statements of one turn: device rows, a challenge, a token, its consumption
    // (UPDATE .. RETURNING: a write that returns rows), an audit line.
    await Promise.all(Array.from({ length: 20 }, (_, i) => device(store, `dev-s${i}`)));
    await store.createEnrollmentToken('tok-hash', 'gw-s', NOW + 60_000);
    assert.equal(await store.consumeEnrollmentToken('tok-hash', NOW), 'gw-s', 'a write with RETURNING still returns its rows');
    assert.equal(await store.consumeEnrollmentToken('tok-hash', NOW), null, 'and is consumed once');
    await store.appendAudit({ at: NOW, action: 'note', outcome: 'ok', deviceId: 'dev-s0' });
    const transactions = driver.stats.transactions - before.transactions;
    const batches = driver.stats.batches - before.batches;
    if (fsync) {
      // Each write is a transaction of its own, answered after the batch's WAL fsync; the 20
      // device rows of one turn share commits.
      assert.ok(transactions >= 20 + 4, `${transactions} transactions`);
      assert.ok(batches < transactions, `${transactions} transactions in ${batches} commits`);
    } else {
      assert.equal(transactions, 0, 'autocommit statements, no group commit');
    }
    // Reads after the writes see them.
    assert.equal((await store.listDevices({})).length, 20);
    assert.equal((await store.listAudit({ deviceId: 'dev-s0' })).length, 1);
    await store.close();
  }
});

test('[sqlite] durable commits: answered after the WAL fsync, kept across a reopen; fsync: false answers without it; a bad databaseFsync is refused', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  for (const fsync of [true, false]) {
    const file = join(dir, `durable-${fsync}.db`);
    const store = new SqliteStore(file, { fsync });
    await device(store, 'dev-d');
    // Many transactions in one turn: one group commit, one fsync, every caller answered.
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => store.insertRequest({ ...request('dev-d', `q${i}`), kind: 'register' }, { at: NOW, action: 'register', outcome: 'ok', deviceId: 'dev-d' })));
    assert.ok(results.every(Boolean));
    // close() waits for a sync in flight.
    const last = store.insertRequest({ ...request('dev-d', 'last'), kind: 'register' }, { at: NOW, action: 'register', outcome: 'ok', deviceId: 'dev-d' });
    await store.close();
    assert.equal(await last, true);
    const again = new SqliteStore(file, { fsync });
    assert.equal((await again.listAudit({ deviceId: 'dev-d' })).length, 51);
    assert.ok(await again.getRequest('dev-d', 'last'));
    await again.close();
  }
  assert.throws(() => resolveAuthorityConfig({ caPassphrase: 'x'.repeat(16), databaseFsync: 'no' as unknown as boolean }, {}), /databaseFsync: must be boolean \(got "no"\)/);
});
