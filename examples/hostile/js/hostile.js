// A deliberately hostile flow in JavaScript, for the host's containment
// tests. Its behaviour on every event is chosen by the config key `mode`:
//
// - `loop`: spins forever (stopped by the CPU deadline);
// - `memory`: allocates until it fails (stopped by the memory cap);
// - anything else: behaves (says "ok").
//
// Build: sdk/js/build.sh --world flow examples/hostile/js/hostile.js hostile_js.wasm
import { get as configGet } from 'plugboard:host/config@0.1.0';

export const handler = {
  handle(interaction, state, event) {
    const mode = configGet('mode') ?? '';
    if (mode === 'loop') {
      let x = 0;
      for (;;) x = (x + 1) | 0;
    }
    if (mode === 'memory') {
      const hoard = [];
      for (;;) {
        const chunk = new Uint8Array(1 << 20);
        chunk[0] = 1;
        hoard.push(chunk);
      }
    }
    return { actions: [{ tag: 'say', val: { text: 'ok' } }] };
  },
};
