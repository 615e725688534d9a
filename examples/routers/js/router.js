// Skills router in JavaScript, the same behaviour as plugins/skills-router:
// offers a task only to agents who have every required skill, best first by
// total proficiency in those skills, then by the fewest tasks in hand, then
// by the longest idle time (then by id, for a stable order). Tasks that
// waited over two minutes get their priority raised by one.
//
// Build: sdk/js/build.sh --world router examples/routers/js/router.js router_js.wasm

// Total level of `agent` in the required skills, or undefined if one is missing.
function score(agent, required) {
  let total = 0;
  for (const name of required) {
    const skill = agent.skills.find((s) => s.name === name);
    if (skill === undefined) return undefined;
    total += skill.level;
  }
  return total;
}

// u64 fields (idle-ms, waited-ms) arrive as BigInt.
const cmpBig = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
const cmpStr = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

export const routing = {
  route(task, candidates) {
    const scored = [];
    for (const agent of candidates) {
      const total = score(agent, task.skills);
      if (total !== undefined) scored.push({ total, agent });
    }
    scored.sort(
      (x, y) =>
        y.total - x.total ||
        x.agent.activeTasks - y.agent.activeTasks ||
        cmpBig(y.agent.idleMs, x.agent.idleMs) ||
        cmpStr(x.agent.id, y.agent.id),
    );
    return {
      ranked: scored.map((s) => s.agent.id),
      priority: task.waitedMs > 120_000n ? task.priority + 1 : undefined,
    };
  },
};
