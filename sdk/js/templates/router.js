// A starting point for a Plugboard router in JavaScript: ranks the candidate
// agents for a task. This one keeps the agents that have every skill the
// task needs and puts the longest idle first.
//
// Build:  ./build.sh   (sdk/js/build.sh --world router {{NAME}}.js {{NAME}}.wasm)
// Deploy: plugboard plugin deploy TENANT {{NAME}} {{NAME}}.wasm

const hasSkills = (agent, needed) =>
  needed.every((n) => agent.skills.some((s) => s.name === n));

export const routing = {
  route(task, candidates) {
    const able = candidates.filter((a) => hasSkills(a, task.skills));
    // idleMs is a u64, i.e. a BigInt.
    able.sort((a, b) => (b.idleMs > a.idleMs ? 1 : b.idleMs < a.idleMs ? -1 : 0));
    return { ranked: able.map((a) => a.id) };
  },
};
