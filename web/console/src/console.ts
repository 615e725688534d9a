// Plugboard's web console, served at /console/: the agent desktop and the
// supervisor's wall. It signs in with a token the tenant issued (an
// agent's or a supervisor's, or the tenant's API key), kept in this tab's
// session storage, and is a plain client of the API v1: what it shows is
// what the token may read (GET /v1/tenants/{t}/me says who it is), and
// it follows the tenant's event stream, which the server filters by role.

interface Session {
  tenant: string;
  token: string;
}

interface Me {
  tenant: string;
  name: string;
  role: "tenant" | "supervisor" | "agent";
  agent: string | null;
}

interface TaskView {
  id: string;
  queue: string;
  state: string;
  agent?: string;
}

interface Message {
  id: string;
  interaction: string;
  channel: string;
  direction: string;
  author: { type: string; id?: string };
  text: string;
  subject?: string;
  status: string;
  created_ms: number;
  attachments?: { name: string; content_type: string; size: number }[];
}

interface Screen {
  task: TaskView;
  interaction: {
    id: string;
    channel: string;
    from: string;
    to: string;
    state: string;
    attributes: Record<string, string>;
  };
  messages: Message[];
  customer: { id: string; name?: string; addresses: { channel: string; address: string }[] } | null;
  history: { id: string; channel: string; created_ms: number; state: string; messages: Message[] }[];
  profile: { id: string; name: string | null; attributes: [string, string][] } | null;
  profile_error: string | null;
  dispositions: string[];
}

interface Offer {
  task: string;
  channel: string;
  queue: string;
  deadline: number;
}

interface StreamEvent {
  kind: string;
  interaction?: string;
  data: any;
}

const KEY = "plugboard.console";

// ----- small DOM helpers -----

type Child = Node | string | null | undefined | false;

function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return el;
}

function button(label: string, pb: string, onClick: () => void): HTMLElement {
  const b = h("button", { type: "button", "data-pb": pb }, label);
  b.addEventListener("click", onClick);
  return b;
}

function time(ms: number): string {
  return new Date(ms).toLocaleString();
}

function duration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m ${s % 60}s` : `${s}s`;
}

function who(m: Message): string {
  if (m.author.type === "agent") return m.author.id ?? "agent";
  if (m.author.type === "customer") return "customer";
  return m.author.type;
}

// ----- the API -----

class Api {
  constructor(readonly s: Session) {}

  url(path: string): string {
    return `/v1/tenants/${encodeURIComponent(this.s.tenant)}${path}`;
  }

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    return this.callAt<T>(method, this.url(path), body);
  }

  /** A call to an absolute API path (the operator's, across tenants). */
  async callAt<T>(method: string, url: string, body?: unknown): Promise<T> {
    const init: RequestInit = {
      method,
      headers: { Authorization: `Bearer ${this.s.token}` },
    };
    if (body !== undefined) {
      (init.headers as Record<string, string>)["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(url, init);
    const text = await r.text();
    if (!r.ok) {
      let msg = `${r.status}`;
      try {
        msg = JSON.parse(text).error.message;
      } catch {
        // Not our error shape: the status says it.
      }
      throw new Error(msg);
    }
    return (text ? JSON.parse(text) : null) as T;
  }

  /** Saves a message's file (a fax's PDF, a chat upload) as a download. */
  async download(message: string, n: number, name: string): Promise<void> {
    const r = await fetch(this.url(`/messages/${encodeURIComponent(message)}/attachments/${n}`), {
      headers: { Authorization: `Bearer ${this.s.token}` },
    });
    if (!r.ok) throw new Error(`${r.status}`);
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: name }) as HTMLAnchorElement;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  events(onEvent: (e: StreamEvent) => void, onState: (up: boolean) => void): void {
    let delay = 500;
    const open = () => {
      const proto = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(
        `${proto}://${location.host}${this.url("/events")}?token=${encodeURIComponent(this.s.token)}`,
      );
      ws.onopen = () => {
        delay = 500;
        onState(true);
      };
      ws.onmessage = (m) => {
        try {
          onEvent(JSON.parse(m.data as string));
        } catch {
          // Not JSON: not ours.
        }
      };
      ws.onclose = () => {
        onState(false);
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 15000);
      };
    };
    open();
  }
}

// ----- sign-in -----

function signIn(root: HTMLElement, error = ""): void {
  const tenant = h("input", { "data-pb": "tenant", placeholder: "tenant", autocomplete: "organization" }) as HTMLInputElement;
  const token = h("input", { "data-pb": "token", placeholder: "token", type: "password", autocomplete: "current-password" }) as HTMLInputElement;
  const err = h("div", { class: "error", "data-pb": "error" }, error);
  const go = async () => {
    const s = { tenant: tenant.value.trim(), token: token.value.trim() };
    if (!s.token) {
      err.textContent = "Tenant and token, please (no tenant: the operator's token).";
      return;
    }
    if (!s.tenant) {
      try {
        await new Api(s).callAt("GET", "/v1/tenants");
        sessionStorage.setItem(KEY, JSON.stringify(s));
        startOperator(root, s);
      } catch (e) {
        err.textContent = `Sign-in failed: ${(e as Error).message}`;
      }
      return;
    }
    try {
      const me = await new Api(s).call<Me>("GET", "/me");
      sessionStorage.setItem(KEY, JSON.stringify(s));
      start(root, s, me);
    } catch (e) {
      err.textContent = `Sign-in failed: ${(e as Error).message}`;
    }
  };
  const form = h(
    "form",
    { class: "signin" },
    h("h1", {}, "Plugboard console"),
    h("p", { class: "muted" }, "Sign in with the token your administrator gave you."),
    tenant,
    token,
    h("button", { type: "submit", "data-pb": "signin" }, "Sign in"),
    err,
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    void go();
  });
  root.replaceChildren(form);
}

function signOut(root: HTMLElement): void {
  sessionStorage.removeItem(KEY);
  // A fresh page: no stream, timers or data of the session left.
  root.replaceChildren();
  location.reload();
}

