// Plugboard's web chat widget. A site embeds it with one tag:
//
//   <script src="https://plugboard.example/chat/widget.js" data-address="web-shop" async></script>
//
// Optional, set before the tag: a user the site vouches for, signed with
// the widget's identity secret (hash = hex HMAC-SHA256(secret, id)), and a
// display name:
//
//   window.PlugboardChat = { user: { id: "42", hash: "…" }, name: "Ann" };
//
// It talks to /chat/{address}/ws (see the chat crate's protocol module).
// A message stays in this browser's storage until the server acknowledges
// it (stored durably), and is sent again, with the same client id, after
// a reconnect or a reload: retries are never duplicates.

interface ViewFile {
  name: string;
  type: string;
  size: number;
}

interface ViewMessage {
  id: string;
  conversation: string;
  client_id: string | null;
  from: "visitor" | "agent" | "bot" | "system";
  text: string;
  files: ViewFile[];
  status: string;
  at_ms: number;
}

interface OutFile {
  name: string;
  type: string;
  data: string;
}

interface Pending {
  client_id: string;
  text: string;
  files: OutFile[];
}

interface Options {
  user?: { id: string; hash: string };
  name?: string;
}

const STYLE = `
:host { all: initial; }
.pb-button { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000;
  border: 0; border-radius: 24px; padding: 12px 18px; background: #1f6feb; color: #fff;
  font: 600 14px system-ui, sans-serif; cursor: pointer; box-shadow: 0 2px 8px rgba(0,0,0,.25); }
.pb-panel { position: fixed; right: 20px; bottom: 76px; width: 340px; height: 460px;
  z-index: 2147483000; display: none; flex-direction: column; background: #fff;
  border-radius: 10px; box-shadow: 0 4px 16px rgba(0,0,0,.25); font: 14px system-ui, sans-serif;
  color: #222; overflow: hidden; }
.pb-panel.pb-open { display: flex; }
.pb-head { background: #1f6feb; color: #fff; padding: 10px 14px; font-weight: 600; }
.pb-state { font-weight: 400; font-size: 12px; opacity: .85; margin-left: 6px; }
.pb-list { flex: 1; overflow-y: auto; padding: 10px; display: flex; flex-direction: column; gap: 6px; }
.pb-msg { max-width: 80%; padding: 7px 10px; border-radius: 10px; white-space: pre-wrap;
  word-wrap: break-word; background: #eef1f5; align-self: flex-start; }
.pb-msg[data-from="visitor"] { background: #1f6feb; color: #fff; align-self: flex-end; }
.pb-msg[data-from="system"] { background: transparent; color: #777; font-size: 12px; align-self: center; }
.pb-meta { display: block; font-size: 11px; opacity: .75; margin-top: 2px; }
.pb-file { display: block; font-size: 12px; text-decoration: underline; }
.pb-typing { min-height: 16px; padding: 0 12px; font-size: 12px; color: #666; }
.pb-error { min-height: 0; padding: 0 12px; font-size: 12px; color: #b00020; }
.pb-form { display: flex; gap: 6px; padding: 8px; border-top: 1px solid #ddd; }
.pb-input { flex: 1; resize: none; height: 36px; font: inherit; padding: 6px; }
.pb-send, .pb-attach { border: 0; background: #1f6feb; color: #fff; border-radius: 6px; padding: 0 10px; cursor: pointer; }
.pb-attach { background: #eef1f5; color: #222; }
`;

/** The script tag that loaded the widget. */
function ownScript(): HTMLScriptElement | null {
  const current = document.currentScript as HTMLScriptElement | null;
  if (current && current.dataset.address) return current;
  return document.querySelector("script[data-address][src*='/chat/widget.js']");
}

