// Builds a JavaScript Plugboard plugin into a WebAssembly component with the
// componentize-js API (the `jco componentize` CLI is not used).
//
//   node sdk/js/build.mjs --tools DIR --wit WIT_DIR --world plugboard:flow/flow@0.1.0 SRC.js OUT.wasm
//
// Normally run by sdk/js/build.sh, which installs the pinned componentize-js
// into DIR (target/sdk-tools/js) and assembles WIT_DIR.
import { readFile, writeFile, rename } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    tools: { type: 'string' },
    wit: { type: 'string' },
    world: { type: 'string' },
  },
});
if (!values.tools || !values.wit || !values.world || positionals.length !== 2) {
  console.error('usage: build.mjs --tools DIR --wit WIT_DIR --world WORLD SRC.js OUT.wasm');
  process.exit(2);
}
const [src, out] = positionals.map((p) => resolve(p));

// componentize-js is ESM-only: import it from the tools directory by path.
const pkgDir = join(resolve(values.tools), 'node_modules', '@bytecodealliance', 'componentize-js');
const pkg = JSON.parse(await readFile(join(pkgDir, 'package.json'), 'utf8'));
const entry = typeof pkg.exports === 'string' ? pkg.exports : pkg.exports.import;
const { componentize } = await import(pathToFileURL(join(pkgDir, entry)).href);

// Plugins talk to the outside only through the plugboard:host imports: no
// fetch() (it would import wasi:http), no fetch-event export. `stdio` (console
// output to the server log's stderr), `random` (Math.random) and `clocks`
// (Date.now) stay on. Ahead-of-time compilation (weval) stays off: it would
// download a binary.
const disableFeatures = ['http', 'fetch-event'];

const t0 = Date.now();
const { component } = await componentize({
  sourcePath: src,
  witPath: resolve(values.wit),
  worldName: values.world,
  disableFeatures,
  enableAot: false,
});
await writeFile(`${out}.tmp`, component);
await rename(`${out}.tmp`, out);
console.error(
  `componentize-js ${pkg.version}: ${component.length} bytes in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
);