function start(root: HTMLElement, s: Session, me: Me): void {
  const api = new Api(s);
  const desk = me.agent !== null ? new Desk(api, me.agent) : null;
  const wall = me.role !== "agent" ? new Wall(api) : null;
  const link = h("span", { class: "muted", "data-pb": "link" }, "connecting…");
  const header = h(
    "header",
    {},
    h("h1", {}, `Plugboard · ${me.name}`),
    h("span", { "data-pb": "whoami" }, `${me.agent ?? "administrator"} (${me.role})`),
    desk ? desk.presenceControl() : null,
    link,
    button("Sign out", "signout", () => signOut(root)),
  );
  root.replaceChildren(header);
  // A supervisor's wall comes first; their own desk (if they take tasks)
  // below it.
  if (wall) root.append(wall.el);
  if (desk) root.append(desk.el);
  api.events(
    (e) => {
      desk?.onEvent(e);
      wall?.onEvent(e);
    },
    (up) => {
      link.textContent = up ? "live" : "reconnecting…";
      if (up) {
        // Whatever happened while the stream was down.
        void desk?.refresh();
        void wall?.refresh();
      }
    },
  );
  setInterval(() => {
    desk?.tick();
    wall?.tick();
  }, 1000);
}

// ----- the softphone -----

// The agent's voice leg in the browser. While it is on, one peer
// connection stays up (the server answers our offer: ICE-lite, DTLS-SRTP,
// G.711), and a call offered to the agent rings it with no new handshake.
// Ringing, answered and ended come as `softphone` events on the stream;
// answering, hanging up, hold and digits are requests; mute stays in the
// page (the microphone track is disabled).
class Softphone {
  readonly el = h("section", { "data-pb": "softphone" });
  private stateEl = h("span", { class: "state", "data-pb": "softphone-state" }, "off");
  private callEl = h("div", { class: "muted", "data-pb": "softphone-call" });
  private levelEl = h("div", { class: "muted", "data-pb": "softphone-level" });
  private controls = h("div", { class: "actions" });
  private audio = h("audio", { autoplay: "" }) as HTMLAudioElement;
  private pc: RTCPeerConnection | null = null;
  private mic: MediaStream | null = null;
  private state = "off";
  private muted = false;
  /// The server's session for this page's connection (its events carry it).
  private session: number | null = null;

  constructor(
    private api: Api,
    private agent: string,
  ) {
    this.el.append(h("h2", {}, "Phone"), h("div", {}, this.stateEl), this.callEl, this.controls, this.levelEl, this.audio);
    this.render();
  }

  private path(action = ""): string {
    return `/agents/${encodeURIComponent(this.agent)}/softphone${action ? `/${action}` : ""}`;
  }

  /// Whether calls ring here (the connection is up).
  live(): boolean {
    return this.state !== "off" && this.state !== "connecting";
  }

  async on(): Promise<void> {
    if (this.pc) return;
    this.show("connecting");
    try {
      this.mic = await navigator.mediaDevices.getUserMedia({ audio: true });
      const pc = new RTCPeerConnection();
      this.pc = pc;
      for (const t of this.mic.getAudioTracks()) pc.addTrack(t, this.mic);
      pc.ontrack = (e) => {
        this.audio.srcObject = e.streams[0] ?? new MediaStream([e.track]);
        void this.audio.play().catch(() => undefined);
      };
      pc.onconnectionstatechange = () => {
        if (this.pc !== pc) return;
        if (pc.connectionState === "connected" && this.state === "connecting") this.show("idle");
        if (pc.connectionState === "failed" || pc.connectionState === "closed") this.close("the connection was lost");
      };
      // The server is ICE-lite: it needs none of our candidates, so the
      // offer goes at once.
      await pc.setLocalDescription(await pc.createOffer());
      const a = await this.api.call<{ sdp: string; session: number }>("POST", this.path(), { sdp: pc.localDescription?.sdp ?? "" });
      if (this.pc !== pc) return;
      this.session = a.session;
      await pc.setRemoteDescription({ type: "answer", sdp: a.sdp });
    } catch (e) {
      this.close(`Softphone: ${(e as Error).message}`);
    }
  }

  async off(): Promise<void> {
    this.close("");
    await this.api.call("DELETE", this.path()).catch(() => undefined);
  }

  private close(why: string): void {
    this.pc?.close();
    this.pc = null;
    this.session = null;
    for (const t of this.mic?.getTracks() ?? []) t.stop();
    this.mic = null;
    this.muted = false;
    this.show("off");
    this.callEl.textContent = why;
  }

  async act(action: string, body?: unknown): Promise<void> {
    try {
      await this.api.call("POST", this.path(action), body);
    } catch (e) {
      alert(`${action}: ${(e as Error).message}`);
    }
  }

  /// Answers the call that rings (the server waits a moment for it).
  async answer(): Promise<void> {
    await this.api.call("POST", this.path("answer"));
  }

  private mute(on: boolean): void {
    this.muted = on;
    for (const t of this.mic?.getAudioTracks() ?? []) t.enabled = !on;
    this.render();
  }

  onEvent(e: StreamEvent): void {
    if (e.kind !== "softphone" || e.data.agent !== this.agent) return;
    // Only this page's connection: not another tab's, nor one replaced.
    if (this.session === null || e.data.session !== this.session) return;
    const st = e.data.state as string;
    if (st === "off") {
      this.close("The softphone was disconnected.");
      return;
    }
    const call = e.data.call;
    this.callEl.textContent = call && call.from ? `${st === "ringing" ? "Incoming call from" : "On a call with"} ${call.from}` : "";
    this.show(st);
  }

  private show(state: string): void {
    this.state = state;
    this.stateEl.textContent = state;
    this.stateEl.dataset.state = state;
    if (state !== "connected" && state !== "held" && this.muted) this.mute(false);
    this.render();
  }

