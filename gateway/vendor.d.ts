// aedes-persistence-redis ships no types; only the factory the cluster link calls is declared.
declare module 'aedes-persistence-redis' {
  import type { Redis } from 'ioredis';
  export default function createPersistence(opts: { conn?: Redis; maxSessionDelivery?: number; packetTTL?: (packet: unknown) => number }): unknown;
}

// msgpack-lite (the encoding mqemitter-redis uses on the wire) ships no types.
declare module 'msgpack-lite' {
  const msgpack: { encode(value: unknown): Buffer; decode(buf: Buffer): unknown };
  export default msgpack;
}
