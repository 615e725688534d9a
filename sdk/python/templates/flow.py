"""A starting point for a Plugboard flow in Python: a one-key menu.

The host creates a fresh instance for every event and calls `handle` once;
whatever must survive to the next event goes into `Response.state`.

Build:  ./build.sh   (sdk/python/build.sh --world flow . {{NAME}}.wasm)
Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
"""

from wit_world import exports
from wit_world.imports import log
from wit_world.imports.plugboard_flow_types import (
    Action_Gather,
    Action_Hangup,
    Action_Say,
    Event_Digits,
    Event_Started,
    Event_Timeout,
    Gather,
    Response,
    Say,
)


def say(text):
    return Action_Say(Say(text=text, voice=None, language=None))


class Handler(exports.Handler):
    def handle(self, interaction, state, event):
        if isinstance(event, Event_Started):
            log.log(log.Level.INFO, f"call from {interaction.from_}")
            menu = Gather(
                prompt=Say(text="Hello! Press 1 to hear this again.", voice=None, language=None),
                max_digits=1,
                terminator=None,
                timeout_ms=5000,
                inter_digit_timeout_ms=3000,
                speech=False,
            )
            return Response(actions=[Action_Gather(menu)], state="menu")
        if state == "menu" and isinstance(event, Event_Digits) and event.value.digits == "1":
            return Response(actions=[say("Hello again. Goodbye."), Action_Hangup()], state="done")
        if state == "menu" and isinstance(event, (Event_Digits, Event_Timeout)):
            return Response(actions=[say("Goodbye."), Action_Hangup()], state="done")
        # Anything else (hangup, queue updates...): nothing to do. Raising
        # componentize_py_types.Err("reason") instead reports a handled failure.
        return Response(actions=[], state=None)
