/**
 * Composes plugins into aedes hooks. The order of the list is the order of the checks,
 * first refusal wins. Hooks that return plain values run synchronously (the publish hot
 * path stays free of promise hops); a hook that returns a promise is awaited, and after
 * every await the client is re-checked, since it may have gone (aedes #928, #979).
 *
 * authorizePublish runs for every message, so its synchronous path allocates nothing: a
 * plain loop over the hooks, no closure, no promise. Only when a hook answers with a
 * promise (e.g. an onboarding limit in a shared store) does the rest of the chain continue
 * in an async function, from the hook after it.
 */
import type { AedesOptions, AuthenticateError, Client, PublishPacket } from 'aedes';
import type { Logger } from 'pino';
import { ConnectRefusal, PublishRefusal, type BrokerPlugin, type ConnectInfo } from './types.ts';

/** Refused publishes are re-addressed here: acknowledged, matched by no subscription, dropped. */
export const DROPPED_TOPIC = '$leafgate/dropped';

export interface ComposeOptions {
  logger: Logger;
  /** Tells the device why its publish was dropped (down/error). */
  onPublishRefused(client: Client, packet: PublishPacket, refusal: PublishRefusal): void;
  /** Every accepted publish of a connected device (the onboarding relay, metrics). */
  onPublished(client: Client, packet: PublishPacket): void;
  /** Counters for refusals (metrics). */
  observer?: { connectRefused(returnCode: number): void; subscribeRefused(): void };
}

type Hooks = Required<Pick<AedesOptions, 'preConnect' | 'authenticate' | 'authorizePublish' | 'authorizeSubscribe' | 'authorizeForward' | 'published'>>;

function isPromise<T>(v: unknown): v is Promise<T> {
  return typeof (v as Promise<T> | undefined)?.then === 'function';
}

/** Runs `step` over items in order; synchronous as long as every step is. */
function runAll<T>(items: T[], step: (item: T) => unknown, done: (err: unknown) => void, stillValid: () => boolean): void {
  let i = 0;
  const next = (): void => {
    while (i < items.length) {
      let r: unknown;
      try {
        r = step(items[i++]);
      } catch (err) {
        return done(err);
      }
      if (isPromise(r)) {
        r.then(
          () => (stillValid() ? next() : done(new Error('client closed during check'))),
          (err) => done(err),
        );
        return;
      }
    }
    done(null);
  };
  next();
}

/**
 * The close listener is made here, not inside a hook: a closure created in a hook keeps the
 * hook's whole scope alive -- its callback, and through it aedes' CONNECT state and packet
 * -- for as long as the connection lives (~1 kB per idle connection).
 */
function releaseOnClose(client: Client, disconnect: (client: Client) => void): void {
  client.conn.on('close', () => disconnect(client));
}