  private render(): void {
    const c = this.controls;
    c.replaceChildren();
    switch (this.state) {
      case "off":
        c.append(button("Softphone on", "softphone-on", () => void this.on()));
        break;
      case "connecting":
        break;
      case "ringing":
        c.append(
          button("Answer", "softphone-answer", () => void this.answer().catch((e) => alert(`answer: ${(e as Error).message}`))),
          button("Decline", "softphone-hangup", () => void this.act("hangup")),
        );
        break;
      case "connected":
      case "held": {
        const held = this.state === "held";
        c.append(
          button("Hang up", "softphone-hangup", () => void this.act("hangup")),
          button(held ? "Resume" : "Hold", "softphone-hold", () => void this.act(held ? "resume" : "hold")),
          button(this.muted ? "Unmute" : "Mute", "softphone-mute", () => this.mute(!this.muted)),
        );
        const pad = h("span", { "data-pb": "keypad" });
        for (const d of "123456789*0#") pad.append(button(d, `dtmf-${d}`, () => void this.act("dtmf", { digits: d })));
        c.append(pad);
        break;
      }
      default:
        c.append(button("Softphone off", "softphone-off", () => void this.off()));
    }
  }

  /// The levels in and out, from the connection's statistics (the agent
  /// sees the microphone and the line work).
  async tick(): Promise<void> {
    const pc = this.pc;
    if (!pc) {
      this.levelEl.textContent = "";
      return;
    }
    let inLevel = 0;
    let inEnergy = 0;
    let packets = 0;
    let outLevel = 0;
    (await pc.getStats()).forEach((r: any) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        inLevel = r.audioLevel ?? 0;
        inEnergy = r.totalAudioEnergy ?? 0;
        packets = r.packetsReceived ?? 0;
      } else if (r.type === "media-source" && r.kind === "audio") {
        outLevel = r.audioLevel ?? 0;
      }
    });
    const l = this.levelEl;
    l.dataset.inLevel = String(inLevel);
    l.dataset.inEnergy = String(inEnergy);
    l.dataset.inPackets = String(packets);
    l.dataset.outLevel = String(outLevel);
    l.textContent = `line ${Math.round(inLevel * 100)} % · microphone ${Math.round(outLevel * 100)} %`;
  }
}

// ----- the agent desktop -----

class Desk {
  readonly el = h("main", { "data-pb": "desk" });
  private offersEl = h("div", { "data-pb": "offers" });
  private tasksEl = h("div", { "data-pb": "tasks" });
  private screenEl = h("section", { "data-pb": "screen" }, h("p", { class: "muted" }, "No task selected."));
  private stateEl = h("span", { class: "state", "data-pb": "state" }, "…");
  private offers = new Map<string, Offer>();
  private tasks = new Map<string, TaskView>();
  private selected: string | null = null;
  private screen: Screen | null = null;
  private transcript: HTMLElement | null = null;
  private select = h("select", { "data-pb": "presence" }) as HTMLSelectElement;
  private phone: Softphone;
  private consulting = new Set<string>();

  constructor(
    private api: Api,
    private agent: string,
  ) {
    this.phone = new Softphone(api, agent);
    for (const [value, label] of [
      ["available", "Available"],
      ["away:break", "Away: break"],
      ["away:lunch", "Away: lunch"],
      ["away:meeting", "Away: meeting"],
      ["offline", "Offline"],
    ]) {
      this.select.append(h("option", { value }, label));
    }
    this.select.addEventListener("change", () => void this.setPresence(this.select.value));
    this.el.append(
      h(
        "div",
        {},
        this.phone.el,
        h("section", {}, h("h2", {}, "Offers"), this.offersEl),
        h("section", {}, h("h2", {}, "My tasks"), this.tasksEl),
      ),
      this.screenEl,
    );
    void this.refresh();
  }

  presenceControl(): HTMLElement {
    return h("span", {}, this.select, " ", this.stateEl);
  }

  async setPresence(value: string): Promise<void> {
    const [state, reason] = value.split(":");
    const body = reason ? { state, reason } : { state };
    try {
      await this.api.call("PUT", `/agents/${encodeURIComponent(this.agent)}/presence`, body);
      await this.refreshAgent();
    } catch (e) {
      alert(`Presence: ${(e as Error).message}`);
    }
  }

  async refresh(): Promise<void> {
    await this.refreshAgent();
    try {
      const r = await this.api.call<{ tasks: TaskView[] }>("GET", `/tasks?agent=${encodeURIComponent(this.agent)}`);
      this.tasks.clear();
      for (const t of r.tasks) {
        if (t.agent === this.agent && (t.state === "connected" || t.state === "offered")) {
          this.tasks.set(t.id, t);
        }
      }
      for (const id of [...this.offers.keys()]) {
        if (this.tasks.get(id)?.state !== "offered") this.offers.delete(id);
      }
      this.renderTasks();
      this.renderOffers();
    } catch (e) {
      this.tasksEl.textContent = `Tasks: ${(e as Error).message}`;
    }
  }

  async refreshAgent(): Promise<void> {
    try {
          const a = await this.api.call<any>("GET", `/agents/${encodeURIComponent(this.agent)}`);
      const st = a.stats?.state ?? "unknown";
      this.stateEl.textContent = st;
      this.stateEl.dataset.state = st;
      const p = a.presence;
      if (p && typeof p === "object") {
        const v = p.state === "away" ? `away:${p.reason}` : p.state;
        if ([...this.select.options].some((o) => o.value === v)) this.select.value = v;
      }
    } catch (e) {
      this.stateEl.textContent = (e as Error).message;
    }
  }

  onEvent(e: StreamEvent): void {
    this.phone.onEvent(e);
    if (e.kind === "acd") {
      const d = e.data;
      if (d.type === "offer" && d.agent === this.agent) {
        this.offers.set(d.task, {
          task: d.task,
          channel: d.channel,
          queue: d.queue ?? "",
          deadline: Date.now() + (d.timeout_ms ?? 20000),
        });
        this.tasks.set(d.task, { id: d.task, queue: d.queue ?? "", state: "offered", agent: this.agent });
        this.renderOffers();
        this.renderTasks();
        // When it showed, for the User Timing API (the console benchmark
        // reads it).
        performance.mark(`offer:${d.task}`);
      } else if (d.type === "rescind" && d.agent === this.agent) {
        this.offers.delete(d.task);
        this.tasks.delete(d.task);
        this.renderOffers();
        this.renderTasks();
      } else if (d.type === "presence" && d.agent === this.agent) {
        void this.refreshAgent();
      } else if (d.type === "task" || d.type === "transfer" || d.type === "consult_completed") {
        // (A supervisor's stream has every task's news: only their own
        // redraw this desk.)
        const e = d.event ?? {};
        const named = [e.agent, e.from, e.to].includes(this.agent);
        if (!named && !this.tasks.has(d.task)) return;
        void this.refresh();
        const mine = (e.kind === "accepted" && e.agent === this.agent) || (e.kind === "handed_over" && e.to === this.agent);
        // The screen pops up when a task becomes the agent's (a call is
        // answered on the phone, a chat accepted, a transfer handed over)
        // unless another one is open.
        if (mine && (this.selected === null || this.selected === d.task)) void this.open(d.task);
      }
      return;
    }
    if (e.interaction && e.interaction === this.selected && this.screen) {
      if (e.kind === "message") {
        this.addMessage(e.data as Message);
      } else if (e.kind === "message_status") {
        const m = this.screen.messages.find((x) => x.id === e.data.id);
        if (m) m.status = e.data.status;
      } else if (e.kind === "typing" && this.transcript && e.data.author?.id !== this.agent) {
        const t = this.screenEl.querySelector("[data-pb=typing]");
        if (t) t.textContent = e.data.on === false ? "" : `${e.data.author?.type ?? "someone"} is typing…`;
      }
    }
  }

