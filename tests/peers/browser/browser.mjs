// A headless Chromium the tests drive line by line: each line on stdin is
// a JSON command, each answer one JSON line on stdout. Uses Debian's
// chromium through playwright-core (nothing downloads a browser).
// BROWSER_ARGS (a JSON array) adds Chromium flags, such as a fake
// microphone playing a WAV file.
//
//   {"op":"open","url":U}        a fresh browser context, one page at U
//   {"op":"reload"}              reload the page (storage survives)
//   {"op":"click","sel":S}       click (CSS; open shadow roots pierced)
//   {"op":"fill","sel":S,"text":T}
//   {"op":"press","sel":S,"key":K}
//   {"op":"select","sel":S,"value":V}   choose an option of a <select>
//   {"op":"screenshot","path":P}  the page as a PNG at P (directories made)
//   {"op":"file","sel":S,"name":N,"mime":M,"size":B}   a file of B bytes
//   {"op":"wait","js":E,"ms":T}  until the expression E is truthy; its value
//   {"op":"eval","js":E}         the expression E
//   {"op":"close"}
import { chromium } from "playwright-core";
import readline from "node:readline";
import { mkdir } from "node:fs/promises";
import { dirname } from "node:path";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", ...JSON.parse(process.env.BROWSER_ARGS || "[]")],
});
let context = null;
let page = null;
const log = [];

async function run(cmd) {
  switch (cmd.op) {
    case "open":
      if (context) await context.close();
      context = await browser.newContext();
      page = await context.newPage();
      page.on("console", (m) => log.push(`${m.type()}: ${m.text()}`));
      page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
      await page.goto(cmd.url);
      return null;
    case "reload":
      await page.reload();
      return null;
    case "click":
      await page.click(cmd.sel, { timeout: 10000 });
      return null;
    case "fill":
      await page.fill(cmd.sel, cmd.text, { timeout: 10000 });
      return null;
    case "press":
      await page.press(cmd.sel, cmd.key, { timeout: 10000 });
      return null;
    case "select":
      await page.selectOption(cmd.sel, cmd.value, { timeout: 10000 });
      return null;
    case "screenshot":
      await mkdir(dirname(cmd.path), { recursive: true });
      await page.screenshot({ path: cmd.path, fullPage: true });
      return null;
    case "file":
      await page.setInputFiles(cmd.sel, {
        name: cmd.name,
        mimeType: cmd.mime,
        buffer: Buffer.alloc(cmd.size, 120),
      });
      return null;
    case "wait": {
      // Polled with evaluate (over the DevTools protocol), not
      // waitForFunction, which evaluates in the page with eval and so is
      // refused by a page whose Content-Security-Policy forbids it.
      const until = Date.now() + (cmd.ms ?? 15000);
      for (;;) {
        const v = await page.evaluate(cmd.js);
        if (v) return v;
        if (Date.now() > until) throw new Error(`timed out waiting for ${cmd.js}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    case "eval":
      return await page.evaluate(cmd.js);
    case "log":
      return log.splice(0);
    case "close":
      await browser.close();
      process.exit(0);
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let answer;
  try {
    const value = await run(JSON.parse(line));
    answer = { ok: true, value: value ?? null };
  } catch (e) {
    answer = { ok: false, error: String(e && e.message ? e.message : e), log: log.splice(0) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();
