import type { AuthMethod } from '../../protocol/index.ts';
import { ddkg } from './ddkg.ts';
import { pkiSignature } from './pki-signature.ts';
import type { AuthMethodHandler } from './types.ts';

export const AUTH_METHOD_HANDLERS: Record<AuthMethod, AuthMethodHandler> = { 'pki-signature': pkiSignature, ddkg };
export { hashEnrollmentCode, DDKG_SALT_BYTES } from './ddkg.ts';
export type { AuthMethodHandler, MethodContext } from './types.ts';