export function composePlugins(plugins: BrokerPlugin[], opts: ComposeOptions): Hooks & { disconnect(client: Client): void } {
  const connectInfo = new WeakMap<Client, ConnectInfo>();
  const withHook = <K extends keyof BrokerPlugin>(k: K) => plugins.filter((p) => typeof p[k] === 'function');
  const authn = withHook('authenticate');
  const pub = withHook('authorizePublish');
  // The hook functions in their own array: the loop loads them from one array of functions
  // instead of a property from plugin objects of as many shapes (a megamorphic load each).
  const pubHooks = pub.map((p) => p.authorizePublish!);
  const sub = withHook('authorizeSubscribe');
  const fwd = withHook('authorizeForward');
  const disc = withHook('onDisconnect');

  const disconnect = (client: Client) => {
    for (const p of disc) {
      try {
        p.onDisconnect!(client);
      } catch (err) {
        opts.logger.error({ err, plugin: p.name }, 'onDisconnect failed');
      }
    }
  };

  /** The chain's answer to aedes: a PublishRefusal drops the message and tells the device. */
  const publishVerdict = (client: Client, packet: PublishPacket, err: unknown, cb: (err: Error | null) => void): void => {
    if (err instanceof PublishRefusal) {
      opts.onPublishRefused(client, packet, err);
      packet.topic = DROPPED_TOPIC;
      packet.retain = false;
      return cb(null);
    }
    cb(err as Error);
  };

  /** The slow path: awaits `pending` (hook `from - 1`), then runs the hooks from `from` on. */
  const publishRest = async (client: Client, packet: PublishPacket, pending: Promise<unknown>, from: number, closing: boolean): Promise<void> => {
    await pending;
    if (!closing && client.closed) throw new Error('client closed during check');
    for (let i = from; i < pubHooks.length; i++) {
      const r = pubHooks[i].call(pub[i], client, packet);
      if (r !== undefined && isPromise(r)) {
        await r;
        if (!closing && client.closed) throw new Error('client closed during check');
      }
    }
  };

  return {
    disconnect,

    preConnect(client, packet, cb) {
      connectInfo.set(client, { clientId: packet.clientId ?? '', username: packet.username, password: packet.password, will: packet.will, keepalive: packet.keepalive ?? 0 });
      cb(null, true);
    },

    authenticate(client, _username, _password, cb) {
      const info = connectInfo.get(client);
      if (!info) return cb(Object.assign(new Error('no CONNECT seen'), { returnCode: 5 }) as AuthenticateError, false);
      // Needed only during the checks below (they hold it): not for the life of the connection.
      connectInfo.delete(client);
      // Sessions are released however the socket ends, also if a later check refuses it.
      releaseOnClose(client, disconnect);
      runAll(
        authn,
        (p) => p.authenticate!(client, info),
        (err) => {
          if (!err) {
            for (const p of plugins) p.onConnected?.(client);
            return cb(null, true);
          }
          const refusal = err instanceof ConnectRefusal ? err : new ConnectRefusal(3, 'server unavailable');
          if (!(err instanceof ConnectRefusal)) opts.logger.error({ err, clientId: info.clientId.slice(0, 128) }, 'authentication hook failed');
          else opts.logger.info({ clientId: info.clientId.slice(0, 128), returnCode: refusal.returnCode, reason: refusal.message }, 'connect refused');
          opts.observer?.connectRefused(refusal.returnCode);
          disconnect(client);
          cb(Object.assign(new Error(refusal.message), { returnCode: refusal.returnCode }) as AuthenticateError, false);
        },
        () => !client.closed,
      );
    },

    authorizePublish(client, packet, cb) {
      // client is null only for a will published after its client is gone; wills were
      // checked at CONNECT time by the authorization plugin.
      if (!client) return cb(null);
      // aedes authorizes a will from client.close(): the client is already closed then.
      const closing = client.closed;
      for (let i = 0; i < pubHooks.length; i++) {
        let r: unknown;
        try {
          r = pubHooks[i].call(pub[i], client, packet);
        } catch (err) {
          return publishVerdict(client, packet, err, cb);
        }
        if (r !== undefined && isPromise(r)) {
          publishRest(client, packet, r, i + 1, closing).then(
            () => cb(null),
            (err: unknown) => publishVerdict(client, packet, err, cb),
          );
          return;
        }
      }
      cb(null);
    },

    authorizeSubscribe(client, subscription, cb) {
      let allowed = true;
      runAll(
        sub,
        (p) => {
          const r = p.authorizeSubscribe!(client, subscription);
          if (isPromise<boolean>(r)) return r.then((ok) => void (allowed &&= ok));
          allowed &&= r;
          return undefined;
        },
        (err) => {
          if (err) opts.logger.error({ err }, 'subscribe check failed');
          if (err || !allowed) opts.observer?.subscribeRefused();
          // null answers SUBACK 0x80 for this filter and keeps the connection.
          cb(null, !err && allowed ? subscription : null);
        },
        () => !client.closed,
      );
    },

    authorizeForward(client, packet) {
      for (const p of fwd) if (!p.authorizeForward!(client, packet)) return null;
      return packet;
    },

    published(packet, client, cb) {
      if (client && packet.topic !== DROPPED_TOPIC) {
        try {
          opts.onPublished(client, packet);
        } catch (err) {
          opts.logger.error({ err }, 'published handler failed');
        }
      }
      cb(null);
    },
  };
}
