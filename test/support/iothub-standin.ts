/** Local Azure IoT Hub stand-in: see test/support/iothub-standin/index.ts. */
export * from './iothub-standin/index.ts';