  tick(): void {
    void this.phone.tick();
    for (const el of this.offersEl.querySelectorAll<HTMLElement>("[data-pb=countdown]")) {
      const o = this.offers.get(el.dataset.task ?? "");
      if (o) el.textContent = duration(o.deadline - Date.now());
    }
  }

  renderOffers(): void {
    this.offersEl.replaceChildren();
    if (this.offers.size === 0) this.offersEl.append(h("p", { class: "muted" }, "Nothing offered."));
    for (const o of this.offers.values()) {
      this.offersEl.append(
        h(
          "div",
          { class: "offer", "data-pb": "offer", "data-task": o.task },
          h("span", { class: "countdown", "data-pb": "countdown", "data-task": o.task }, duration(o.deadline - Date.now())),
          h("strong", {}, `${o.channel} · ${o.queue}`),
          h("div", { class: "muted" }, o.task),
          // A call is answered on the softphone when it is on (the
          // ACD hears of it from the call), else on the SIP phone.
          button("Accept", "accept", () => void (o.channel === "voice" && this.phone.live() ? this.answer(o.task) : this.act(o.task, "accept"))),
          button("Reject", "reject", () => void this.act(o.task, "reject")),
        ),
      );
    }
  }

  renderTasks(): void {
    this.tasksEl.replaceChildren();
    const connected = [...this.tasks.values()].filter((t) => t.state !== "offered");
    if (connected.length === 0) this.tasksEl.append(h("p", { class: "muted" }, "No tasks in hand."));
    for (const t of connected) {
      const el = h(
        "div",
        { class: `task${t.id === this.selected ? " selected" : ""}`, "data-pb": "task", "data-task": t.id },
        h("strong", {}, t.queue),
        h("div", { class: "muted" }, `${t.state} · ${t.id}`),
      );
      el.addEventListener("click", () => void this.open(t.id));
      this.tasksEl.append(el);
    }
  }

  async transfer(task: string, to: string, warm: boolean): Promise<void> {
    await this.act(task, "transfer", { to, warm });
    if (warm) {
      this.consulting.add(task);
      if (this.selected === task) this.renderScreen();
    }
  }

  async endConsult(task: string, action: string): Promise<void> {
    this.consulting.delete(task);
    await this.act(task, action);
    if (this.selected === task) this.renderScreen();
  }

  async answer(task: string): Promise<void> {
    try {
      await this.phone.answer();
      this.offers.delete(task);
      this.renderOffers();
    } catch (e) {
      alert(`answer: ${(e as Error).message}`);
    }
  }

  async act(task: string, action: string, body: unknown = {}): Promise<void> {
    try {
      await this.api.call("POST", `/tasks/${encodeURIComponent(task)}/${action}`, body);
      this.offers.delete(task);
      if (action === "reject") this.tasks.delete(task);
      await this.refresh();
      if (action === "accept") await this.open(task);
      if (action === "complete" && this.selected === task) this.wrapUp(task);
    } catch (e) {
      alert(`${action}: ${(e as Error).message}`);
    }
  }

  async open(task: string): Promise<void> {
    this.selected = task;
    this.renderTasks();
    try {
      const s = await this.api.call<Screen>("GET", `/tasks/${encodeURIComponent(task)}/screen`);
      if (this.selected !== task) return;
      this.screen = s;
      this.renderScreen();
    } catch (e) {
      this.screenEl.replaceChildren(h("p", { class: "error" }, `Screen: ${(e as Error).message}`));
    }
  }

