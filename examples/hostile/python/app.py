"""A deliberately hostile flow in Python, for the host's containment tests.

Its behaviour on every event is chosen by the config key `mode`:

- `loop`: spins forever (stopped by the CPU deadline);
- `memory`: allocates until it fails (stopped by the memory cap);
- anything else: behaves (says "ok").

Build: sdk/python/build.sh --world flow examples/hostile/python hostile_py.wasm
"""

from wit_world import exports
from wit_world.imports import config
from wit_world.imports.plugboard_flow_types import Action_Say, Response, Say


class Handler(exports.Handler):
    def handle(self, interaction, state, event):
        mode = config.get("mode") or ""
        if mode == "loop":
            x = 0
            while True:
                x = (x + 1) & 0xFFFFFFFF
        if mode == "memory":
            hoard = []
            while True:
                chunk = bytearray(1 << 20)
                chunk[0] = 1
                hoard.append(chunk)
        return Response(actions=[Action_Say(Say(text="ok", voice=None, language=None))], state=None)
