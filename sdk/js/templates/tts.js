// A starting point for a Plugboard text-to-speech hook in JavaScript. It may
// return audio or, as here, rewrite the text for the built-in engine: this
// one spells out `&` and `%` so that they are spoken.
//
// Build:  ./build.sh   (sdk/js/build.sh --world tts {{NAME}}.js {{NAME}}.wasm)
// Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm

export const synthesizer = {
  synthesize(req) {
    const text = req.text.replaceAll('&', ' and ').replaceAll('%', ' percent');
    return { tag: 'text', val: { ...req, text } };
  },
};
