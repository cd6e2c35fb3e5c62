#!/usr/bin/env node
// Installed entry point (`npx leafgate`): loads tsx, then the TypeScript CLI.
import { register } from 'tsx/esm/api';
register();
await import('./leafgate.ts');
