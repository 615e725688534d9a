// An SMSC for the SMS tests and the benchmark: node-smpp's server
// (npm `smpp`, pinned in package-lock.json), scripted over stdin.
//
//   node smsc.js [system_id] [password] [port]
//
// Listens on 127.0.0.1 (port 0: a free one); writes one JSON event per line on
// stdout, reads one JSON command per line on stdin:
//   {"cmd":"mo","tag","from","to","text"|"hex","data_coding","esm_class"}
//       a deliver_sm to every bound session (hex: the raw short_message,
//       for UDHs); the answer is reported as {"ev":"deliver_sm_resp","tag","status"}
//   {"cmd":"dlr","id","stat","err"}  a delivery receipt for message `id`
//   {"cmd":"auto_dlr","on":true}      a DELIVRD receipt after each accepted submit
//   {"cmd":"throttle","n":N}          the next N submit_sm get ESME_RTHROTTLED
//   {"cmd":"drop"}                    destroys every session's socket at once
//   {"cmd":"quiet","on":true}         no submit_sm events (benchmark)
//   {"cmd":"count"}                   {"ev":"count","accepted","throttled"}
'use strict';
const smpp = require('smpp');
const readline = require('readline');

const [SYSID = 'test', PASS = 'secret', PORT = '0'] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
let nextId = 1;
let throttle = 0;
let autoDlr = false;
let quiet = false;
let accepted = 0;
let throttled = 0;
const bound = new Set();

// Keep the raw short_message bytes (node-smpp keeps only decoded text).
const origDecode = smpp.filters.message.decode;
smpp.filters.message.decode = function (value, skipUdh) {
  if (Buffer.isBuffer(value) && value === this.short_message) {
    Object.defineProperty(this, '_raw_sm', { value: Buffer.from(value), enumerable: false });
  }
  return origDecode.call(this, value, skipUdh);
};

function parseUdh(raw) {
  const udhl = raw[0];
  let concat = null;
  for (let i = 1; i + 1 < 1 + udhl; i += 2 + raw[i + 1]) {
    const d = raw.slice(i + 2, i + 2 + raw[i + 1]);
    if (raw[i] === 0x00) concat = { ref: d[0], total: d[1], seq: d[2] };
    if (raw[i] === 0x08) concat = { ref: d.readUInt16BE(0), total: d[2], seq: d[3] };
  }
  return { concat, body: raw.slice(udhl + 1) };
}

function decodeText(buf, dc) {
  if (dc === 0x08) return smpp.encodings.UCS2.decode(buf);
  if (dc === 0x00) return smpp.encodings.ASCII.decode(buf); // GSM 03.38, unpacked
  return buf.toString('latin1');
}

function encodeText(text, dc) {
  return dc === 0x08 ? smpp.encodings.UCS2.encode(text) : smpp.encodings.ASCII.encode(text);
}

const ts = (d) => d.toISOString().replace(/\D/g, '').slice(2, 12); // YYMMDDhhmm

function receipt(session, id, stat, err, tag) {
  const now = ts(new Date());
  const text = `id:${id} sub:001 dlvr:${stat === 'DELIVRD' ? '001' : '000'} submit date:${now} done date:${now} stat:${stat} err:${err || '000'} text:`;
  const state = { DELIVRD: 2, EXPIRED: 3, DELETED: 4, UNDELIV: 5, ACCEPTD: 6, UNKNOWN: 7, REJECTD: 8 }[stat] || 7;
  session.deliver_sm({
    source_addr: '', destination_addr: '', esm_class: 0x04, data_coding: 0,
    short_message: Buffer.from(text, 'ascii'), receipted_message_id: String(id), message_state: state,
  }, (resp) => { if (tag !== undefined) out({ ev: 'deliver_sm_resp', tag, status: resp.command_status }); });
}

const server = smpp.createServer((session) => {
  session.on('error', (e) => out({ ev: 'session_error', error: e.message }));
  session.on('close', () => { bound.delete(session); out({ ev: 'closed' }); });
  session.on('bind_transceiver', (pdu) => {
    const ok = pdu.system_id === SYSID && pdu.password === PASS;
    session.send(pdu.response(ok ? { system_id: 'SMSCSIM' } : { command_status: smpp.ESME_RBINDFAIL }));
    out({ ev: 'bind', ok, system_id: pdu.system_id, interface_version: pdu.interface_version });
    if (ok) bound.add(session); else session.close();
  });
  session.on('enquire_link', (pdu) => { session.send(pdu.response()); out({ ev: 'enquire_link' }); });
  session.on('unbind', (pdu) => { session.send(pdu.response()); bound.delete(session); out({ ev: 'unbind' }); session.close(); });
  session.on('unknown', (pdu) => session.send(pdu.response()));
  session.on('submit_sm', (pdu) => {
    if (!bound.has(session)) return session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
    if (throttle > 0) {
      throttle--;
      throttled++;
      if (!quiet) out({ ev: 'throttled', seq: pdu.sequence_number });
      return session.send(pdu.response({ command_status: smpp.ESME_RTHROTTLED }));
    }
    const id = String(nextId++);
    accepted++;
    session.send(pdu.response({ message_id: id }));
    if (autoDlr) receipt(session, id, 'DELIVRD');
    if (quiet) return;
    const raw = pdu._raw_sm || Buffer.alloc(0);
    const dc = pdu.data_coding;
    const udhi = (pdu.esm_class & 0x40) !== 0 && raw.length > 0;
    const { concat, body } = udhi ? parseUdh(raw) : { concat: null, body: raw };
    out({
      ev: 'submit_sm', message_id: id, source_addr: pdu.source_addr, source_addr_ton: pdu.source_addr_ton,
      destination_addr: pdu.destination_addr, esm_class: pdu.esm_class, data_coding: dc,
      registered_delivery: pdu.registered_delivery, concat, octets: body.length, text: decodeText(body, dc),
    });
  });
});
server.listen(Number(PORT), '127.0.0.1', () => out({ ev: 'listening', port: server.address().port }));

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  let c;
  try { c = JSON.parse(line); } catch (e) { return out({ ev: 'bad_command', line }); }
  switch (c.cmd) {
    case 'throttle': throttle = c.n || 1; return out({ ev: 'ok', cmd: c.cmd });
    case 'auto_dlr': autoDlr = !!c.on; return out({ ev: 'ok', cmd: c.cmd });
    case 'quiet': quiet = !!c.on; return out({ ev: 'ok', cmd: c.cmd });
    case 'count': return out({ ev: 'count', accepted, throttled });
    case 'drop': {
      const n = bound.size;
      for (const s of [...bound]) { bound.delete(s); s.socket.destroy(); }
      return out({ ev: 'ok', cmd: c.cmd, sessions: n });
    }
    case 'dlr':
      for (const s of bound) receipt(s, c.id, c.stat || 'DELIVRD', c.err, c.tag);
      return out({ ev: 'ok', cmd: c.cmd, sessions: bound.size });
    case 'mo': {
      const dc = c.data_coding || 0;
      const opts = {
        source_addr: c.from || '37060000009', destination_addr: c.to || '37060000001',
        esm_class: c.esm_class || 0, data_coding: dc,
        short_message: c.hex ? Buffer.from(c.hex, 'hex') : encodeText(c.text || '', dc),
      };
      for (const s of bound) {
        s.deliver_sm(opts, (resp) => out({ ev: 'deliver_sm_resp', tag: c.tag, status: resp.command_status }));
      }
      return out({ ev: 'ok', cmd: c.cmd, sessions: bound.size });
    }
    default: return out({ ev: 'bad_command', line });
  }
});