  renderScreen(): void {
    const s = this.screen;
    if (!s) return;
    const ix = s.interaction;
    const attrs = h("dl", { "data-pb": "attributes" });
    for (const [k, v] of Object.entries(ix.attributes)) {
      attrs.append(h("dt", {}, k), h("dd", { "data-attr": k }, v));
    }
    if (Object.keys(ix.attributes).length === 0) attrs.append(h("dd", { class: "muted" }, "none"));
    const profile = h("div", { "data-pb": "profile" });
    if (s.profile) {
      const dl = h("dl", {}, h("dt", {}, "name"), h("dd", { "data-field": "name" }, s.profile.name ?? "—"), h("dt", {}, "CRM id"), h("dd", {}, s.profile.id));
      for (const [k, v] of s.profile.attributes) dl.append(h("dt", {}, k), h("dd", { "data-field": k }, v));
      profile.append(dl);
    } else {
      profile.append(h("p", { class: "muted" }, s.profile_error ? `CRM: ${s.profile_error}` : "No CRM profile."));
    }
    const history = h("ul", { class: "history", "data-pb": "history" });
    for (const x of s.history) {
      const last = x.messages[x.messages.length - 1];
      history.append(
        h("li", { "data-interaction": x.id, "data-channel": x.channel }, `${time(x.created_ms)} · ${x.channel} · ${x.state}`, last ? h("div", { class: "muted" }, last.text.slice(0, 80)) : null),
      );
    }
    if (s.history.length === 0) history.append(h("li", { class: "muted" }, "No earlier contact."));

    const main = h("div", {});
    if (ix.channel === "chat" || ix.channel === "email" || ix.channel === "sms") {
      this.transcript = h("div", { class: "transcript", "data-pb": "transcript" });
      for (const m of s.messages) this.transcript.append(this.messageEl(m));
      const text = h("textarea", { "data-pb": "reply", placeholder: "Reply…" }) as HTMLTextAreaElement;
      let typing = 0;
      text.addEventListener("input", () => {
        const now = Date.now();
        if (now - typing > 3000) {
          typing = now;
          void this.api.call("POST", `/interactions/${encodeURIComponent(ix.id)}/typing`, { on: true }).catch(() => undefined);
        }
      });
      const send = async () => {
        const body = text.value.trim();
        if (!body) return;
        try {
          const m = await this.api.call<Message>("POST", `/interactions/${encodeURIComponent(ix.id)}/messages`, { text: body });
          text.value = "";
          this.addMessage(m);
        } catch (e) {
          alert(`Send: ${(e as Error).message}`);
        }
      };
      text.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey) {
          e.preventDefault();
          void send();
        }
      });
      main.append(
        h("h2", {}, `${ix.channel} with ${s.customer?.name ?? ix.from}`),
        this.transcript,
        h("div", { class: "muted", "data-pb": "typing" }),
        h("div", { class: "reply" }, text, button("Send", "send", () => void send())),
      );
      this.transcript.scrollTop = this.transcript.scrollHeight;
    } else {
      this.transcript = null;
      main.append(h("h2", {}, `${ix.channel} from ${ix.from}`), h("p", {}, `To ${ix.to} · ${ix.state}`));
    }
    const to = h("input", { "data-pb": "transfer-to", placeholder: "agent:ID, queue:NAME or a number" }) as HTMLInputElement;
    const warm = h("input", { type: "checkbox", "data-pb": "warm" }) as HTMLInputElement;
    main.append(
      h(
        "div",
        { class: "actions" },
        button("Complete", "complete", () => void this.act(s.task.id, "complete")),
        to,
        h("label", {}, warm, " warm"),
        button("Transfer", "transfer", () => void this.transfer(s.task.id, to.value.trim(), warm.checked)),
      ),
    );
    // A warm transfer: the customer holds while the agent talks to the
    // other party, then hands over or takes the customer back.
    if (this.consulting.has(s.task.id)) {
      main.append(
        h(
          "div",
          { class: "actions", "data-pb": "consulting" },
          h("span", { class: "muted" }, "Consulting; the customer holds."),
          button("Complete transfer", "complete-transfer", () => void this.endConsult(s.task.id, "complete-transfer")),
          button("Cancel transfer", "cancel-transfer", () => void this.endConsult(s.task.id, "cancel-transfer")),
        ),
      );
    }
    this.screenEl.replaceChildren(
      h(
        "div",
        { class: "screen" },
        main,
        h(
          "div",
          {},
          h("h2", {}, "Customer"),
          profile,
          h("h2", {}, "From the IVR / flow"),
          attrs,
          h("h2", {}, "History"),
          history,
        ),
      ),
    );
  }

  // After the conversation: a disposition code (the queue's list, or
  // free text) and notes, saved on the task's record and sent to the CRM.
  wrapUp(task: string): void {
    const codes = this.screen?.dispositions ?? [];
    // The task is over: its news no longer redraws the screen.
    this.selected = null;
    this.screen = null;
    this.transcript = null;
    this.renderTasks();
    const code: HTMLInputElement | HTMLSelectElement =
      codes.length > 0
        ? (h("select", { "data-pb": "disposition" }, ...codes.map((c) => h("option", { value: c }, c))) as HTMLSelectElement)
        : (h("input", { "data-pb": "disposition", placeholder: "disposition" }) as HTMLInputElement);
    const notes = h("textarea", { "data-pb": "notes", placeholder: "Notes" }) as HTMLTextAreaElement;
    const done = (text: string) => {
      this.screenEl.replaceChildren(h("p", { class: "muted", "data-pb": "wrapped" }, text));
    };
    this.screenEl.replaceChildren(
      h(
        "div",
        { "data-pb": "wrap-up" },
        h("h2", {}, "Wrap-up"),
        h("div", { class: "actions" }, code),
        h("div", { class: "reply" }, notes),
        h(
          "div",
          { class: "actions" },
          button("Save", "save-wrap-up", () => {
            this.api
              .call("POST", `/tasks/${encodeURIComponent(task)}/wrap-up`, {
                disposition: code.value.trim() || null,
                notes: notes.value.trim() || null,
              })
              .then(() => done("Wrapped up."))
              .catch((e: Error) => alert(`Wrap-up: ${e.message}`));
          }),
          button("Skip", "skip-wrap-up", () => done("Task completed.")),
        ),
      ),
    );
  }

  messageEl(m: Message): HTMLElement {
    return h(
      "div",
      { class: "msg", "data-pb": "msg", "data-id": m.id, "data-from": m.author.type },
      h("div", { class: "who" }, `${who(m)} · ${time(m.created_ms)}`),
      m.subject ? h("strong", {}, m.subject) : null,
      h("div", { "data-pb": "text" }, m.text),
      ...(m.attachments ?? []).map((a, n) =>
        button(`${a.name} (${Math.ceil(a.size / 1024)} KiB)`, "attachment", () =>
          this.api.download(m.id, n, a.name).catch((e: Error) => alert(`Download: ${e.message}`)),
        ),
      ),
    );
  }

  addMessage(m: Message): void {
    if (!this.screen || !this.transcript || this.screen.messages.some((x) => x.id === m.id)) return;
    this.screen.messages.push(m);
    this.transcript.append(this.messageEl(m));
    this.transcript.scrollTop = this.transcript.scrollHeight;
    // What the customer wrote is read by the agent who sees it.
    if (m.author.type === "customer") {
      void this.api.call("POST", `/messages/${encodeURIComponent(m.id)}/read`).catch(() => undefined);
    }
  }
}

// ----- the supervisor's wall -----

const QUEUE_COLUMNS: [string, string][] = [
  ["waiting", "Waiting"],
  ["longest_wait_ms", "Longest wait"],
  ["offered", "Offered"],
  ["connected", "Connected"],
  ["agents_available", "Available"],
  ["agents_busy", "Busy"],
  ["agents_away", "Away"],
  ["answered", "Answered"],
  ["abandoned", "Abandoned"],
  ["service_level_percent", "Service level"],
];

