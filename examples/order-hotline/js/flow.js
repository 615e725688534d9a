// The order-hotline scenario in JavaScript (see ../README.md).
//
// Business hours? Menu: 1 sales, 2 track an order (HTTP lookup, speak the
// status), else voicemail. Same behaviour as flow.json and the Rust and
// Python versions; the state between events is one word: "menu", "order",
// "voicemail" or "done".
//
// Build: sdk/js/build.sh --world flow examples/order-hotline/js/flow.js order_hotline_js.wasm
import { nowMs, utcOffsetMinutes } from 'plugboard:host/clock@0.1.0';
import { get as configGet } from 'plugboard:host/config@0.1.0';
import { fetch } from 'plugboard:host/http@0.1.0';

const VOICEMAIL = 'Please leave a message after the tone.';
const DAY_MS = 86_400_000;

// Floor division and modulo that round towards minus infinity.
const fdiv = (a, b) => Math.floor(a / b);
const fmod = (a, b) => a - b * Math.floor(a / b);

// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant).
function civilFromDays(days) {
  const z = days + 719_468;
  const era = fdiv(z, 146_097);
  const doe = z - era * 146_097;
  const yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36_524) - fdiv(doe, 146_096), 365);
  const doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100));
  const mp = fdiv(5 * doy + 2, 153);
  const d = doy - fdiv(153 * mp + 2, 5) + 1;
  const m = mp < 10 ? mp + 3 : mp - 9;
  return [yoe + era * 400 + (m <= 2 ? 1 : 0), m, d];
}

// Monday–Friday 09:00–18:00 local time, except 1 January and 25 December.
function openNow() {
  // now-ms is a u64 (a BigInt here); milliseconds fit a double exactly.
  const localMs = Number(nowMs()) + utcOffsetMinutes() * 60_000;
  const days = fdiv(localMs, DAY_MS);
  const minute = fdiv(fmod(localMs, DAY_MS), 60_000);
  const weekday = fmod(days + 3, 7); // 0 = Monday; 1970-01-01 was a Thursday
  const [, month, day] = civilFromDays(days);
  const holiday = (month === 1 && day === 1) || (month === 12 && day === 25);
  return weekday < 5 && minute >= 9 * 60 && minute < 18 * 60 && !holiday;
}

const say = (text) => ({ tag: 'say', val: { text } });

const gather = (prompt, maxDigits, terminator, timeoutMs) => ({
  tag: 'gather',
  val: {
    prompt: { text: prompt },
    maxDigits,
    terminator,
    timeoutMs,
    interDigitTimeoutMs: 3000,
    speech: false,
  },
});

const voicemail = (prompt) => ({
  actions: [say(prompt), { tag: 'record', val: { maxSecs: 60, beep: true } }],
  state: 'voicemail',
});

const done = (actions) => ({ actions, state: 'done' });

// The order's status from the order system, or undefined.
function lookup(order) {
  const base = configGet('mis_url');
  if (base === undefined) return undefined;
  let resp;
  try {
    resp = fetch({
      method: 'get',
      url: `${base}/orders/${order}`,
      headers: [],
      body: new Uint8Array(),
    });
  } catch {
    return undefined; // not granted, timeout, failed...
  }
  if (resp.status !== 200) return undefined;
  try {
    const status = JSON.parse(new TextDecoder().decode(resp.body)).status;
    return typeof status === 'string' ? status : undefined;
  } catch {
    return undefined;
  }
}

export const handler = {
  handle(interaction, state, event) {
    if (event.tag === 'started') {
      if (openNow()) {
        return {
          actions: [gather('Welcome. Press 1 for sales, 2 to track an order.', 1, undefined, 5000)],
          state: 'menu',
        };
      }
      return voicemail('We are closed. Please leave a message after the tone.');
    }
    const digits = event.tag === 'digits' ? event.val.digits : undefined;
    if (state === 'menu') {
      if (digits === '1') {
        return done([
          say('Connecting you to sales.'),
          { tag: 'enqueue', val: { queue: 'sales', priority: 0, skills: [] } },
        ]);
      }
      if (digits === '2') {
        return {
          actions: [gather('Please enter your order number, then press hash.', 10, '#', 8000)],
          state: 'order',
        };
      }
      if (digits !== undefined || event.tag === 'timeout') return voicemail(VOICEMAIL);
    }
    if (state === 'order') {
      if (digits) {
        const status = lookup(digits);
        const text =
          status !== undefined
            ? `Order ${digits} is ${status}.`
            : `Sorry, we could not find order ${digits}.`;
        return done([say(text), { tag: 'hangup' }]);
      }
      if (digits !== undefined || event.tag === 'timeout') return voicemail(VOICEMAIL);
    }
    if (state === 'voicemail' && event.tag === 'recorded') {
      return done([say('Thank you for your message. Goodbye.'), { tag: 'hangup' }]);
    }
    return { actions: [] };
  },
};
