"""A receiving SMTP server for the email tests (the "smart host" replies
go out through), on aiosmtpd: every message it accepts is written to
OUTDIR as NNNN.eml, with its envelope in NNNN.json.

    smtp_sink.py PORT OUTDIR [--defer N]

--defer N answers the first N messages with 451 (try again later), to
exercise the sender's retries.
"""

import asyncio
import json
import os
import sys

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, outdir, defer):
        self.outdir = outdir
        self.defer = defer
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        if self.defer > 0:
            self.defer -= 1
            return "451 4.3.0 try again later"
        self.n += 1
        base = os.path.join(self.outdir, "%04d" % self.n)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(base + ".json", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos}, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 accepted"


def main():
    port = int(sys.argv[1])
    outdir = sys.argv[2]
    defer = 0
    if "--defer" in sys.argv:
        defer = int(sys.argv[sys.argv.index("--defer") + 1])
    os.makedirs(outdir, exist_ok=True)
    controller = Controller(Sink(outdir, defer), hostname="127.0.0.1", port=port)
    controller.start()
    print("listening", port, flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