class Wall {
  readonly el = h("main", { class: "wall", "data-pb": "wall" });
  private queuesEl = h("tbody", {});
  private agentsEl = h("tbody", {});
  private stats = new Map<string, any>();
  private agents: any[] = [];
  private agentsDue = false;

  private monitoring: string | null = null;
  private reports: Reports;

  constructor(private api: Api) {
    this.reports = new Reports(api);
    this.el.append(
      h(
        "section",
        {},
        h("h2", {}, "Queues"),
        h("table", { "data-pb": "queues" }, h("thead", {}, h("tr", {}, h("th", {}, "Queue"), ...QUEUE_COLUMNS.map(([, l]) => h("th", {}, l)))), this.queuesEl),
      ),
      h(
        "section",
        {},
        h("h2", {}, "Agents"),
        h(
          "table",
          { "data-pb": "agents" },
          h("thead", {}, h("tr", {}, h("th", {}, "Agent"), h("th", {}, "State"), h("th", {}, "In state"), h("th", {}, "Tasks"), h("th", {}, "Today"), h("th", {}, "Presence"))),
          this.agentsEl,
        ),
      ),
      this.reports.el,
    );
    void this.refresh();
    void this.reports.load();
  }

  async refresh(): Promise<void> {
    try {
      const q = await this.api.call<{ queues: { id: string }[] }>("GET", "/queues");
      for (const { id } of q.queues) {
        this.stats.set(id, await this.api.call("GET", `/queues/${encodeURIComponent(id)}/stats`));
      }
      this.renderQueues();
      await this.refreshAgents();
    } catch (e) {
      this.queuesEl.replaceChildren(h("tr", {}, h("td", { class: "error" }, (e as Error).message)));
    }
  }

  async refreshAgents(): Promise<void> {
      const a = await this.api.call<{ agents: any[] }>("GET", "/agents");
    this.agents = a.agents;
    this.renderAgents();
  }

  onEvent(e: StreamEvent): void {
    if (e.kind !== "acd") return;
    if (e.data.type === "stats") {
      this.stats.set(e.data.queue, e.data.stats);
      this.renderQueues();
    }
    if (["presence", "offer", "task", "rescind"].includes(e.data.type)) this.agentsDue = true;
  }

  tick(): void {
    // Not while the supervisor is typing or choosing in the table: a
    // redraw would throw their input away.
    if (this.agentsDue && !this.agentsEl.contains(document.activeElement)) {
      this.agentsDue = false;
      void this.refreshAgents().catch(() => undefined);
    }
  }

  renderQueues(): void {
    this.queuesEl.replaceChildren();
    for (const [id, s] of [...this.stats.entries()].sort()) {
      const row = h("tr", { "data-queue": id }, h("td", {}, id));
      for (const [col] of QUEUE_COLUMNS) {
        const v = s[col];
        const text =
          v === null || v === undefined ? "—" : col === "longest_wait_ms" ? duration(v) : col === "service_level_percent" ? `${Math.round(v)} %` : String(v);
        row.append(h("td", { "data-col": col }, text));
      }
      this.queuesEl.append(row);
    }
  }

  renderAgents(): void {
    this.agentsEl.replaceChildren();
    for (const a of this.agents) {
      const st = a.stats ?? {};
      // The supervisor may set an agent's presence.
      const presence = h("select", { "data-pb": "set-presence" }) as HTMLSelectElement;
      for (const v of ["", "available", "away:supervisor", "offline"]) {
        presence.append(h("option", { value: v }, v === "" ? "set…" : v));
      }
      presence.addEventListener("change", () => {
        const [state, reason] = presence.value.split(":");
        if (!state) return;
        this.api
          .call("PUT", `/agents/${encodeURIComponent(a.id)}/presence`, reason ? { state, reason } : { state })
          .then(() => this.refreshAgents())
          .catch((e: Error) => alert(`Presence: ${e.message}`));
      });
      const tasks = h("td", {});
      for (const t of (st.tasks ?? []) as string[]) {
        tasks.append(this.taskControls(t));
      }
      this.agentsEl.append(
        h(
          "tr",
          { "data-agent": a.id },
          h("td", {}, a.id),
          h("td", { "data-col": "state" }, st.state ?? "—"),
          h("td", {}, st.in_state_ms !== undefined ? duration(st.in_state_ms) : "—"),
          tasks,
          h("td", {}, String(st.tasks_today ?? 0)),
          h("td", {}, presence),
        ),
      );
    }
  }

  // A live task on the wall: listen, whisper or barge in on it (the
  // supervisor's own phone rings), or move it to another agent or queue.
  taskControls(task: string): HTMLElement {
    const monitor = (mode: string) =>
      this.api
        .call("POST", `/tasks/${encodeURIComponent(task)}/monitor`, { mode })
        .then(() => {
          this.monitoring = mode === "stop" ? null : task;
          this.renderAgents();
        })
        .catch((e: Error) => alert(`${mode}: ${e.message}`));
    const to = h("input", { "data-pb": "move-to", placeholder: "queue:NAME or agent:ID", size: "16" }) as HTMLInputElement;
    const el = h(
      "div",
      { "data-task": task },
      h("code", {}, task),
      " ",
      button("Listen", "listen", () => void monitor("listen")),
      button("Whisper", "whisper", () => void monitor("whisper")),
      button("Barge", "barge", () => void monitor("barge")),
      this.monitoring === task ? button("Stop", "stop", () => void monitor("stop")) : null,
      " ",
      to,
      button("Move", "move", () => {
        this.api
          .call("POST", `/tasks/${encodeURIComponent(task)}/transfer`, { to: to.value.trim() })
          .then(() => this.refreshAgents())
          .catch((e: Error) => alert(`Move: ${e.message}`));
      }),
    );
    return el;
  }
}

// ----- reports -----

