// The SMS benchmark's baseline: node-smpp's client sending `count`
// submit_sm to an SMSC with `window` in flight, as fast as the SMSC
// answers. Prints {"sent","ms","per_sec"}.
//
//   node client.js PORT COUNT WINDOW [system_id] [password]
'use strict';
const smpp = require('smpp');

const [port, count = '10000', window = '10', SYSID = 'test', PASS = 'secret'] = process.argv.slice(2);
const total = Number(count);
const session = smpp.connect({ url: `smpp://127.0.0.1:${port}` });
session.on('error', (e) => { console.error(e.message); process.exit(1); });
session.bind_transceiver({ system_id: SYSID, password: PASS }, (pdu) => {
  if (pdu.command_status !== 0) { console.error('bind refused'); process.exit(1); }
  let sent = 0;
  let done = 0;
  const t0 = process.hrtime.bigint();
  const next = () => {
    if (sent >= total) return;
    const n = sent++;
    session.submit_sm({
      source_addr: '37060000001', destination_addr: '37060000009', data_coding: 0,
      registered_delivery: 1, short_message: Buffer.from(`update ${n}`, 'ascii'),
    }, (resp) => {
      done++;
      if (done === total) {
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        console.log(JSON.stringify({ sent: done, ms, per_sec: done / (ms / 1000) }));
        session.close();
        process.exit(0);
      }
      next();
    });
  };
  for (let i = 0; i < Number(window); i++) next();
});
