"""A starting point for a Plugboard router in Python: ranks the candidate
agents for a task. This one keeps the agents that have every skill the task
needs and puts the longest idle first.

Build:  ./build.sh   (sdk/python/build.sh --world router . {{NAME}}.wasm)
Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm
"""

from wit_world import exports
from wit_world.imports.plugboard_router_types import Decision


def has_skills(agent, needed):
    names = {s.name for s in agent.skills}
    return all(n in names for n in needed)


class Routing(exports.Routing):
    def route(self, task, candidates):
        able = [a for a in candidates if has_skills(a, task.skills)]
        able.sort(key=lambda a: -a.idle_ms)
        return Decision(ranked=[a.id for a in able], priority=None)
