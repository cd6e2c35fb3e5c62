#!/usr/bin/env -S npx tsx
/** The one CLI: `leafgate authority | gateway | device | demo`. */
import { LeafgateError } from '../protocol/index.ts';
import { authorityCommand } from './authority.ts';
import { UsageError } from './cli.ts';
import { demoCommand } from './demo.ts';
import { deviceCommand } from './device.ts';
import { gatewayCommand } from './gateway.ts';

const USAGE = `leafgate — X.509 certificate life cycle for an IoT edge gateway and its leaf devices

Usage: leafgate <command> [options]   (each command has --help)

Commands:
  demo        authority + gateway + simulated devices onboarding end to end
  authority   run the trust authority; create gateway tokens and ddkg codes
  gateway     enroll a gateway and run its MQTT broker
  device      onboard a leaf device (reference client)
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

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof UsageError) {
      process.stderr.write(`${err.message}\n`);
      process.exitCode = 2;
    } else if (err instanceof LeafgateError) {
      process.stderr.write(`error [${err.code}]: ${err.message}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`error: ${(err as Error)?.stack ?? err}\n`);
      process.exitCode = 1;
    }
  },
);