const REPORT_COLUMNS: Record<string, [string, string][]> = {
  queues: [
    ["queue", "Queue"],
    ["offered", "Offered"],
    ["answered", "Answered"],
    ["abandoned", "Abandoned"],
    ["timed_out", "Timed out"],
    ["service_level_percent", "Service level"],
    ["asa_ms", "Avg. speed of answer"],
    ["aht_ms", "Avg. handling time"],
    ["longest_wait_ms", "Longest wait"],
  ],
  agents: [
    ["agent", "Agent"],
    ["offered", "Offered"],
    ["accepted", "Accepted"],
    ["rejected", "Rejected"],
    ["no_answer", "No answer"],
    ["completed", "Completed"],
    ["aht_ms", "Avg. handling time"],
    ["handle_ms", "Handling time"],
  ],
};

class Reports {
  readonly el = h("section", { "data-pb": "reports" });
  private of = h("select", { "data-pb": "report-of" }) as HTMLSelectElement;
  private interval = h("select", { "data-pb": "report-interval" }) as HTMLSelectElement;
  private span = h("select", { "data-pb": "report-span" }) as HTMLSelectElement;
  private chart = h("div", { class: "chart", "data-pb": "report-chart" });
  private table = h("table", { "data-pb": "report-table" });

  constructor(private api: Api) {
    for (const v of ["queues", "agents"]) this.of.append(h("option", { value: v }, v));
    for (const [v, l] of [["15m", "15 minutes"], ["1h", "hour"], ["1d", "day"]]) this.interval.append(h("option", { value: v }, l));
    for (const [v, l] of [["today", "today"], ["7d", "last 7 days"], ["30d", "last 30 days"]]) this.span.append(h("option", { value: v }, l));
    this.interval.value = "1h";
    for (const s of [this.of, this.interval, this.span]) s.addEventListener("change", () => void this.load());
    this.el.append(
      h("h2", {}, "Reports"),
      h(
        "div",
        { class: "actions" },
        this.of,
        " per ",
        this.interval,
        " for ",
        this.span,
        button("Refresh", "report-refresh", () => void this.load()),
        button("Download CSV", "report-csv", () => void this.csv()),
      ),
      this.chart,
      this.table,
    );
  }

  query(): string {
    const now = Date.now();
    const day = 86_400_000;
    const from = this.span.value === "today" ? now - (now % day) : now - (this.span.value === "7d" ? 7 : 30) * day;
    return `from=${from}&to=${now + 1}&interval=${this.interval.value}`;
  }

  async load(): Promise<void> {
    try {
      const r = await this.api.call<{ rows: Record<string, unknown>[] }>("GET", `/reports/${this.of.value}?${this.query()}`);
      this.render(r.rows);
    } catch (e) {
      this.table.replaceChildren(h("tr", {}, h("td", { class: "error" }, (e as Error).message)));
    }
  }

