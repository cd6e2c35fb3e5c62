/**
 * Two parts of the store contract that test/store.test.ts does not cover, run against both
 * engines (the embedded SQLite file and the real PostgreSQL server, one random schema per
 * test, see test/support/pg.ts):
 *
 * - SqlStore.recordCompactIssuance, the compact flow's issuance commit (authority/store/types.ts):
 *   all or nothing, idempotent by requestId, the challenge burnt once (also between two
 *   stores on one database), the one-time code consumed once and bound to its device and
 *   group, the active-certificate cap counted inside the commit.
 * - DashboardQueries (authority/store/dashboard.ts) over a small hand-made data set, every
 *   expected value computed by hand from the seed below, so that an engine-specific answer
 *   (a bigint count read as a string, an unescaped LIKE wildcard, ...) fails on its engine.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { type SqlStore, type AuditEntry, type CertificateRow, type DevicePatch, type DeviceRow, type RequestRow } from '../authority/store/index.ts';
import { DashboardQueries, type DeviceListRow, type DeviceState } from '../authority/store/dashboard.ts';
import { SessionStore } from '../authority/dashboard/sessions.ts';
import { ENGINES, openTestStore } from './support/store.ts';

const open = openTestStore;

const NOW = 1_760_000_000_000;
const DAY = 86_400_000;
const HOUR = 3_600_000;
const MIN = 60_000;

// ---------------------------------------------------------------------------------------------
// recordCompactIssuance

function cert(subjectId: string, serial: string, extra: Partial<CertificateRow> = {}): CertificateRow {
  return {
    serial, subjectId, kind: 'device', issuer: 'device-ca', fingerprint: `FP:${serial}`, notBefore: NOW - DAY, notAfter: NOW + 9 * DAY, status: 'active', requestId: null,
    pem: `-----BEGIN CERTIFICATE-----\n${serial}\n-----END CERTIFICATE-----\n`, revokedAt: null, revocationReason: null, createdAt: NOW, ...extra,
  };
}

function enrollRequest(deviceId: string, requestId: string, serial: string, chain = ['CHAIN-LEAF-CA', 'CHAIN-ROOT']): RequestRow {
  return { deviceId, requestId, kind: 'enroll', bodyHash: `hash-${requestId}`, response: { requestId, serial, chain }, createdAt: NOW };
}

function compactAudit(deviceId: string, requestId: string, serial: string): AuditEntry {
  return { at: NOW, action: 'issue', outcome: 'ok', deviceId, gatewayId: 'gw-2', requestId, serial, detail: { flow: 'compact', method: 'ddkg' } };
}

async function registered(store: SqlStore, id: string, group = 'default'): Promise<void> {
  assert.equal(await store.insertDevice({
    id, groupName: group, method: 'ddkg', status: 'registered', gatewayId: 'gw-1', ddkgSalt: 'salt', ddkgPublicKey: null, birthCertFingerprint: null, createdAt: NOW - DAY, updatedAt: NOW - DAY,
  }), true);
}

async function compactChallenge(store: SqlStore, id: string, deviceId: string): Promise<void> {
  await store.insertChallenge({ id, deviceId, gatewayId: 'gw-1', method: 'ddkg', nonce: `nonce-${id}`, context: { compact: true }, expiresAt: NOW + 60_000, usedAt: null });
}

/** Everything the commit may write, so that "nothing written" is one comparison. */
async function snapshot(store: SqlStore) {
  const q = (sql: string) => store.db.query(sql);
  return {
    requests: await q('SELECT device_id, request_id, kind, body_hash, response, created_at FROM requests ORDER BY device_id, request_id'),
    chains: await q('SELECT ref FROM answer_chains ORDER BY ref'),
    certificates: await q('SELECT serial, subject_id, status, not_after FROM certificates ORDER BY serial'),
    audit: await q('SELECT seq, action, device_id, request_id, serial FROM audit_log ORDER BY seq'),
    challenges: await q('SELECT id, used_at FROM challenges ORDER BY id'),
    codes: await q('SELECT code_hash, used_at FROM enrollment_codes ORDER BY code_hash'),
    devices: await q('SELECT * FROM devices ORDER BY id'),
  };
}

async function codeUsedAt(store: SqlStore, codeHash: string): Promise<number | null> {
  const r = await store.db.one('SELECT used_at FROM enrollment_codes WHERE code_hash = ?', [codeHash]);
  assert.ok(r, `code ${codeHash} exists`);
  return r.used_at == null ? null : Number(r.used_at);
}

function isCode(code: string) {
  return (err: unknown) => {
    assert.equal((err as { code?: string }).code, code, `expected LeafgateError ${code}, got ${String(err)}`);
    return true;
  };
}

const ENROLL_PATCH: DevicePatch = { status: 'enrolled', ddkgPublicKey: 'SPKI-PEM-1', gatewayId: 'gw-2' };

