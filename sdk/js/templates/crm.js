// A starting point for a Plugboard CRM connector in JavaScript: looks
// customers up by address and records finished interactions. This one keeps
// both in the tenant's key-value store (grant it `kv`); a real one calls the
// CRM over `http` (grant the CRM's host:port).
//
// Build:  ./build.sh   (sdk/js/build.sh --world crm {{NAME}}.js {{NAME}}.wasm)
// Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
import { get, set } from 'plugboard:host/kv@0.1.0';
import { log } from 'plugboard:host/log@0.1.0';

// Host errors arrive as exceptions whose payload is the `error` variant.
const describe = (e) => `kv: ${JSON.stringify(e.payload ?? String(e))}`;

export const connector = {
  lookupCustomer(channel, address) {
    let name;
    try {
      name = get(`customer/${address}`);
    } catch (e) {
      throw describe(e);
    }
    if (name === undefined) return undefined;
    return { id: address, name: new TextDecoder().decode(name), attributes: [] };
  },

  recordInteraction(summary) {
    log('info', `interaction ${summary.id} ended`);
    try {
      set(`last/${summary.from}`, new TextEncoder().encode(summary.id));
    } catch (e) {
      throw describe(e);
    }
  },
};
