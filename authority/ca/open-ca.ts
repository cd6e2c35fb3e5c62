/**
 * Opens the authority's CA with its keys where configuration says they are (`caKeys.store`):
 * file keys (encrypted PKCS#8 in the data directory, or ca_material rows with PostgreSQL),
 * a PKCS#11 token, or Azure Key Vault for the device CA's key (the root, the infrastructure
 * CA and the edge issuer keep encrypted file keys; the root may be offline). The one place
 * that picks a key store, for `authority start` and the CLI's offline commands alike.
 */
import { join } from 'node:path';
import { LeafgateError } from '../../protocol/index.ts';
import { LocalCa, openFileCaKey, type CaMaterialStore, type CaName } from './local-ca.ts';
import { openPkcs11CaKeys, type Pkcs11KeysConfig } from './pkcs11-ca-key.ts';
import { openKeyVaultCaKey, type KeyVaultCaKeyOptions, type KeyVaultStoreConfig } from './keyvault-key.ts';

export interface CaOpenConfig {
  dataDir: string;
  caPassphrase: string;
  organization: string;
  crlBaseUrl?: string;
  caKeys: { store: 'file' } | Pkcs11KeysConfig | { store: 'keyvault'; keyvault: KeyVaultStoreConfig };
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
 * `shared`: the cluster's store when several nodes share PostgreSQL (file keys, or file keys
 * and the device CA's key in Key Vault).
 * `create`: `authority init` -- a missing PKCS#11 or Key Vault key (and a missing file key
 * beside a Key Vault one) is generated and the missing certificates are signed through the
 * keys; at start they must exist.
 */
export async function openCa(
  config: CaOpenConfig,
  opts: { shared?: CaMaterialStore; create?: boolean; adoptDir?: boolean; env?: NodeJS.ProcessEnv; logger?: KeyVaultCaKeyOptions['logger'] } = {},
): Promise<OpenedCa> {
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
    case 'keyvault': {
      const deviceKey = await openKeyVaultCaKey(config.caKeys.keyvault, { create: opts.create, env: opts.env, logger: opts.logger });
      try {
        if (opts.shared) {
          // A cluster: the certificates and the other (encrypted) keys in ca_material, the device CA's row with an empty key.
          const r = await LocalCa.openShared(opts.shared, config.caPassphrase, { ...common, adoptDir: opts.adoptDir ? dir : undefined, deviceKey });
          return { ca: r.ca, created: r.created, adopted: r.adopted };
        }
        const file = (name: CaName) => openFileCaKey(dir, name, config.caPassphrase, { create: opts.create });
        const root = file('root');
        const ca = await LocalCa.openWithKeys(dir, { root, 'device-ca': deviceKey, 'infra-ca': file('infra-ca')!, 'edge-issuer': file('edge-issuer')! }, { ...common, create: opts.create });
        return { ca };
      } catch (err) {
        await deviceKey.close();
        throw err;
      }
    }
    default:
      throw new LeafgateError('internal', `caKeys.store "${(config.caKeys as { store: string }).store}" has no connector in this build`);
  }
}