for (const engine of ENGINES) {
  test(`[${engine}] compact issuance: one commit writes everything; a repeated requestId, a replayed challenge or a bad one-time code write nothing`, async (t) => {
    const { store } = await open(t, engine);
    await registered(store, 'dev-c');
    await registered(store, 'dev-other');
    await compactChallenge(store, 'ch-1', 'dev-c');
    await compactChallenge(store, 'ch-2', 'dev-c');
    await store.createEnrollmentCode('code-1', 'dev-c', 'default', NOW + 60_000);
    await store.createEnrollmentCode('code-2', 'dev-c', 'default', NOW + 60_000);
    await store.createEnrollmentCode('code-expired', 'dev-c', 'default', NOW); // expires_at = now: expired
    await store.createEnrollmentCode('code-other-device', 'dev-other', 'default', NOW + 60_000);
    await store.createEnrollmentCode('code-other-group', 'dev-c', 'g2', NOW + 60_000);

    // The first commit: answer (with its chain), challenge burnt, code consumed, device
    // patched and moved to the gateway, certificate and audit row.
    const c1 = cert('dev-c', 'AA01', { requestId: 'r1' });
    assert.equal(await store.recordCompactIssuance({
      request: enrollRequest('dev-c', 'r1', c1.serial), certificate: c1, challengeId: 'ch-1', consumeCode: { codeHash: 'code-1', groupName: 'default' },
      devicePatch: ENROLL_PATCH, maxActive: 5, audit: compactAudit('dev-c', 'r1', c1.serial),
    }), true);
    const answer = (await store.getRequest('dev-c', 'r1'))!;
    assert.deepEqual({ ...answer }, { deviceId: 'dev-c', requestId: 'r1', kind: 'enroll', bodyHash: 'hash-r1', response: { requestId: 'r1', serial: 'AA01', chain: ['CHAIN-LEAF-CA', 'CHAIN-ROOT'] }, createdAt: NOW });
    assert.equal((await store.getChallenge('ch-1'))?.usedAt, NOW, 'the challenge is burnt');
    assert.equal((await store.getChallenge('ch-2'))?.usedAt, null, 'and only that one');
    assert.equal(await codeUsedAt(store, 'code-1'), NOW, 'the code is consumed');
    assert.equal(await codeUsedAt(store, 'code-2'), null);
    const d = (await store.getDevice('dev-c'))!;
    assert.deepEqual([d.status, d.ddkgPublicKey, d.gatewayId, d.updatedAt, d.createdAt, d.groupName], ['enrolled', 'SPKI-PEM-1', 'gw-2', NOW, NOW - DAY, 'default']);
    assert.equal((await store.getDevice('dev-other'))?.status, 'registered', 'another device is not patched');
    assert.deepEqual(await store.getCertificate('AA01'), c1);
    const audit = await store.listAudit({ deviceId: 'dev-c' });
    assert.deepEqual(audit.map(({ seq: _seq, ...a }) => a), [{ at: NOW, action: 'issue', outcome: 'ok', code: null, deviceId: 'dev-c', gatewayId: 'gw-2', requestId: 'r1', serial: 'AA01', detail: { flow: 'compact', method: 'ddkg' } }]);
    assert.equal(typeof audit[0].seq, 'number');

    const after = await snapshot(store);
    const unchanged = async (what: string) => assert.deepEqual(await snapshot(store), after, `${what}: nothing written`);

    // The same requestId again: false, and nothing written -- neither with the used challenge
    // (the answer exists: it is not a replay) nor with a fresh challenge and a fresh code.
    const dup = { certificate: cert('dev-c', 'AA02'), devicePatch: { ...ENROLL_PATCH, ddkgPublicKey: 'SPKI-PEM-2', gatewayId: 'gw-3' }, maxActive: 5, audit: compactAudit('dev-c', 'r1', 'AA02') };
    assert.equal(await store.recordCompactIssuance({ ...dup, request: enrollRequest('dev-c', 'r1', 'AA02', ['OTHER-CHAIN']), challengeId: 'ch-1' }), false);
    await unchanged('same requestId, used challenge');
    assert.equal(await store.recordCompactIssuance({ ...dup, request: enrollRequest('dev-c', 'r1', 'AA02', ['OTHER-CHAIN']), challengeId: 'ch-2', consumeCode: { codeHash: 'code-2', groupName: 'default' } }), false);
    await unchanged('same requestId, fresh challenge and code');
    assert.equal((await store.getChallenge('ch-2'))?.usedAt, null, 'the fresh challenge is not burnt');
    assert.equal(await codeUsedAt(store, 'code-2'), null, 'the fresh code is not consumed');
    assert.equal(await store.getCertificate('AA02'), null);
    assert.deepEqual((await store.getRequest('dev-c', 'r1'))?.response, { requestId: 'r1', serial: 'AA01', chain: ['CHAIN-LEAF-CA', 'CHAIN-ROOT'] }, 'the first answer stays');

    // A used challenge under a new requestId: replayed, and nothing written (no answer, no
    // chain row, no certificate, no audit row, the valid code not consumed, no device patch).
    const fresh = (requestId: string, serial: string, extra: { challengeId: string; consumeCode?: { codeHash: string; groupName: string } }) => ({
      request: enrollRequest('dev-c', requestId, serial, [`NEW-CHAIN-${requestId}`]), certificate: cert('dev-c', serial, { requestId }),
      devicePatch: { ...ENROLL_PATCH, ddkgPublicKey: 'SPKI-PEM-3', gatewayId: 'gw-3' }, maxActive: 5, audit: compactAudit('dev-c', requestId, serial), ...extra,
    });
    await assert.rejects(store.recordCompactIssuance(fresh('r2', 'AA03', { challengeId: 'ch-1', consumeCode: { codeHash: 'code-2', groupName: 'default' } })), isCode('replayed'));
    await unchanged('replayed challenge');
    assert.equal(await store.getRequest('dev-c', 'r2'), null);
    assert.equal(await store.getCertificate('AA03'), null);
    assert.equal(await codeUsedAt(store, 'code-2'), null, 'a replay does not consume the code');
    assert.equal((await store.getDevice('dev-c'))?.ddkgPublicKey, 'SPKI-PEM-1', 'a replay does not patch the device');
    assert.equal((await store.listAudit({ deviceId: 'dev-c' })).length, 1);
    // Without a code too, and for a challenge that does not exist.
    await assert.rejects(store.recordCompactIssuance(fresh('r2', 'AA03', { challengeId: 'ch-1' })), isCode('replayed'));
    await assert.rejects(store.recordCompactIssuance(fresh('r2', 'AA03', { challengeId: 'ch-none' })), isCode('replayed'));
    await unchanged('replayed or unknown challenge without a code');

    // A one-time code that is unknown, used, expired, another device's or another group's:
    // enrollment_required, and nothing written -- the challenge is not burnt either.
    const badCodes: Array<[string, { codeHash: string; groupName: string }]> = [
      ['unknown', { codeHash: 'code-unknown', groupName: 'default' }],
      ['used', { codeHash: 'code-1', groupName: 'default' }],
      ['expired', { codeHash: 'code-expired', groupName: 'default' }],
      ['another device\'s', { codeHash: 'code-other-device', groupName: 'default' }],
      ['another group\'s', { codeHash: 'code-other-group', groupName: 'default' }],
      ['bound to another group', { codeHash: 'code-2', groupName: 'g2' }],
    ];
    for (const [what, consumeCode] of badCodes) {
      await assert.rejects(store.recordCompactIssuance(fresh('r3', 'AA04', { challengeId: 'ch-2', consumeCode })), isCode('enrollment_required'), `${what} code`);
      await unchanged(`${what} code`);
      assert.equal((await store.getChallenge('ch-2'))?.usedAt, null, `${what} code: the challenge is not burnt`);
    }
    for (const c of ['code-2', 'code-expired', 'code-other-device', 'code-other-group']) assert.equal(await codeUsedAt(store, c), null, `${c} not consumed`);

    // The fresh challenge and code still work, once; without a code the commit needs none.
    assert.equal(await store.recordCompactIssuance(fresh('r3', 'AA04', { challengeId: 'ch-2', consumeCode: { codeHash: 'code-2', groupName: 'default' } })), true);
    assert.equal(await codeUsedAt(store, 'code-2'), NOW);
    assert.equal((await store.getChallenge('ch-2'))?.usedAt, NOW);
    assert.equal((await store.getDevice('dev-c'))?.gatewayId, 'gw-3');
    await compactChallenge(store, 'ch-3', 'dev-c');
    assert.equal(await store.recordCompactIssuance(fresh('r4', 'AA05', { challengeId: 'ch-3' })), true);
    assert.deepEqual((await store.listCertificates({ subjectId: 'dev-c' })).map((c) => c.serial).sort(), ['AA01', 'AA04', 'AA05']);
    assert.deepEqual((await store.listAudit({ deviceId: 'dev-c' })).map((a) => a.requestId), ['r4', 'r3', 'r1']);
  });

  test(`[${engine}] compact issuance: the active-certificate cap counts this device's active, unexpired certificates inside the commit`, async (t) => {
    const { store } = await open(t, engine);
    await registered(store, 'dev-cap');
    await registered(store, 'dev-neighbour');
    // One certificate that counts; four that do not (revoked, superseded, expired now,
    // another device's).
    await store.ensureCertificates([
      cert('dev-cap', 'B1'),
      cert('dev-cap', 'B2', { status: 'revoked' }),
      cert('dev-cap', 'B3', { status: 'superseded' }),
      cert('dev-cap', 'B4', { notAfter: NOW }),
      cert('dev-neighbour', 'B5'), cert('dev-neighbour', 'B6'), cert('dev-neighbour', 'B7'),
    ]);
    assert.equal(await store.countActiveCertificates('dev-cap', NOW), 1);
    for (const id of ['ch-a', 'ch-b', 'ch-c']) await compactChallenge(store, id, 'dev-cap');
    await store.createEnrollmentCode('code-cap', 'dev-cap', 'default', NOW + 60_000);
    const attempt = (requestId: string, serial: string, challengeId: string, maxActive: number) => store.recordCompactIssuance({
      request: enrollRequest('dev-cap', requestId, serial), certificate: cert('dev-cap', serial, { requestId }), challengeId, consumeCode: { codeHash: 'code-cap', groupName: 'default' },
      devicePatch: ENROLL_PATCH, maxActive, audit: compactAudit('dev-cap', requestId, serial),
    });

    // 1 active of at most 1: over the cap, nothing written (challenge, code, device untouched).
    const before = await snapshot(store);
    await assert.rejects(attempt('r1', 'C1', 'ch-a', 1), isCode('policy_violation'));
    assert.deepEqual(await snapshot(store), before, 'over the cap: nothing written');
    assert.equal((await store.getChallenge('ch-a'))?.usedAt, null);
    assert.equal(await codeUsedAt(store, 'code-cap'), null);
    assert.equal((await store.getDevice('dev-cap'))?.status, 'registered');

    // 1 active of at most 2: the others do not count, so it passes.
    assert.equal(await attempt('r1', 'C1', 'ch-a', 2), true);
    assert.equal(await store.countActiveCertificates('dev-cap', NOW), 2);
    // Now 2 of at most 2: refused, nothing written.
    const full = await snapshot(store);
    await assert.rejects(store.recordCompactIssuance({
      request: enrollRequest('dev-cap', 'r2', 'C2'), certificate: cert('dev-cap', 'C2'), challengeId: 'ch-b', devicePatch: { gatewayId: 'gw-9' }, maxActive: 2, audit: compactAudit('dev-cap', 'r2', 'C2'),
    }), isCode('policy_violation'));
    assert.deepEqual(await snapshot(store), full, 'at the cap: nothing written');
    // 2 of at most 3: passes.
    assert.equal(await store.recordCompactIssuance({
      request: enrollRequest('dev-cap', 'r2', 'C2'), certificate: cert('dev-cap', 'C2'), challengeId: 'ch-b', devicePatch: { gatewayId: 'gw-9' }, maxActive: 3, audit: compactAudit('dev-cap', 'r2', 'C2'),
    }), true);
    assert.equal((await store.getDevice('dev-cap'))?.gatewayId, 'gw-9');
    assert.equal(await store.countActiveCertificates('dev-cap', NOW), 3);
  });

  test(`[${engine}] compact issuance: two stores on one database answering one challenge under two requestIds -- one commits, the other is replayed`, async (t) => {
    const { store: a, reopen } = await open(t, engine);
    const b = await reopen();
    await registered(a, 'dev-race');
    const rounds = 10;
    for (let round = 0; round < rounds; round++) {
      const challengeId = `ch-race-${round}`;
      await compactChallenge(a, challengeId, 'dev-race');
      const [ra, rb] = [`ra-${round}`, `rb-${round}`];
      const [sa, sb] = [`D${round}A`, `D${round}B`];
      const results = await Promise.allSettled([
        a.recordCompactIssuance({ request: enrollRequest('dev-race', ra, sa), certificate: cert('dev-race', sa), challengeId, devicePatch: ENROLL_PATCH, maxActive: 1000, audit: compactAudit('dev-race', ra, sa) }),
        b.recordCompactIssuance({ request: enrollRequest('dev-race', rb, sb), certificate: cert('dev-race', sb), challengeId, devicePatch: ENROLL_PATCH, maxActive: 1000, audit: compactAudit('dev-race', rb, sb) }),
      ]);
      const ok = results.map((r) => r.status === 'fulfilled' && r.value === true);
      const replayed = results.filter((r) => r.status === 'rejected' && (r.reason as { code?: string }).code === 'replayed').length;
      assert.equal(ok.filter(Boolean).length, 1, `round ${round}: one commit, got ${JSON.stringify(results.map((r) => (r.status === 'fulfilled' ? r.value : String(r.reason))))}`);
      assert.equal(replayed, 1, `round ${round}: the other is replayed`);
      const [winner, loser] = ok[0] ? [[ra, sa], [rb, sb]] : [[rb, sb], [ra, sa]];
      assert.equal((await b.getRequest('dev-race', winner[0]))?.response.serial, winner[1]);
      assert.equal(await a.getRequest('dev-race', loser[0]), null, `round ${round}: no answer stored for the loser`);
      assert.equal(await b.getCertificate(loser[1]), null, `round ${round}: no certificate for the loser`);
    }
    assert.equal((await a.listCertificates({ subjectId: 'dev-race' })).length, rounds);
    assert.equal((await b.listAudit({ deviceId: 'dev-race' })).length, rounds);
    assert.equal(Number((await a.db.one("SELECT COUNT(*) AS n FROM requests WHERE device_id = 'dev-race'"))?.n), rounds);
  });

  test(`[${engine}] compact issuance: two stores on one database issuing to one device at once cannot together pass the cap`, async (t) => {
    const { store: a, reopen } = await open(t, engine);
    const b = await reopen();
    for (let round = 0; round < 8; round++) {
      const id = `dev-cap-race-${round}`;
      await registered(a, id);
      await compactChallenge(a, `ch-${round}-a`, id);
      await compactChallenge(a, `ch-${round}-b`, id);
      const results = await Promise.allSettled([
        a.recordCompactIssuance({ request: enrollRequest(id, 'ra', `E${round}A`), certificate: cert(id, `E${round}A`), challengeId: `ch-${round}-a`, devicePatch: ENROLL_PATCH, maxActive: 1, audit: compactAudit(id, 'ra', `E${round}A`) }),
        b.recordCompactIssuance({ request: enrollRequest(id, 'rb', `E${round}B`), certificate: cert(id, `E${round}B`), challengeId: `ch-${round}-b`, devicePatch: ENROLL_PATCH, maxActive: 1, audit: compactAudit(id, 'rb', `E${round}B`) }),
      ]);
      const ok = results.filter((r) => r.status === 'fulfilled' && r.value === true).length;
      const refused = results.filter((r) => r.status === 'rejected' && (r.reason as { code?: string }).code === 'policy_violation').length;
      assert.equal(ok, 1, `round ${round}: one issuance, got ${JSON.stringify(results.map((r) => (r.status === 'fulfilled' ? r.value : String(r.reason))))}`);
      assert.equal(refused, 1, `round ${round}: the other is over the cap`);
      assert.equal(await a.countActiveCertificates(id, NOW), 1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// DashboardQueries over a hand-made data set

interface SeedDevice { id: string; status: DeviceRow['status']; gatewayId: string | null; group?: string; method?: DeviceRow['method']; hubState?: 'present' | 'disabled' | 'deleted' }
/**
 * Device ids sort bytewise: '%' 0x25 < '-' 0x2d < '\' 0x5c < '_' 0x5f < 'o' < 0xc3 ('é').
 * 'dev%x', 'dev\y' and 'dev_1' are there for the id-prefix search: `_` and `%` are LIKE
 * wildcards and `\` is its escape character.
 */
const DEVICES: SeedDevice[] = [
  { id: 'dev%x', status: 'registered', gatewayId: 'gw-c' },
  { id: 'dev-1', status: 'registered', gatewayId: 'gw-a' },
  { id: 'dev-2', status: 'enrolled', gatewayId: 'gw-a', hubState: 'present' },
  { id: 'dev-3', status: 'enrolled', gatewayId: 'gw-b', method: 'pki-signature' },
  { id: 'dev-4', status: 'disabled', gatewayId: 'gw-a', hubState: 'disabled' },
  { id: 'dev-5', status: 'enrolled', gatewayId: 'gw-a', group: 'g2' },
  { id: 'dev-é', status: 'registered', gatewayId: null },
  { id: 'dev\\y', status: 'disabled', gatewayId: 'gw-b' },
  { id: 'dev_1', status: 'enrolled', gatewayId: 'gw-b' },
  { id: 'other-1', status: 'enrolled', gatewayId: 'gw-c' },
];
const ALL_IDS = DEVICES.map((d) => d.id);

interface SeedCert {
  serial: string; subject: string; kind: CertificateRow['kind']; status: CertificateRow['status']; notAfter: number; createdAt: number;
  revokedAt?: number; reason?: number; hubSyncedAt?: number; hubError?: string; hubFailedAt?: number; dpsSyncedAt?: number; dpsFailedAt?: number;
}
const CERTS: SeedCert[] = [
  { serial: 'C01', subject: 'dev-2', kind: 'device', status: 'active', notAfter: NOW + 60 * DAY, createdAt: NOW - 10 * DAY, hubError: 'boom', hubFailedAt: NOW - DAY }, // parked (hub)
  { serial: 'C02', subject: 'dev-3', kind: 'device', status: 'superseded', notAfter: NOW + 90 * DAY, createdAt: NOW - 20 * DAY },
  { serial: 'C03', subject: 'dev-3', kind: 'device', status: 'active', notAfter: NOW + 5 * DAY, createdAt: NOW - 9 * DAY, dpsFailedAt: NOW - DAY }, // parked (dps)
  { serial: 'C04', subject: 'dev-4', kind: 'device', status: 'revoked', notAfter: NOW + 40 * DAY, createdAt: NOW - 8 * DAY, revokedAt: NOW - DAY, reason: 1, hubFailedAt: NOW - DAY, dpsFailedAt: NOW - DAY }, // parked (both): one row
  { serial: 'C05', subject: 'dev-5', kind: 'device', status: 'active', notAfter: NOW - DAY, createdAt: NOW - 7 * DAY }, // expired
  { serial: 'C06', subject: 'dev-5', kind: 'device', status: 'revoked', notAfter: NOW + 10 * DAY, createdAt: NOW - 7 * DAY, revokedAt: NOW - 2 * DAY, reason: 4 },
  { serial: 'C07', subject: 'dev-5', kind: 'device', status: 'active', notAfter: NOW + 20 * DAY, createdAt: NOW - 6 * DAY, hubSyncedAt: NOW, hubFailedAt: NOW - DAY }, // synced since: not parked
  { serial: 'C08', subject: 'other-1', kind: 'device', status: 'active', notAfter: NOW + 30 * DAY, createdAt: NOW - 5 * DAY }, // expiring: the window's last instant
  { serial: 'C09', subject: 'dev_1', kind: 'device', status: 'active', notAfter: NOW + 30 * DAY + 1, createdAt: NOW - 5 * DAY }, // just past the window
  { serial: 'C10', subject: 'dev-5', kind: 'device', status: 'active', notAfter: NOW + 25 * DAY, createdAt: NOW - 3 * DAY },
  { serial: 'C11', subject: 'dev-4', kind: 'device', status: 'revoked', notAfter: NOW + 50 * DAY, createdAt: NOW - 12 * DAY, revokedAt: NOW - DAY, reason: 1 },
  { serial: 'G-A1', subject: 'gw-a', kind: 'gateway', status: 'active', notAfter: NOW + 300 * DAY, createdAt: NOW - 30 * DAY },
  { serial: 'G-B1', subject: 'gw-b', kind: 'gateway', status: 'active', notAfter: NOW + 7 * DAY, createdAt: NOW - 30 * DAY, hubFailedAt: NOW - DAY }, // not a device: no sync failure
  { serial: 'S-A1', subject: 'gw-a', kind: 'subca', status: 'active', notAfter: NOW + 200 * DAY, createdAt: NOW - 29 * DAY },
  { serial: 'S-A2', subject: 'gw-a', kind: 'subca', status: 'active', notAfter: NOW + 100 * DAY, createdAt: NOW - 29 * DAY },
  { serial: 'S-A3', subject: 'gw-a', kind: 'subca', status: 'revoked', notAfter: NOW + 400 * DAY, createdAt: NOW - 28 * DAY, revokedAt: NOW - DAY, reason: 5 },
  { serial: 'S-A4', subject: 'gw-a', kind: 'subca', status: 'active', notAfter: NOW - DAY, createdAt: NOW - 40 * DAY },
];

const GATEWAYS = [
  { id: 'gw-a', status: 'active', certSerial: 'G-A1', createdAt: NOW - 30 * DAY, updatedAt: NOW - 30 * DAY },
  { id: 'gw-b', status: 'disabled', certSerial: 'G-B1', createdAt: NOW - 30 * DAY, updatedAt: NOW - 2 * DAY },
  { id: 'gw-c', status: 'active', certSerial: null, createdAt: NOW - 20 * DAY, updatedAt: NOW - 20 * DAY },
  { id: 'gw-d', status: 'active', certSerial: 'MISSING', createdAt: NOW - 10 * DAY, updatedAt: NOW - 10 * DAY },
] as const;

/** In seq order (and time order). Index i is the row with the i-th smallest seq. */
const AUDIT: AuditEntry[] = [
  /* 0 */ { at: NOW - 3 * DAY, action: 'note', outcome: 'ok' }, // its detail is written raw: not JSON
  /* 1 */ { at: NOW - 2 * DAY, action: 'issue', outcome: 'ok', deviceId: 'dev-2', gatewayId: 'gw-a', requestId: 'r-1', serial: 'C01', detail: { ca: 'device-ca' } },
  /* 2 */ { at: NOW - 5 * HOUR, action: 'revoke', outcome: 'ok', deviceId: 'dev-4', serial: 'C04', detail: { reason: 1 } },
  /* 3 */ { at: NOW - 4 * HOUR - 1, action: 'auth', outcome: 'refused', code: 'auth_failed', deviceId: 'dev-1', gatewayId: 'gw-a', requestId: 'r-2' },
  /* 4 */ { at: NOW - 4 * HOUR, action: 'issue', outcome: 'ok', deviceId: 'dev-3', gatewayId: 'gw-b', requestId: 'r-3', serial: 'C03' },
  /* 5 */ { at: NOW - 3 * HOUR - 1, action: 'issue', outcome: 'refused', code: 'policy_violation', deviceId: 'dev-1', gatewayId: 'gw-a', requestId: 'r-4' },
  /* 6 */ { at: NOW - 3 * HOUR, action: 'renew', outcome: 'ok', deviceId: 'dev-5', gatewayId: 'gw-a', requestId: 'r-5', serial: 'C07' },
  /* 7 */ { at: NOW - 150 * MIN, action: 'issue', outcome: 'error', code: 'internal', deviceId: 'dev-5', gatewayId: 'gw-a', requestId: 'r-6' },
  /* 8 */ { at: NOW - 2 * HOUR, action: 'issue', outcome: 'ok', deviceId: 'dev_1', gatewayId: 'gw-b', requestId: 'r-7', serial: 'C09', detail: { flow: 'compact' } },
  /* 9 */ { at: NOW - 90 * MIN, action: 'auth', outcome: 'refused', code: 'auth_failed', deviceId: 'dev%x' },
  /* 10 */ { at: NOW - 30 * MIN, action: 'enroll-gateway', outcome: 'ok', gatewayId: 'gw-b', serial: 'G-B1' },
  /* 11 */ { at: NOW - 1, action: 'issue', outcome: 'ok', deviceId: 'other-1', requestId: 'r-8', serial: 'C08' },
  /* 12 */ { at: NOW, action: 'issue', outcome: 'ok', deviceId: 'dev-2', gatewayId: 'gw-a', requestId: 'r-9' },
];

async function seedDashboard(store: SqlStore): Promise<{ seqs: number[] }> {
  for (const g of GATEWAYS) {
    await store.db.run('INSERT INTO gateways (id, status, cert_serial, cert_fingerprint, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)',
      [g.id, g.status, g.certSerial, g.certSerial && `FP:${g.certSerial}`, g.createdAt, g.updatedAt]);
  }
  for (const [i, d] of DEVICES.entries()) {
    assert.equal(await store.insertDevice(seedDeviceRow(d, i)), true);
    if (d.hubState) await store.setDeviceHubState(d.id, d.hubState);
  }
  for (const c of CERTS) {
    await store.db.run(
      `INSERT INTO certificates (serial, subject_id, kind, fingerprint, not_before, not_after, status, request_id, pem, revoked_at, revocation_reason, created_at, issuer,
         hub_synced_at, hub_error, hub_failed_at, dps_synced_at, dps_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [c.serial, c.subject, c.kind, `FP:${c.serial}`, c.createdAt, c.notAfter, c.status, `req-${c.serial}`, `PEM ${c.serial}`, c.revokedAt ?? null, c.reason ?? null, c.createdAt,
        c.kind === 'device' ? 'device-ca' : c.kind === 'subca' ? 'edge-issuer' : 'infra-ca', c.hubSyncedAt ?? null, c.hubError ?? null, c.hubFailedAt ?? null, c.dpsSyncedAt ?? null, c.dpsFailedAt ?? null],
    );
  }
  await store.db.run('INSERT INTO audit_log (at, action, outcome, detail) VALUES (?, ?, ?, ?)', [AUDIT[0].at, AUDIT[0].action, AUDIT[0].outcome, 'not json {']);
  for (const e of AUDIT.slice(1)) await store.appendAudit(e);
  const seqs = (await store.db.query('SELECT seq FROM audit_log ORDER BY seq')).map((r) => Number(r.seq));
  assert.equal(seqs.length, AUDIT.length);
  return { seqs };
}

function seedDeviceRow(d: SeedDevice, i: number): DeviceRow {
  return {
    id: d.id, groupName: d.group ?? 'default', method: d.method ?? 'ddkg', status: d.status, gatewayId: d.gatewayId, ddkgSalt: `salt-${i}`,
    ddkgPublicKey: d.status === 'enrolled' ? `SPKI ${d.id}` : null, birthCertFingerprint: d.method === 'pki-signature' ? `BIRTH ${d.id}` : null, createdAt: NOW - (40 - i) * DAY, updatedAt: NOW - (20 - i) * DAY,
  };
}

/** Latest expiry among each device's active certificates (expired ones included), by hand from CERTS. */
const CERT_NOT_AFTER: Record<string, number | null> = {
  'dev%x': null, 'dev-1': null, 'dev-2': NOW + 60 * DAY, 'dev-3': NOW + 5 * DAY /* C02 is superseded */, 'dev-4': null /* only revoked ones */,
  'dev-5': NOW + 25 * DAY /* C10; C06 revoked, C05 expired */, 'dev-é': null, 'dev\\y': null, 'dev_1': NOW + 30 * DAY + 1, 'other-1': NOW + 30 * DAY,
};

function expectedDevices(ids: string[]): DeviceListRow[] {
  return ids.map((id) => {
    const i = DEVICES.findIndex((d) => d.id === id);
    assert.ok(i >= 0, id);
    return { ...seedDeviceRow(DEVICES[i], i), hubState: DEVICES[i].hubState ?? null, certNotAfter: CERT_NOT_AFTER[id] };
  });
}

function expectedCert(serial: string) {
  const c = CERTS.find((x) => x.serial === serial)!;
  return {
    serial, subjectId: c.subject, kind: c.kind, fingerprint: `FP:${serial}`, notBefore: c.createdAt, notAfter: c.notAfter, status: c.status, requestId: `req-${serial}`, pem: `PEM ${serial}`,
    revokedAt: c.revokedAt ?? null, revocationReason: c.reason ?? null, createdAt: c.createdAt, issuer: c.kind === 'device' ? 'device-ca' : c.kind === 'subca' ? 'edge-issuer' : 'infra-ca', hubError: c.hubError ?? null,
  };
}

/** Newest first: created_at DESC, serial DESC (ties: C09/C08 at -5 d, C06/C05 at -7 d, S-A2/S-A1 at -29 d, G-B1/G-A1 at -30 d). */
const CERTS_NEWEST_FIRST = ['C10', 'C09', 'C08', 'C07', 'C06', 'C05', 'C04', 'C03', 'C01', 'C11', 'C02', 'S-A3', 'S-A2', 'S-A1', 'G-B1', 'G-A1', 'S-A4'];

for (const engine of ENGINES) {
  test(`[${engine}] dashboard queries over a seeded data set: counts, series, gateways`, async (t) => {
    const { store } = await open(t, engine);
    await seedDashboard(store);
    const q = new DashboardQueries(store.db);

    // registered: dev%x dev-1 dev-é; enrolled: dev-2 dev-3 dev-5 dev_1 other-1; disabled: dev-4 dev\y;
    // active (an active, unexpired device cert): dev-2 dev-3 dev-5 dev_1 other-1;
    // expiring within 30 d: dev-3 (C03), dev-5 (C07, C10: once), other-1 (C08 at exactly +30 d);
    // revoked: dev-4 (C04, C11: once), dev-5 (C06) -- S-A3 is not a device's;
    // parked syncs: C01 (hub), C03 (dps), C04 (both: one row); not C07 (synced), not G-B1 (a gateway's).
    assert.deepStrictEqual(await q.deviceCounts(NOW, 30), { registered: 3, enrolled: 5, decommissioned: 2, active: 5, expiring: 3, revoked: 2, syncFailed: 3 });
    // A day later, with a 1-day window: nothing expires within (now, now + 1 d].
    assert.deepStrictEqual(await q.deviceCounts(NOW + DAY, 1), { registered: 3, enrolled: 5, decommissioned: 2, active: 5, expiring: 0, revoked: 2, syncFailed: 3 });
    // At +5 d: C03 has expired (not_after > now fails at equality): dev-3 is no longer active;
    // within (now, now + 30 d] now: dev-5 (C07, C10), other-1 (C08), dev_1 (C09).
    assert.deepStrictEqual(await q.deviceCounts(NOW + 5 * DAY, 30), { registered: 3, enrolled: 5, decommissioned: 2, active: 4, expiring: 3, revoked: 2, syncFailed: 3 });

    // Since -1 d: rows 2..12. issue ok: 4, 8, 11, 12; renew ok: 6; refused: 3, 5, 9 (two of
    // them auth: one group of two); error: 7.
    // enroll-gateway (10), revoke (2) count in none of them.
    assert.deepStrictEqual(await q.auditCounts(NOW - DAY), { issued: 4, renewed: 1, refused: 3, errors: 1 });
    // Since -2 d (inclusive): row 1 (issue ok) too.
    assert.deepStrictEqual(await q.auditCounts(NOW - 2 * DAY), { issued: 5, renewed: 1, refused: 3, errors: 1 });
    assert.deepStrictEqual(await q.auditCounts(NOW + 1), { issued: 0, renewed: 0, refused: 0, errors: 0 });

    // Four hourly buckets ending at now: [-4h,-3h) row 4 onboarded, row 5 refused (row 3 is 1 ms
    // before the first bucket); [-3h,-2h) a renewal and an error only; [-2h,-1h) row 8, row 9
    // refused; [-1h,now) row 11 (row 12 is at now: outside).
    assert.deepStrictEqual(await q.activitySeries(NOW, HOUR, 4), [
      { start: NOW - 4 * HOUR, onboarded: 1, refused: 1 },
      { start: NOW - 3 * HOUR, onboarded: 0, refused: 0 },
      { start: NOW - 2 * HOUR, onboarded: 1, refused: 1 },
      { start: NOW - HOUR, onboarded: 1, refused: 0 },
    ]);
    // Three daily buckets: [-3d,-2d) only a note; [-2d,-1d) row 1; [-1d,now) issues 4 8 11, refusals 3 5 9.
    assert.deepStrictEqual(await q.activitySeries(NOW, DAY, 3), [
      { start: NOW - 3 * DAY, onboarded: 0, refused: 0 },
      { start: NOW - 2 * DAY, onboarded: 1, refused: 0 },
      { start: NOW - DAY, onboarded: 3, refused: 3 },
    ]);

    // Active, unexpired certificates by week from now: C03 (+5 d) week 0; G-B1 (+7 d exactly) week 1,
    // not a device; C07 (+20 d) week 2; C10 (+25 d) week 3; C08 (+30 d), C09 (+30 d + 1 ms) week 4.
    // Not counted: C02 superseded, C06 revoked, C05 and S-A4 expired, the rest past 5 weeks.
    assert.deepStrictEqual(await q.expirySeries(NOW, 5), [
      { start: NOW, devices: 1, others: 0 },
      { start: NOW + 7 * DAY, devices: 0, others: 1 },
      { start: NOW + 14 * DAY, devices: 1, others: 0 },
      { start: NOW + 21 * DAY, devices: 1, others: 0 },
      { start: NOW + 28 * DAY, devices: 2, others: 0 },
    ]);
    assert.deepStrictEqual(await q.expirySeries(NOW, 1), [{ start: NOW, devices: 1, others: 0 }]);

    // Gateways by id; the edge CA is the latest active, unexpired subca (S-A1; S-A3 is revoked,
    // S-A4 expired); last seen is the newest audit row naming the gateway (gw-a: row 12, gw-b: row 10).
    const gw = (id: string, certSerial: string | null, status: string, createdAt: number, updatedAt: number, certNotAfter: number | null, edgeCaNotAfter: number | null, lastSeen: number | null) =>
      ({ id, status, certSerial, certFingerprint: certSerial && `FP:${certSerial}`, createdAt, updatedAt, certNotAfter, edgeCaNotAfter, lastSeen });
    const gateways = [
      gw('gw-a', 'G-A1', 'active', NOW - 30 * DAY, NOW - 30 * DAY, NOW + 300 * DAY, NOW + 200 * DAY, NOW),
      gw('gw-b', 'G-B1', 'disabled', NOW - 30 * DAY, NOW - 2 * DAY, NOW + 7 * DAY, null, NOW - 30 * MIN),
      gw('gw-c', null, 'active', NOW - 20 * DAY, NOW - 20 * DAY, null, null, null),
      gw('gw-d', 'MISSING', 'active', NOW - 10 * DAY, NOW - 10 * DAY, null, null, null),
    ];
    assert.deepStrictEqual(await q.gateways(NOW), gateways);
    assert.deepStrictEqual(await q.gateways(NOW, 2), gateways.slice(0, 2));
    // At +150 d S-A2 has expired but S-A1 not; at +250 d neither.
    assert.equal((await q.gateways(NOW + 150 * DAY))[0].edgeCaNotAfter, NOW + 200 * DAY);
    assert.equal((await q.gateways(NOW + 250 * DAY))[0].edgeCaNotAfter, null);
  });

  test(`[${engine}] dashboard queries over a seeded data set: device, certificate and audit pages`, async (t) => {
    const { store } = await open(t, engine);
    const { seqs } = await seedDashboard(store);
    const q = new DashboardQueries(store.db);
    const base = { limit: 100, now: NOW, expiringDays: 30 };
    const ids = async (f: Partial<Parameters<DashboardQueries['devices']>[0]>) => (await q.devices({ ...base, ...f })).map((d) => d.id);

    // Every column, in id order (bytewise).
    assert.deepStrictEqual(await q.devices(base), expectedDevices(ALL_IDS));

    // The id-prefix search: `_`, `%` and `\` are plain characters in an id.
    assert.deepStrictEqual(await ids({ idPrefix: 'dev-' }), ['dev-1', 'dev-2', 'dev-3', 'dev-4', 'dev-5', 'dev-é']);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev_' }), ['dev_1']);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev%' }), ['dev%x']);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev\\' }), ['dev\\y']);
    assert.deepStrictEqual(await ids({ idPrefix: '_' }), []);
    assert.deepStrictEqual(await ids({ idPrefix: '%' }), []);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev' }), ALL_IDS.filter((id) => id !== 'other-1'));
    assert.deepStrictEqual(await ids({ idPrefix: 'DEV' }), [], 'case-sensitive');
    assert.deepStrictEqual(await ids({ idPrefix: 'other-1' }), ['other-1'], 'the whole id is a prefix of itself');
    assert.deepStrictEqual(await ids({ idPrefix: 'dev-é' }), ['dev-é']);

    // By gateway, by state, and combined.
    assert.deepStrictEqual(await ids({ gatewayId: 'gw-b' }), ['dev-3', 'dev\\y', 'dev_1']);
    assert.deepStrictEqual(await ids({ gatewayId: 'gw-none' }), []);
    const byState: Record<DeviceState, string[]> = {
      registered: ['dev%x', 'dev-1', 'dev-é'],
      enrolled: ['dev-2', 'dev-3', 'dev-5', 'dev_1', 'other-1'],
      disabled: ['dev-4', 'dev\\y'],
      expiring: ['dev-3', 'dev-5', 'other-1'],
      revoked: ['dev-4', 'dev-5'],
    };
    for (const [state, expected] of Object.entries(byState) as Array<[DeviceState, string[]]>) assert.deepStrictEqual(await ids({ state }), expected, state);
    assert.deepStrictEqual(await ids({ state: 'expiring', expiringDays: 10 }), ['dev-3']);
    assert.deepStrictEqual(await ids({ state: 'expiring', expiringDays: 30, now: NOW + 5 * DAY }), ['dev-5', 'dev_1', 'other-1']);
    assert.deepStrictEqual(await ids({ gatewayId: 'gw-a', state: 'enrolled' }), ['dev-2', 'dev-5']);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev-', state: 'expiring' }), ['dev-3', 'dev-5']);
    assert.deepStrictEqual(await ids({ idPrefix: 'dev_', gatewayId: 'gw-b', state: 'enrolled' }), ['dev_1']);
    assert.deepStrictEqual(await q.devices({ ...base, state: 'revoked' }), expectedDevices(['dev-4', 'dev-5']));

    // Keyset pages (after = the last id seen), with and without filters.
    const pages = async (f: Partial<Parameters<DashboardQueries['devices']>[0]>, limit: number) => {
      const out: string[][] = [];
      let after: string | undefined;
      for (;;) {
        assert.ok(out.length <= ALL_IDS.length, 'paging ends');
        const page = await ids({ ...f, limit, ...(after !== undefined ? { after } : {}) });
        if (!page.length) return out;
        out.push(page);
        after = page[page.length - 1];
      }
    };
    assert.deepStrictEqual(await pages({}, 3), [['dev%x', 'dev-1', 'dev-2'], ['dev-3', 'dev-4', 'dev-5'], ['dev-é', 'dev\\y', 'dev_1'], ['other-1']]);
    assert.deepStrictEqual(await pages({ state: 'enrolled' }, 2), [['dev-2', 'dev-3'], ['dev-5', 'dev_1'], ['other-1']]);
    assert.deepStrictEqual(await pages({ idPrefix: 'dev-' }, 4), [['dev-1', 'dev-2', 'dev-3', 'dev-4'], ['dev-5', 'dev-é']]);
    assert.deepStrictEqual(await ids({ after: 'dev-4', idPrefix: 'dev-' }), ['dev-5', 'dev-é']);
    assert.deepStrictEqual(await ids({ after: 'dev.' }), ['dev\\y', 'dev_1', 'other-1'], 'after need not be an existing id (\'.\' 0x2e sorts after \'dev-é\')');

    // Certificates, newest first, every column; pages of every size join up to the whole list.
    assert.deepStrictEqual(await q.certificates({ limit: 100 }), CERTS_NEWEST_FIRST.map(expectedCert));
    for (const limit of [1, 2, 3, 4, 5]) {
      const seen: string[] = [];
      let before: { createdAt: number; serial: string } | undefined;
      for (;;) {
        assert.ok(seen.length <= CERTS.length, `pages of ${limit} end: ${seen.join(' ')}`);
        const page = await q.certificates({ limit, ...(before ? { before } : {}) });
        if (!page.length) break;
        assert.ok(page.length <= limit);
        seen.push(...page.map((c) => c.serial));
        const last = page[page.length - 1];
        before = { createdAt: last.createdAt, serial: last.serial };
      }
      assert.deepStrictEqual(seen, CERTS_NEWEST_FIRST, `pages of ${limit}`);
    }
    // A page boundary inside a tie on created_at (C09 | C08, both at -5 d).
    assert.deepStrictEqual((await q.certificates({ limit: 2, before: { createdAt: NOW - 5 * DAY, serial: 'C09' } })).map((c) => c.serial), ['C08', 'C07']);
    const serials = async (f: Parameters<DashboardQueries['certificates']>[0]) => (await q.certificates(f)).map((c) => c.serial);
    assert.deepStrictEqual(await serials({ subjectId: 'dev-5', limit: 100 }), ['C10', 'C07', 'C06', 'C05']);
    assert.deepStrictEqual(await serials({ status: 'revoked', limit: 100 }), ['C06', 'C04', 'C11', 'S-A3']);
    assert.deepStrictEqual(await serials({ kind: 'subca', limit: 100 }), ['S-A3', 'S-A2', 'S-A1', 'S-A4']);
    assert.deepStrictEqual(await serials({ kind: 'device', status: 'active', limit: 3 }), ['C10', 'C09', 'C08']);
    assert.deepStrictEqual(await serials({ kind: 'device', status: 'active', limit: 3, before: { createdAt: NOW - 5 * DAY, serial: 'C08' } }), ['C07', 'C05', 'C03']);
    assert.deepStrictEqual(await serials({ kind: 'device', status: 'active', limit: 3, before: { createdAt: NOW - 9 * DAY, serial: 'C03' } }), ['C01']);

    // One certificate, every column (revocation fields, the registry's error, the issuer).
    assert.deepStrictEqual(await q.certificate('C04'), expectedCert('C04'));
    assert.deepStrictEqual(await q.certificate('C01'), { ...expectedCert('C01'), hubError: 'boom' });
    assert.deepStrictEqual(await q.certificate('S-A1'), expectedCert('S-A1'));
    assert.equal(await q.certificate('NOPE'), null);

    // The audit log, newest first, every column; seqs are numbers on both engines.
    const row = (i: number) => {
      const e = AUDIT[i];
      return {
        seq: seqs[i], at: e.at, action: e.action, outcome: e.outcome, code: e.code ?? null, deviceId: e.deviceId ?? null, gatewayId: e.gatewayId ?? null,
        requestId: e.requestId ?? null, serial: e.serial ?? null, detail: i === 0 ? { unparsable: 'not json {' } : e.detail ?? null,
      };
    };
    const rows = (...idx: number[]) => idx.map(row);
    assert.deepStrictEqual(await q.audit({ limit: 100 }), rows(12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const auditIdx = async (f: Parameters<DashboardQueries['audit']>[0]) => (await q.audit(f)).map((r) => seqs.indexOf(r.seq));
    assert.deepStrictEqual(await auditIdx({ action: 'issue', limit: 100 }), [12, 11, 8, 7, 5, 4, 1]);
    assert.deepStrictEqual(await auditIdx({ outcome: 'refused', limit: 100 }), [9, 5, 3]);
    assert.deepStrictEqual(await auditIdx({ action: 'issue', outcome: 'ok', limit: 100 }), [12, 11, 8, 4, 1]);
    assert.deepStrictEqual(await auditIdx({ deviceId: 'dev-1', limit: 100 }), [5, 3]);
    assert.deepStrictEqual(await auditIdx({ deviceId: 'dev_1', limit: 100 }), [8], 'an exact match, not LIKE');
    assert.deepStrictEqual(await auditIdx({ gatewayId: 'gw-b', limit: 100 }), [10, 8, 4]);
    assert.deepStrictEqual(await auditIdx({ gatewayId: 'gw-a', outcome: 'refused', limit: 100 }), [5, 3]);
    assert.deepStrictEqual(await auditIdx({ serial: 'C04', limit: 100 }), [2]);
    assert.deepStrictEqual(await auditIdx({ action: 'nothing', limit: 100 }), []);
    // Keyset pages on seq.
    assert.deepStrictEqual(await q.audit({ limit: 5 }), rows(12, 11, 10, 9, 8));
    assert.deepStrictEqual(await q.audit({ limit: 5, before: seqs[8] }), rows(7, 6, 5, 4, 3));
    assert.deepStrictEqual(await q.audit({ limit: 5, before: seqs[3] }), rows(2, 1, 0));
    assert.deepStrictEqual(await q.audit({ limit: 5, before: seqs[0] }), []);
    assert.deepStrictEqual(await auditIdx({ action: 'issue', limit: 3 }), [12, 11, 8]);
    assert.deepStrictEqual(await auditIdx({ action: 'issue', limit: 3, before: seqs[8] }), [7, 5, 4]);
    assert.deepStrictEqual(await auditIdx({ action: 'issue', limit: 3, before: seqs[4] }), [1]);

    // The distinct actions, sorted.
    assert.deepStrictEqual(await q.auditActions(), ['auth', 'enroll-gateway', 'issue', 'note', 'renew', 'revoke']);
  });
}

for (const engine of ENGINES) {
  test(`[${engine}] dashboard sessions: shared by every store on the database, expiring by age and idleness, bounded, destroyed once`, async (t) => {
    const { store, reopen } = await open(t, engine);
    const other = await reopen(); // another authority node on the same database
    const clock = { now: NOW };
    const opts = { sessionMs: 8 * 3600_000, idleMs: 1800_000, now: () => clock.now, max: 3 };
    const a = new SessionStore(store, opts);
    const b = new SessionStore(other, opts);
    const s = await a.create('dashboard:admin', 'token');
    const seen = await b.get(s.id);
    assert.deepEqual(seen && { operator: seen.operator, via: seen.via, csrf: seen.csrf }, { operator: 'dashboard:admin', via: 'token', csrf: s.csrf }, 'known on the other node');
    assert.equal(await b.get(s.id.slice(0, -1) + (s.id.endsWith('A') ? 'B' : 'A')), null, 'another id is nothing');
    const row = await store.getDashboardSession(createHash('sha256').update(s.id).digest('base64url'));
    assert.ok(row && !JSON.stringify(row).includes(s.id), 'the id itself is never stored');

    // Idle: each use restarts the clock (written at most every 30 s), silence past idleMs ends it.
    clock.now += 1700_000;
    assert.ok(await a.get(s.id), 'used before the idle limit');
    clock.now += 1700_000;
    assert.ok(await b.get(s.id), 'the use on node A counted on node B');
    clock.now += 1800_001;
    assert.equal(await b.get(s.id), null, 'idle too long');
    assert.equal(await a.get(s.id), null, 'and gone for both');

    // Age: past sessionMs it ends however busy.
    const busy = await a.create('dashboard:admin', 'token');
    for (let i = 0; i < 17; i++) {
      clock.now += 1700_000;
      if (i < 16) assert.ok(await b.get(busy.id), `in use, ${i}`);
    }
    assert.equal(await a.get(busy.id), null, 'older than sessionMs');

    // Destroyed on one node (logout): refused on the other.
    const out = await a.create('dashboard:alice', 'header');
    await b.destroy(out.id);
    assert.equal(await a.get(out.id), null);

    // Bounded: past `max`, the oldest go first.
    const made: string[] = [];
    for (let i = 0; i < 5; i++) {
      clock.now += 1000;
      made.push((await a.create(`dashboard:u${i}`, 'header')).id);
    }
    const alive = await Promise.all(made.map(async (id) => (await b.get(id)) !== null));
    assert.deepEqual(alive, [false, false, true, true, true]);
  });
}
