/** The Extensions SEQUENCE of a CSR's extensionRequest, a certificate or a CRL, read strictly. */
import * as der from './der.ts';

export interface ExtensionNode {
  oid: string;
  critical: boolean;
  /** The extnValue OCTET STRING (its content is the DER of the extension's value). */
  value: der.DerNode;
}

/**
 * Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }:
 * each extension at most once (RFC 5280 4.2), critical FALSE never encoded (X.690 11.5: a
 * DEFAULT value is omitted in DER), nothing after extnValue. `twice` words the duplicate
 * refusal for the caller ("is requested twice" in a CSR).
 */
export function readExtensions(node: der.DerNode | undefined, twice = 'appears twice'): ExtensionNode[] {
  const out: ExtensionNode[] = [];
  const seen = new Set<string>();
  for (const e of der.children(der.expectTag(node, der.TAG.SEQUENCE, 'Extensions'))) {
    const parts = der.children(der.expectTag(e, der.TAG.SEQUENCE, 'Extension'));
    const oid = der.decodeOid(der.expectTag(parts[0], der.TAG.OID, 'extnID'));
    if (seen.has(oid)) throw new der.DerError(`extension ${oid} ${twice}`);
    seen.add(oid);
    let critical = false;
    let next = 1;
    if (parts[1]?.tag === der.TAG.BOOLEAN) {
      critical = der.decodeBoolean(parts[1]);
      if (!critical) throw new der.DerError('critical FALSE is the DEFAULT and must be omitted in DER');
      next = 2;
    }
    const value = der.expectTag(parts[next], der.TAG.OCTET_STRING, 'extnValue');
    if (parts.length > next + 1) throw new der.DerError('unexpected fields in Extension');
    out.push({ oid, critical, value });
  }
  return out;
}
