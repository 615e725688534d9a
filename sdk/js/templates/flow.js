// A starting point for a Plugboard flow in JavaScript: a one-key menu.
//
// The host creates a fresh instance for every event and calls `handle` once;
// whatever must survive to the next event goes into the returned `state`.
//
// Build:  ./build.sh   (sdk/js/build.sh --world flow {{NAME}}.js {{NAME}}.wasm)
// Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
import { log } from 'plugboard:host/log@0.1.0';

const say = (text) => ({ tag: 'say', val: { text } });

export const handler = {
  handle(interaction, state, event) {
    if (event.tag === 'started') {
      log('info', `call from ${interaction.from}`);
      const menu = {
        prompt: { text: 'Hello! Press 1 to hear this again.' },
        maxDigits: 1,
        timeoutMs: 5000,
        interDigitTimeoutMs: 3000,
        speech: false,
      };
      return { actions: [{ tag: 'gather', val: menu }], state: 'menu' };
    }
    if (state === 'menu' && event.tag === 'digits' && event.val.digits === '1') {
      return { actions: [say('Hello again. Goodbye.'), { tag: 'hangup' }], state: 'done' };
    }
    if (state === 'menu' && (event.tag === 'digits' || event.tag === 'timeout')) {
      return { actions: [say('Goodbye.'), { tag: 'hangup' }], state: 'done' };
    }
    // Anything else (hangup, queue updates...): nothing to do. Throwing a
    // string instead reports a handled failure (the WIT `err`).
    return { actions: [] };
  },
};
