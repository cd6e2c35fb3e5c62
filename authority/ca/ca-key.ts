/**
 * A CA's private key wherever it lives: a file (encrypted PKCS#8, loaded into a KeyObject),
 * a PKCS#11 token (an HSM, SoftHSM in tests) or an Azure Key Vault key. The certificate and
 * CRL encoders stay ours in every case; only the signature of the TBS bytes is delegated, so
 * policy, audit, revocation and the store are the same whatever holds the key.
 */
import type { KeyObject } from 'node:crypto';

export interface CaKey {
  /** Where the key lives, for logs and `authority --help`: `file`, `pkcs11:<token>/<label>`, `keyvault:<key id>`. */
  readonly description: string;
  /** The public half (the CA certificate's subject key). */
  readonly publicKey: KeyObject;
  /** EC or RSA, as the signature algorithm identifier needs it. */
  readonly keyType: 'ec' | 'rsa';
  /**
   * Signs `data` (the DER of a TBSCertificate or TBSCertList) with `hash` (sha256, sha384,
   * sha512) and answers the signature as X.509 carries it: a DER ECDSA-Sig-Value for EC,
   * PKCS#1 v1.5 for RSA. Asynchronous because an HSM or a remote service answers later;
   * implementations batch or pace as their backend needs.
   */
  sign(hash: string, data: Buffer): Promise<Buffer>;
  /** Releases sessions or connections; the authority calls it once at close. */
  close?(): Promise<void>;
}

/** The kind of key store a CA uses, from configuration (`caKeys`). */
export type CaKeyStoreKind = 'file' | 'pkcs11' | 'keyvault';
