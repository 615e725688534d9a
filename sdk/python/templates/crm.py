"""A starting point for a Plugboard CRM connector in Python: looks customers
up by address and records finished interactions. This one keeps both in the
tenant's key-value store (grant it `kv`); a real one calls the CRM over
`http` (grant the CRM's host:port).

Build:  ./build.sh   (sdk/python/build.sh --world crm . {{NAME}}.wasm)
Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import kv, log
from wit_world.imports.plugboard_crm_types import Profile


class Connector(exports.Connector):
    def lookup_customer(self, channel, address):
        try:
            name = kv.get(f"customer/{address}")
        except Err as e:
            raise Err(f"kv: {e.value}")
        if name is None:
            return None
        return Profile(id=address, name=name.decode("utf-8", "replace"), attributes=[])

    def record_interaction(self, summary):
        log.log(log.Level.INFO, f"interaction {summary.id} ended")
        try:
            kv.set(f"last/{summary.from_}", summary.id.encode())
        except Err as e:
            raise Err(f"kv: {e.value}")
