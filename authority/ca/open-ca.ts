/**
 * Opens the authority's CA with its keys where configuration says they are (`caKeys.store`):
 * file keys (encrypted PKCS#8 in the data directory, or ca_material rows with PostgreSQL),
 * or a PKCS#11 token. The one place that picks a key store, for `authority start` and the
 * CLI's offline commands alike.
 */
import { join } from 'node:path';
import { LeafgateError } from '../../protocol/index.ts';
import { LocalCa, type CaMaterialStore, type CaName } from './local-ca.ts';
import { openPkcs11CaKeys, type Pkcs11KeysConfig } from './pkcs11-ca-key.ts';

export interface CaOpenConfig {
  dataDir: string;
  caPassphrase: string;
  organization: string;
  crlBaseUrl?: string;
  caKeys: { store: 'file' } | Pkcs11KeysConfig | ({ store: 'keyvault' } & Record<string, unknown>);
}

export interface OpenedCa {
  ca: LocalCa;
  /** A file CA made in the database on this start (cluster). */
  created?: boolean;
  adopted?: boolean;
  /** Keys generated in the token on this call (init). */
  generated?: CaName[];
}

/**
 * `shared`: the cluster's store when several nodes share PostgreSQL (file keys only).
 * `create`: `authority init` -- a missing PKCS#11 key is generated in the token and the
 * missing certificates are signed through the token; at start they must exist.
 */
export async function openCa(config: CaOpenConfig, opts: { shared?: CaMaterialStore; create?: boolean; adoptDir?: boolean; env?: NodeJS.ProcessEnv } = {}): Promise<OpenedCa> {
  const dir = join(config.dataDir, 'ca');
  const common = { organization: config.organization, crlBaseUrl: config.crlBaseUrl };
  switch (config.caKeys.store) {
    case 'file': {
      if (!opts.shared) return { ca: LocalCa.open(dir, config.caPassphrase, common) };
      const r = await LocalCa.openShared(opts.shared, config.caPassphrase, { ...common, adoptDir: opts.adoptDir ? dir : undefined });
      return { ca: r.ca, created: r.created, adopted: r.adopted };
    }
    case 'pkcs11': {
      if (opts.shared) throw new LeafgateError('internal', 'caKeys.store "pkcs11" keeps the CA certificates in the data directory: it is not available with a shared PostgreSQL database yet');
      const { keys, created } = await openPkcs11CaKeys(config.caKeys as Pkcs11KeysConfig, { create: opts.create, env: opts.env });
      try {
        const ca = await LocalCa.openWithKeys(dir, { root: keys.root, 'device-ca': keys['device-ca'], 'infra-ca': keys['infra-ca'], 'edge-issuer': keys['edge-issuer'] }, { ...common, create: opts.create });
        return { ca, generated: created };
      } catch (err) {
        await keys.root.close();
        throw err;
      }
    }
    default:
      throw new LeafgateError('internal', `caKeys.store "${config.caKeys.store}" has no connector in this build`);
  }
}