  async csv(): Promise<void> {
    const r = await fetch(this.api.url(`/reports/${this.of.value}?${this.query()}&format=csv`), {
      headers: { Authorization: `Bearer ${this.api.s.token}` },
    });
    if (!r.ok) {
      alert(`CSV: ${r.status}`);
      return;
    }
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: `${this.of.value}-report.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    URL.revokeObjectURL(url);
  }

  render(rows: Record<string, unknown>[]): void {
    const cols = REPORT_COLUMNS[this.of.value];
    const name = cols[0][0];
    const fmt = (k: string, v: unknown): string => {
      if (v === null || v === undefined) return "—";
      if (k.endsWith("_ms") && k !== "start_ms") return duration(Number(v));
      if (k === "service_level_percent") return `${Math.round(Number(v))} %`;
      return String(v);
    };
    this.table.replaceChildren(
      h("thead", {}, h("tr", {}, h("th", {}, "From"), ...cols.map(([, l]) => h("th", {}, l)))),
    );
    const body = h("tbody", {});
    for (const r of rows) {
      const tr = h("tr", { "data-row": `${r[name]}@${r.start_ms}` }, h("td", {}, time(Number(r.start_ms))));
      for (const [k] of cols) tr.append(h("td", { "data-col": k }, fmt(k, r[k])));
      body.append(tr);
    }
    if (rows.length === 0) body.append(h("tr", {}, h("td", { class: "muted" }, "Nothing in this span.")));
    this.table.append(body);
    // A bar per interval: answered (or completed) against abandoned (or
    // rejected and unanswered), summed over the rows of the interval.
    const [good, bad] = this.of.value === "queues" ? [["answered"], ["abandoned", "timed_out"]] : [["completed"], ["rejected", "no_answer"]];
    const sums = new Map<number, [number, number]>();
    for (const r of rows) {
      const at = Number(r.start_ms);
      const cur = sums.get(at) ?? [0, 0];
      cur[0] += good.reduce((n, k) => n + Number(r[k] ?? 0), 0);
      cur[1] += bad.reduce((n, k) => n + Number(r[k] ?? 0), 0);
      sums.set(at, cur);
    }
    const max = Math.max(1, ...[...sums.values()].map(([a, b]) => a + b));
    this.chart.replaceChildren();
    for (const [at, [a, b]] of [...sums.entries()].sort((x, y) => x[0] - y[0])) {
      const bar = h("div", { class: "bar", title: `${time(at)}: ${a} / ${b}` });
      const ok = h("div", { class: "bar-good" });
      const ko = h("div", { class: "bar-bad" });
      ok.style.height = `${(a / max) * 100}%`;
      ko.style.height = `${(b / max) * 100}%`;
      bar.append(ko, ok);
      this.chart.append(bar);
    }
  }
}

// ----- the operator's page -----

interface Tenant {
  id: string;
  name: string;
}

interface LimitsView {
  capacity: Record<string, number | null>;
  in_use: Record<string, number>;
  refused: Record<string, number>;
}

interface UsageRow {
  tenant: string;
  calls: Record<string, { legs: number; seconds: number; minutes: number }>;
  messages: Record<string, number>;
  plugin_invocations: number;
}

const CAPACITY_FIELDS: [string, string][] = [
  ["calls", "Calls at once"],
  ["calls_per_second", "Calls/s"],
  ["chats", "Chats at once"],
  ["messages_per_second", "Messages/s"],
  ["agents", "Seats"],
  ["plugins", "Plugins"],
];

/** Every tenant with its limits, what it uses now and this month's usage;
 * the operator sets a tenant's capacity here. */
class Operator {
  readonly el = h("section", { "data-pb": "operator" });
  private table = h("table", { "data-pb": "tenants" });
  private form = h("form", { class: "actions", "data-pb": "limits-form" }) as HTMLFormElement;
  private which = h("select", { "data-pb": "limits-tenant" }) as HTMLSelectElement;
  private inputs = new Map<string, HTMLInputElement>();
  private status = h("span", { class: "muted", "data-pb": "limits-status" });
  private limits = new Map<string, LimitsView>();
  private loading = false;

  constructor(private api: Api) {
    this.form.append("Set ", this.which);
    for (const [k, label] of CAPACITY_FIELDS) {
      const i = h("input", { "data-pb": `limit-${k}`, placeholder: label, inputmode: "numeric", size: "8" }) as HTMLInputElement;
      this.inputs.set(k, i);
      this.form.append(i);
    }
    this.form.append(h("button", { type: "submit", "data-pb": "limits-save" }, "Save"), this.status);
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      void this.save();
    });
    this.which.addEventListener("change", () => this.fill());
    this.el.append(h("h2", {}, "Tenants"), this.table, this.form);
  }

  async refresh(): Promise<void> {
    // One refresh at a time (the timer does not pile them up).
    if (this.loading) return;
    this.loading = true;
    try {
      const { tenants } = await this.api.callAt<{ tenants: Tenant[] }>("GET", "/v1/tenants");
      const usage = await this.api.callAt<{ rows: UsageRow[] }>("GET", "/v1/usage?granularity=total");
      for (const t of tenants) {
        this.limits.set(t.id, await this.api.callAt<LimitsView>("GET", `/v1/tenants/${encodeURIComponent(t.id)}/limits`));
      }
      this.render(tenants, usage.rows);
    } catch (e) {
      this.table.replaceChildren(h("tr", {}, h("td", { class: "error" }, (e as Error).message)));
    } finally {
      this.loading = false;
    }
  }

  render(tenants: Tenant[], rows: UsageRow[]): void {
    const cell = (v: number | null | undefined) => (v === null || v === undefined ? "—" : String(v));
    this.table.replaceChildren(
      h(
        "thead",
        {},
        h("tr", {}, h("th", {}, "Tenant"), ...CAPACITY_FIELDS.map(([, l]) => h("th", {}, l)), h("th", {}, "Refused"), h("th", {}, "Minutes this month"), h("th", {}, "Messages this month"), h("th", {}, "Plugin runs this month")),
      ),
    );
    const body = h("tbody", {});
    for (const t of tenants) {
      const l = this.limits.get(t.id);
      const u = rows.find((r) => r.tenant === t.id);
      const used: Record<string, string> = { calls: "calls", chats: "chats", agents: "agents", plugins: "plugins" };
      const tr = h("tr", { "data-tenant": t.id }, h("td", {}, `${t.name} (${t.id})`));
      for (const [k] of CAPACITY_FIELDS) {
        const limit = cell(k === "calls" ? l?.capacity.calls_in_effect : l?.capacity[k]);
        tr.append(h("td", { "data-col": k }, used[k] ? `${l?.in_use[used[k]] ?? 0} / ${limit}` : limit));
      }
      const refused = Object.entries(l?.refused ?? {}).map(([k, n]) => `${k} ${n}`).join(", ");
      const minutes = Object.values(u?.calls ?? {}).reduce((n, c) => n + c.minutes, 0);
      const messages = Object.values(u?.messages ?? {}).reduce((n, c) => n + c, 0);
      tr.append(
        h("td", { "data-col": "refused" }, refused || "—"),
        h("td", { "data-col": "minutes" }, String(minutes)),
        h("td", { "data-col": "messages" }, String(messages)),
        h("td", { "data-col": "plugin_invocations" }, String(u?.plugin_invocations ?? 0)),
      );
      body.append(tr);
    }
    this.table.append(body);
    const chosen = this.which.value;
    this.which.replaceChildren(...tenants.map((t) => h("option", { value: t.id }, t.id)));
    if (chosen) this.which.value = chosen;
    if (!chosen) this.fill();
  }

  fill(): void {
    const l = this.limits.get(this.which.value);
    for (const [k, i] of this.inputs) {
      const v = l?.capacity[k];
      // Empty: none set (for calls, the node's default share applies).
      i.value = v === null || v === undefined ? "" : String(v);
    }
  }

  async save(): Promise<void> {
    const t = this.which.value;
    try {
      // The tenant's other limits (plugin execution) stay as they are: a
      // PUT replaces them all.
      const tenant = await this.api.callAt<{ limits: Record<string, number> }>("GET", `/v1/tenants/${encodeURIComponent(t)}`);
      const body: Record<string, number> = { ...tenant.limits };
      for (const [k, i] of this.inputs) {
        const v = i.value.trim();
        if (v === "") delete body[k];
        else if (/^[0-9]+$/.test(v)) body[k] = Number(v);
        else throw new Error(`${k}: a whole number, or empty for none`);
      }
      await this.api.callAt("PUT", `/v1/tenants/${encodeURIComponent(t)}/limits`, body);
      this.status.textContent = `saved ${t}`;
      await this.refresh();
    } catch (e) {
      this.status.textContent = `not saved: ${(e as Error).message}`;
    }
  }
}

function startOperator(root: HTMLElement, s: Session): void {
  const op = new Operator(new Api(s));
  const header = h(
    "header",
    {},
    h("h1", {}, "Plugboard · operator"),
    h("span", { "data-pb": "whoami" }, "operator"),
    button("Sign out", "signout", () => signOut(root)),
  );
  root.replaceChildren(header, op.el);
  void op.refresh();
  // Every tenant's month is read each time: not too often.
  setInterval(() => void op.refresh(), 30000);
}

// ----- boot -----

function boot(): void {
  const root = document.getElementById("app");
  if (!root) return;
  const saved = sessionStorage.getItem(KEY);
  if (!saved) {
    signIn(root);
    return;
  }
  const s = JSON.parse(saved) as Session;
  if (!s.tenant) {
    startOperator(root, s);
    return;
  }
  new Api(s)
    .call<Me>("GET", "/me")
    .then((me) => start(root, s, me))
    .catch((e: Error) => {
      sessionStorage.removeItem(KEY);
      signIn(root, `Signed out: ${e.message}`);
    });
}

boot();
