/**
 * Listens to the authority's server-sent events (GET /v1/events over mTLS) and reconnects
 * with capped exponential backoff and jitter when the link drops. The link state feeds
 * readiness: `connected` means the authority was reachable a moment ago.
 */
import { EventEmitter } from 'node:events';
import type { ClientRequest } from 'node:http';
import type { Logger } from 'pino';
import type { AuthorityClient } from './authority-client.ts';

export class AuthorityEventStream extends EventEmitter<{ event: [string, unknown]; link: [boolean] }> {
  private req: ClientRequest | null = null;
  private retryTimer: NodeJS.Timeout | undefined;
  private attempt = 0;
  private stopped = false;
  connected = false;

  constructor(private readonly opts: { authority: AuthorityClient; logger: Logger; maxBackoffMs?: number }) {
    super();
  }

  start(): void {
    this.stopped = false;
    this.open();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.req?.destroy();
    this.setLink(false);
  }

  private setLink(up: boolean): void {
    if (this.connected === up) return;
    this.connected = up;
    this.emit('link', up);
  }

  private open(): void {
    this.req = this.opts.authority.stream('/v1/events', {
      onOpen: () => {
        this.attempt = 0;
        this.setLink(true);
      },
      onEvent: (event, data) => this.emit('event', event, data),
      onClose: (err) => {
        this.req = null;
        this.setLink(false);
        if (this.stopped) return;
        const base = Math.min(this.opts.maxBackoffMs ?? 30_000, 500 * 2 ** this.attempt++);
        const delay = base / 2 + Math.random() * (base / 2);
        this.opts.logger.warn({ err: err?.message, retryInMs: Math.round(delay) }, 'authority event stream closed');
        this.retryTimer = setTimeout(() => this.open(), delay);
        this.retryTimer.unref();
      },
    });
  }
}