function randomId(): string {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls: string,
  attrs: Record<string, string> = {},
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  e.className = cls;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function toBase64(buf: ArrayBuffer): string {
  const bytes = new Uint8Array(buf);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

class Widget {
  private readonly wsUrl: string;
  private readonly key: string;
  private readonly options: Options;
  private ws: WebSocket | null = null;
  private backoff = 1000;
  private ready = false;
  private maxFile = 5 * 1024 * 1024;
  private readonly rendered = new Map<string, HTMLElement>();
  private pending: Pending[] = [];
  private unread: string[] = [];
  private typingTimer: number | undefined;
  private lastTyping = 0;

  private readonly panel: HTMLElement;
  private readonly list: HTMLElement;
  private readonly state: HTMLElement;
  private readonly typing: HTMLElement;
  private readonly error: HTMLElement;
  private readonly input: HTMLTextAreaElement;
  private readonly file: HTMLInputElement;
  private readonly title: HTMLElement;

  constructor(base: URL, address: string, options: Options) {
    const scheme = base.protocol === "https:" ? "wss:" : "ws:";
    this.wsUrl = `${scheme}//${base.host}/chat/${encodeURIComponent(address)}/ws`;
    this.key = `plugboard-chat:${base.host}:${address}`;
    this.options = options;
    this.pending = this.load<Pending[]>("pending") ?? [];

    const host = el("div", "", { "data-pb": "root" });
    const root = host.attachShadow({ mode: "open" });
    const style = document.createElement("style");
    style.textContent = STYLE;
    const button = el("button", "pb-button", { "data-pb": "open", type: "button" });
    button.textContent = "Chat";
    this.panel = el("div", "pb-panel", { "data-pb": "panel", role: "dialog" });
    const head = el("div", "pb-head");
    this.title = el("span", "");
    this.title.textContent = "Chat with us";
    this.state = el("span", "pb-state", { "data-pb": "state" });
    head.append(this.title, this.state);
    this.list = el("div", "pb-list", { "data-pb": "list", "aria-live": "polite" });
    this.typing = el("div", "pb-typing", { "data-pb": "typing" });
    this.error = el("div", "pb-error", { "data-pb": "error", role: "alert" });
    const form = el("form", "pb-form");
    this.input = el("textarea", "pb-input", { "data-pb": "input", placeholder: "Write a message…" });
    this.file = el("input", "", { type: "file", "data-pb": "file", hidden: "" });
    const attach = el("button", "pb-attach", { type: "button", "data-pb": "attach", title: "Send a file" });
    attach.textContent = "+";
    const send = el("button", "pb-send", { type: "submit", "data-pb": "send" });
    send.textContent = "Send";
    form.append(this.input, this.file, attach, send);
    this.panel.append(head, this.list, this.typing, this.error, form);
    root.append(style, button, this.panel);
    document.body.appendChild(host);

    button.addEventListener("click", () => this.toggle());
    attach.addEventListener("click", () => this.file.click());
    this.file.addEventListener("change", () => void this.sendFiles());
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.sendText();
    });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.sendText();
      }
    });
    this.input.addEventListener("input", () => this.noteTyping());
    document.addEventListener("visibilitychange", () => this.markRead());
    if (this.load<boolean>("open")) this.toggle();
    this.connect();
  }

  private load<T>(name: string): T | null {
    try {
      const v = localStorage.getItem(`${this.key}:${name}`);
      return v === null ? null : (JSON.parse(v) as T);
    } catch {
      return null;
    }
  }

  private save(name: string, value: unknown): void {
    try {
      localStorage.setItem(`${this.key}:${name}`, JSON.stringify(value));
    } catch {
      // Private mode or full: the session still works, without memory.
    }
  }

  private toggle(): void {
    const open = this.panel.classList.toggle("pb-open");
    this.save("open", open);
    if (open) {
      this.input.focus();
      this.markRead();
    }
  }

  private isOpen(): boolean {
    return this.panel.classList.contains("pb-open") && document.visibilityState === "visible";
  }

  private connect(): void {
    this.ready = false;
    this.state.textContent = "connecting…";
    const ws = new WebSocket(this.wsUrl);
    this.ws = ws;
    ws.onopen = () => {
      const hello: Record<string, unknown> = { type: "hello", token: this.load<string>("token") };
      if (this.options.user) hello.user = this.options.user;
      if (this.options.name) hello.name = this.options.name;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (e) => this.onFrame(JSON.parse(String(e.data)));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ready = false;
      this.state.textContent = "offline, reconnecting…";
      window.setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 30000);
    };
  }

  private raw(frame: unknown): void {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private onFrame(f: any): void {
    switch (f.type) {
      case "welcome":
        if (f.token) this.save("token", f.token);
        if (f.title) this.title.textContent = f.title;
        if (f.max_file_bytes) this.maxFile = f.max_file_bytes;
        break;
      case "history":
        for (const m of f.messages as ViewMessage[]) this.render(m);
        this.ready = true;
        this.backoff = 1000;
        this.state.textContent = "";
        // What was not acknowledged before goes again, same ids.
        for (const p of this.pending) this.raw({ type: "message", ...p });
        this.receipts();
        break;
      case "ack":
        this.acked(f.client_id, f.id);
        break;
      case "message":
        this.render(f.message as ViewMessage);
        this.receipts();
        break;
      case "status": {
        const node = this.rendered.get(f.id);
        if (node) this.setStatus(node, f.status);
        break;
      }
      case "typing":
        this.typing.textContent = f.on ? "Agent is typing…" : "";
        window.clearTimeout(this.typingTimer);
        if (f.on) this.typingTimer = window.setTimeout(() => (this.typing.textContent = ""), 6000);
        break;
      case "closed":
        this.renderNotice("The conversation has ended. Write to start a new one.");
        break;
      case "error":
        this.onError(f);
        break;
    }
  }

  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private onError(f: any): void {
    const p = f.client_id ? this.pending.find((x) => x.client_id === f.client_id) : undefined;
    if (p && f.code === "rate_limited") {
      this.error.textContent = "Sending too fast: waiting a moment…";
      window.setTimeout(() => this.raw({ type: "message", ...p }), f.retry_after_ms ?? 1000);
      return;
    }
    if (p && f.code === "unavailable") {
      window.setTimeout(() => this.raw({ type: "message", ...p }), 2000);
      return;
    }
    this.error.textContent = f.message ?? f.code;
    if (p) {
      this.pending = this.pending.filter((x) => x !== p);
      this.save("pending", this.pending);
      const node = this.rendered.get(`local:${p.client_id}`);
      if (node) this.setStatus(node, "failed");
    }
  }

  private sendText(): void {
    const text = this.input.value.trim();
    if (!text) return;
    this.input.value = "";
    this.queue({ client_id: randomId(), text, files: [] });
    this.raw({ type: "typing", on: false });
  }

  private async sendFiles(): Promise<void> {
    const files = Array.from(this.file.files ?? []);
    this.file.value = "";
    const out: OutFile[] = [];
    for (const f of files) {
      if (f.size > this.maxFile) {
        this.error.textContent = `${f.name} is too large (at most ${Math.floor(this.maxFile / 1024)} KiB)`;
        return;
      }
      out.push({ name: f.name, type: f.type, data: toBase64(await f.arrayBuffer()) });
    }
    if (out.length) this.queue({ client_id: randomId(), text: "", files: out });
  }

  private queue(p: Pending): void {
    this.error.textContent = "";
    this.pending.push(p);
    this.save("pending", this.pending);
    this.render({
      id: `local:${p.client_id}`,
      conversation: "",
      client_id: p.client_id,
      from: "visitor",
      text: p.text,
      files: p.files.map((f) => ({ name: f.name, type: f.type, size: 0 })),
      status: "sending",
      at_ms: Date.now(),
    });
    if (this.ready) this.raw({ type: "message", ...p });
  }

  private acked(clientId: string, id: string): void {
    this.pending = this.pending.filter((x) => x.client_id !== clientId);
    this.save("pending", this.pending);
    const local = this.rendered.get(`local:${clientId}`);
    if (local) {
      this.rendered.delete(`local:${clientId}`);
      if (this.rendered.has(id)) {
        local.remove();
      } else {
        local.dataset.id = id;
        this.rendered.set(id, local);
        this.setStatus(local, "received");
      }
    }
  }

  private render(m: ViewMessage): void {
    // Our own message, echoed from another tab or the history, replaces
    // the local copy.
    const local = m.client_id ? this.rendered.get(`local:${m.client_id}`) : undefined;
    if (local && m.from === "visitor") {
      this.rendered.delete(`local:${m.client_id}`);
      local.remove();
      this.pending = this.pending.filter((x) => x.client_id !== m.client_id);
      this.save("pending", this.pending);
    }
    const existing = this.rendered.get(m.id);
    if (existing) {
      this.setStatus(existing, m.status);
      return;
    }
    const node = el("div", "pb-msg", { "data-pb": "msg", "data-from": m.from, "data-id": m.id });
    const text = el("span", "pb-text", { "data-pb": "text" });
    text.textContent = m.text;
    node.append(text);
    for (const f of m.files) {
      const file = el("span", "pb-file", { "data-pb": "file-name" });
      file.textContent = `📎 ${f.name}`;
      node.append(file);
    }
    const meta = el("span", "pb-meta", { "data-pb": "meta" });
    node.append(meta);
    // In id order (ids sort by creation; replies may arrive out of order),
    // local copies not yet acknowledged last.
    const after = m.id.startsWith("local:")
      ? undefined
      : Array.from(this.list.children).find((c) => {
          const id = (c as HTMLElement).dataset.id ?? "";
          return id.startsWith("local:") || id > m.id;
        });
    this.list.insertBefore(node, after ?? null);
    this.rendered.set(m.id, node);
    this.setStatus(node, m.status);
    this.list.scrollTop = this.list.scrollHeight;
    if (m.from !== "visitor" && !m.id.startsWith("local:") && m.status !== "read") {
      this.unread.push(m.id);
    }
  }

  private renderNotice(text: string): void {
    const node = el("div", "pb-msg", { "data-pb": "notice", "data-from": "system" });
    node.textContent = text;
    this.list.append(node);
  }

  private setStatus(node: HTMLElement, status: string): void {
    node.dataset.status = status;
    if (node.dataset.from !== "visitor") return;
    const meta = node.querySelector<HTMLElement>(".pb-meta");
    const label: Record<string, string> = {
      sending: "sending…",
      received: "✓ sent",
      read: "✓✓ read",
      failed: "not sent",
    };
    if (meta) meta.textContent = label[status] ?? "";
  }

  /** Receipts: delivered for what arrived, read once the panel is seen. */
  private receipts(): void {
    if (!this.ready || this.unread.length === 0) return;
    const ids = this.unread.splice(0);
    this.raw({ type: "seen", ids, status: "delivered" });
    if (this.isOpen()) {
      this.raw({ type: "seen", ids, status: "read" });
    } else {
      this.unseen.push(...ids);
    }
  }

  private readonly unseen: string[] = [];

  private markRead(): void {
    if (!this.ready || !this.isOpen() || this.unseen.length === 0) return;
    this.raw({ type: "seen", ids: this.unseen.splice(0), status: "read" });
  }

  private noteTyping(): void {
    const now = Date.now();
    if (now - this.lastTyping > 2000) {
      this.lastTyping = now;
      this.raw({ type: "typing", on: true });
    }
  }
}

(function start() {
  const script = ownScript();
  if (!script) return;
  const address = script.dataset.address ?? "";
  const base = new URL(script.src, location.href);
  const options = ((window as unknown as { PlugboardChat?: Options }).PlugboardChat ?? {}) as Options;
  const go = () => new Widget(base, address, options);
  if (document.body) go();
  else document.addEventListener("DOMContentLoaded", go);
})();
