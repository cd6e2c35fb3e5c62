import type { Emitter, Options, OptionSpecs } from './common.ts';

export interface Bench<S extends OptionSpecs> {
  name: string;
  description: string;
  options: S;
  /** Options include the common ones (`keep`, `max-seconds`). */
  run(opts: Options<S> & { keep: boolean; 'max-seconds': number }, emit: Emitter): Promise<void>;
}

export function defineBench<S extends OptionSpecs>(b: Bench<S>): Bench<S> {
  return b;
}
