"""Skills router in Python, the same behaviour as plugins/skills-router.

Offers a task only to agents who have every required skill, best first by
total proficiency in those skills, then by the fewest tasks in hand, then by
the longest idle time (then by id, for a stable order). Tasks that waited
over two minutes get their priority raised by one.

Build: sdk/python/build.sh --world router examples/routers/python router_py.wasm
"""

from wit_world import exports
from wit_world.imports.plugboard_router_types import Decision


def score(agent, required):
    """Total level of `agent` in the required skills, or None if one is missing."""
    total = 0
    for name in required:
        level = next((s.level for s in agent.skills if s.name == name), None)
        if level is None:
            return None
        total += level
    return total


class Routing(exports.Routing):
    def route(self, task, candidates):
        scored = []
        for agent in candidates:
            total = score(agent, task.skills)
            if total is not None:
                scored.append((total, agent))
        scored.sort(key=lambda ta: (-ta[0], ta[1].active_tasks, -ta[1].idle_ms, ta[1].id))
        return Decision(
            ranked=[agent.id for _, agent in scored],
            priority=task.priority + 1 if task.waited_ms > 120_000 else None,
        )
