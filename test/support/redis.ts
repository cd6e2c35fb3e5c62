/** The real Redis the cluster tests share, and the clean-up that keeps it from filling up. */
import { Redis } from 'ioredis';
import { within } from './wait.ts';

export const TEST_REDIS_URL = process.env.LEAFGATE_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

/** Deletes every key under `keyPrefix`; bounded, and quiet when Redis is gone (a test killed it, or failed already). */
export async function deleteRedisKeys(keyPrefix: string, url = TEST_REDIS_URL): Promise<void> {
  const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 2000, retryStrategy: () => null });
  r.on('error', () => undefined);
  const work = (async () => {
    await r.connect();
    let cursor = '0';
    do {
      const [next, keys] = await r.scan(cursor, 'MATCH', `${keyPrefix}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length) await r.del(...keys);
    } while (cursor !== '0');
  })();
  await within(work, 10_000, `deleting the Redis keys ${keyPrefix}*`).catch(() => undefined).finally(() => r.disconnect());
}
