"""A starting point for a Plugboard text-to-speech hook in Python. It may
return audio or, as here, rewrite the text for the built-in engine: this one
spells out `&` and `%` so that they are spoken.

Build:  ./build.sh   (sdk/python/build.sh --world tts . {{NAME}}.wasm)
Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
"""

from wit_world import exports
from wit_world.imports.plugboard_tts_types import Output_Text, Request


class Synthesizer(exports.Synthesizer):
    def synthesize(self, req):
        text = req.text.replace("&", " and ").replace("%", " percent")
        return Output_Text(Request(text=text, voice=req.voice, language=req.language))
