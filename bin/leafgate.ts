#!/usr/bin/env -S npx tsx
/** The one CLI: `leafgate authority | gateway | device | demo`. */
import { ConfigError } from '../config-schema/index.ts';
import { LeafgateError } from '../protocol/index.ts';
import { authorityCommand } from './authority.ts';
import { UsageError } from './cli.ts';
import { demoCommand } from './demo.ts';
import { deviceCommand } from './device.ts';
import { gatewayCommand } from './gateway.ts';

const USAGE = `leafgate — X.509 certificate life cycle for an IoT edge gateway and its leaf devices

Usage: leafgate <command> [options]   (each command and subcommand has --help)

Commands:
  demo        authority + gateway + simulated devices onboarding end to end
  authority   run the trust authority; create gateway tokens and ddkg codes
  gateway     enroll a gateway and run its MQTT broker
  device      onboard a leaf device (reference client)

Options:
  --debug     print the stack trace of an error (else one line)

Example:
  leafgate gateway start --config /etc/leafgate/gateway.json

Environment:
  LEAFGATE_LOG_LEVEL          log level: fatal, error, warn, info (default), debug, silent
  LEAFGATE_DRAIN_TIMEOUT_MS   bound on the drain after SIGTERM/SIGINT (default 20000)
  authority: LEAFGATE_CA_PASSPHRASE, LEAFGATE_ADMIN_TOKEN, LEAFGATE_AUTHORITY_DATA,
    LEAFGATE_AUTHORITY_HOST, LEAFGATE_AUTHORITY_PORT, LEAFGATE_DATABASE_URL,
    LEAFGATE_CRL_BASE_URL, LEAFGATE_IOTHUB_CONNECTION_STRING, LEAFGATE_DPS_CONNECTION_STRING,
    LEAFGATE_VERIFY_WORKERS
  gateway: LEAFGATE_GATEWAY_DATA, LEAFGATE_GATEWAY_HOST, LEAFGATE_GATEWAY_PORT,
    LEAFGATE_GATEWAY_HTTP_HOST, LEAFGATE_GATEWAY_HTTP_PORT, LEAFGATE_GATEWAY_EDGE_CA,
    LEAFGATE_REDIS_URL, LEAFGATE_REDIS_PREFIX, LEAFGATE_MODULE_CONNECTION_STRING
  (README, Configuration: every key of the config files and its variable)

Exit codes: 0 done, 1 failed (one line says why), 2 bad usage or configuration.
`;

const COMMANDS: Record<string, (argv: string[]) => Promise<number>> = {
  demo: demoCommand,
  authority: authorityCommand,
  gateway: gatewayCommand,
  device: deviceCommand,
};

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(USAGE);
    return command ? 0 : 2;
  }
  const run = COMMANDS[command];
  if (!run) {
    process.stderr.write(`unknown command ${command}\n\n${USAGE}`);
    return 2;
  }
  return run(rest);
}

const args = process.argv.slice(2);
const debug = args.includes('--debug');

/** One line per failure (the whole stack with --debug); 2 for usage and configuration. */
function report(err: unknown): number {
  const detail = debug && err instanceof Error && err.stack ? `\n${err.stack}` : '';
  if (err instanceof UsageError) {
    process.stderr.write(`${err.message}\n${detail && detail + '\n'}`);
    return 2;
  }
  if (err instanceof ConfigError) {
    process.stderr.write(`error: ${err.message}${detail}\n`);
    return 2;
  }
  const message = err instanceof LeafgateError ? `error [${err.code}]: ${err.message}` : `error: ${err instanceof Error ? err.message : String(err)}`;
  process.stderr.write(`${message.split('\n')[0]}${detail}\n`);
  return 1;
}

/**
 * Once main settles the process should end by itself. If something still holds the event
 * loop (a leak), say so and exit anyway: a failed start never hangs.
 */
function exitSoon(code: number): void {
  process.exitCode = code;
  setTimeout(() => {
    process.stderr.write('warning: the process did not end by itself after the command finished (open handles); exiting\n');
    process.exit(code);
  }, 10_000).unref();
}

main(args.filter((a) => a !== '--debug')).then(exitSoon, (err) => exitSoon(report(err)));
