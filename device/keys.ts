import { generateKeyPair, type KeyObject } from 'node:crypto';
import { promisify } from 'node:util';
import type { KeySpec } from '../protocol/index.ts';

const generate = promisify(generateKeyPair);
const CURVES: Record<number, string> = { 256: 'P-256', 384: 'P-384' };

/** A fresh key pair as the instruction asks; generated on the device, never sent anywhere. */
export async function generateKeyForInstruction(spec: KeySpec): Promise<{ privateKey: KeyObject; publicKey: KeyObject }> {
  if (spec.keyType === 'ec') {
    const namedCurve = CURVES[spec.keySize];
    if (!namedCurve) throw new Error(`unsupported EC size ${spec.keySize}`);
    return generate('ec', { namedCurve });
  }
  if (spec.keyType === 'rsa' && [2048, 3072, 4096].includes(spec.keySize)) return generate('rsa', { modulusLength: spec.keySize });
  throw new Error(`unsupported key ${spec.keyType}-${spec.keySize}`);
}
