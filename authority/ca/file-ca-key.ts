/**
 * A CA key held in this process: the KeyObject decrypted from an encrypted PKCS#8 file (or a
 * ca_material row). LocalCa hands `keyObject` to its certificate templates directly -- the
 * issuance fast path (signatures batched on the worker pool, or the libuv threadpool) -- and
 * signs CRLs through `sign`, as it does with every other CaKey.
 */
import { createPublicKey, sign, type KeyObject } from 'node:crypto';
import { pkix } from '../../protocol/index.ts';
import type { CaKey } from './ca-key.ts';

export class FileCaKey implements CaKey {
  readonly description: string;
  readonly publicKey: KeyObject;
  readonly keyType: 'ec' | 'rsa';

  constructor(readonly keyObject: KeyObject, where = 'file') {
    if (keyObject.type !== 'private') throw new Error('a CA key must be a private key');
    this.publicKey = createPublicKey(keyObject);
    this.keyType = pkix.keyDescription(keyObject).keyType;
    this.description = where;
  }

  /** crypto.sign off the event loop: on the worker pool when there is one, else the threadpool. */
  sign(hash: string, data: Buffer): Promise<Buffer> {
    const pool = pkix.ecVerifyPool();
    if (pool) return pool.sign(hash, data, this.keyObject);
    return new Promise((resolve, reject) => sign(hash, data, this.keyObject, (err, signature) => (err ? reject(err) : resolve(signature))));
  }
}
