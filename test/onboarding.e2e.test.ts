import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { test } from 'node:test';
import { pkix, upTopic } from '../protocol/index.ts';
import { startStack } from './support/stack.ts';

for (const flow of ['compact', 'classic'] as const) for (const method of ['pki-signature', 'ddkg'] as const) {
  for (const key of [{ keyType: 'ec', keySize: 256 }, { keyType: 'rsa', keySize: 2048 }] as const) {
    test(`onboards a ${method} device with ${pkix.keySpecLabel(key)} (${flow} flow) and reconnects with mTLS`, async (t) => {
      const stack = await startStack(t);
      const id = method === 'ddkg' ? `ddkg-${key.keyType}` : `pki-${key.keyType}`;
      // The compact flow is the SDK's default: no option.
      const device = stack.device(id, method, { keyPreference: [key], ...(flow === 'classic' ? { flow } : {}) });
      const result = await device.onboard();

      const cert = new X509Certificate(result.certificate);
      assert.match(cert.subject, new RegExp(`^CN=${id}$`));
      assert.equal(cert.serialNumber.toUpperCase(), result.serial);
      assert.deepEqual(result.key, key);
      const desc = pkix.keyDescription(cert.publicKey);
      assert.equal(desc.keyType, key.keyType);
      assert.equal(desc.keySize, key.keySize);
      const chain = pkix.verifyChain(cert, pkix.parseCertificates(result.chain.join('')), pkix.parseCertificates(stack.rootPem));
      assert.equal(chain.ok, true, chain.reason);

      const rows = await stack.authority.store.listCertificates({ subjectId: id });
      assert.equal(rows.length, 1);
      assert.equal(rows[0].serial, result.serial);
      const audit = await stack.authority.store.listAudit({ deviceId: id });
      // Compact: two exchanges (the auth is inside the issuance); classic: three.
      assert.deepEqual(audit.map((a) => `${a.action}:${a.outcome}`).reverse(), flow === 'compact' ? ['register:ok', 'issue:ok'] : ['register:ok', 'auth:ok', 'issue:ok']);
      if (flow === 'compact') assert.equal(audit[0].detail?.flow, 'compact');

      const client = await device.connectOperational(result);
      assert.equal(stack.gateway.sessions.holder(id)?.session.kind, 'operational');
      await device.publishTelemetry(client, { temperature: 21.5 });
      // operational sessions cannot use bootstrap topics
      await client.publishAsync(upTopic(id, 'register'), '{}', { qos: 1 });
      await client.endAsync();
    });
  }
}
