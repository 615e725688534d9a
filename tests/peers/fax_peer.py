#!/usr/bin/env python3
"""An independent fax machine for Plugboard's tests: libspandsp (Debian's
0.0.6) through ctypes for T.30 (over audio, or over T.38 with its own
UDPTL framing), with its own small SIP user agent and RTP (G.711 mu-law,
20 ms frames) over UDP. None of it is Plugboard's code.

  fax_peer.py receive --port P --out rx.tif [--ident ID] [--t38 accept|offer]
      Waits for an INVITE on 127.0.0.1:P, answers, receives a fax.
  fax_peer.py send --server HOST:PORT --to NUMBER --file doc.tif
                   [--ident ID] [--cut-after-pages N] [--t38 accept|offer]
      Calls NUMBER at the server and sends doc.tif (TIFF/F); with
      --cut-after-pages it hangs up two seconds into the page after N.

  --t38 accept: a re-INVITE to image/t38 from the server is answered and
  the fax goes on over T.38; its 200 is sent twice (as after a lost ACK),
  and the ACKs that came for it are reported ("reinvite_acks"). --t38
  offer: half a second after the call is up, this peer re-INVITEs to T.38
  itself (as a gateway that heard the fax tones does), and takes no notice
  of the first 200 to it (as if it were lost): the server must send it
  again. Without --t38, a re-INVITE to T.38 is refused (488).

Prints one JSON line when done: {"code", "text", "pages", "remote",
"bit_rate", "ecm", "by"}. Exits 0 when the session ended with T.30 OK.
"""

import argparse
import ctypes as C
import json
import random
import re
import select
import socket
import struct
import sys
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # G.711 (still in Python 3.11, Debian 12's)

SP = C.CDLL("libspandsp.so.2")
SP.fax_init.restype = C.c_void_p
SP.fax_init.argtypes = [C.c_void_p, C.c_int]
SP.fax_get_t30_state.restype = C.c_void_p
SP.fax_get_t30_state.argtypes = [C.c_void_p]
SP.fax_rx.argtypes = [C.c_void_p, C.POINTER(C.c_int16), C.c_int]
SP.fax_tx.argtypes = [C.c_void_p, C.POINTER(C.c_int16), C.c_int]
SP.fax_set_transmit_on_idle.argtypes = [C.c_void_p, C.c_int]
SP.fax_free.argtypes = [C.c_void_p]
SP.t30_set_tx_file.argtypes = [C.c_void_p, C.c_char_p, C.c_int, C.c_int]
SP.t30_set_rx_file.argtypes = [C.c_void_p, C.c_char_p, C.c_int]
SP.t30_set_tx_ident.argtypes = [C.c_void_p, C.c_char_p]
SP.t30_get_rx_ident.restype = C.c_char_p
SP.t30_get_rx_ident.argtypes = [C.c_void_p]
SP.t30_set_ecm_capability.argtypes = [C.c_void_p, C.c_int]
SP.t30_terminate.argtypes = [C.c_void_p]
SP.t30_completion_code_to_str.restype = C.c_char_p


class Stats(C.Structure):
    _fields_ = [(n, C.c_int) for n in (
        "bit_rate ecm pages_tx pages_rx pages_in_file x_res y_res width "
        "length image_size encoding bad_rows longest_bad_row_run "
        "ecm_retries current_status").split()]


SP.t30_get_transfer_statistics.argtypes = [C.c_void_p, C.POINTER(Stats)]
PHASE_E = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int)
SP.t30_set_phase_e_handler.argtypes = [C.c_void_p, PHASE_E, C.c_void_p]
T38_TX = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.POINTER(C.c_uint8), C.c_int, C.c_int)
SP.t38_terminal_init.restype = C.c_void_p
SP.t38_terminal_init.argtypes = [C.c_void_p, C.c_int, T38_TX, C.c_void_p]
SP.t38_terminal_get_t30_state.restype = C.c_void_p
SP.t38_terminal_get_t30_state.argtypes = [C.c_void_p]
SP.t38_terminal_get_t38_core_state.restype = C.c_void_p
SP.t38_terminal_get_t38_core_state.argtypes = [C.c_void_p]
SP.t38_terminal_send_timeout.argtypes = [C.c_void_p, C.c_int]
SP.t38_terminal_free.argtypes = [C.c_void_p]
SP.t38_set_t38_version.argtypes = [C.c_void_p, C.c_int]
SP.t38_set_data_rate_management_method.argtypes = [C.c_void_p, C.c_int]
SP.t38_set_fastest_image_data_rate.argtypes = [C.c_void_p, C.c_int]
SP.t38_core_rx_ifp_packet.argtypes = [C.c_void_p, C.c_char_p, C.c_int, C.c_uint16]

FRAME = 160


class Terminal:
    """The T.30 side shared by both kinds of terminal."""

    def setup(self, ident, tx, rx):
        SP.t30_set_ecm_capability(self.t30, 1)
        SP.t30_set_tx_ident(self.t30, ident.encode())
        if tx:
            SP.t30_set_tx_file(self.t30, tx.encode(), -1, -1)
        if rx:
            SP.t30_set_rx_file(self.t30, rx.encode(), -1)
        self.code = None

        def done(_s, _u, code):
            self.code = code
        self.handler = PHASE_E(done)
        SP.t30_set_phase_e_handler(self.t30, self.handler, None)

    def stats(self):
        s = Stats()
        SP.t30_get_transfer_statistics(self.t30, C.byref(s))
        return s

    def finish(self):
        for _ in range(150):
            if self.code is not None:
                break
            self.idle()
        if self.code is None:
            SP.t30_terminate(self.t30)
        s = self.stats()
        remote = SP.t30_get_rx_ident(self.t30)
        code = self.code if self.code is not None else -1
        result = {
            "code": code,
            "text": SP.t30_completion_code_to_str(code).decode(),
            "pages": max(s.pages_tx, s.pages_rx),
            "remote": (remote or b"").decode().strip(),
            "bit_rate": s.bit_rate,
            "ecm": bool(s.ecm),
            "t38": isinstance(self, T38),
            "reinvite_acks": getattr(self, "reinvite_acks", 0),
        }
        self.free()
        return result


class Fax(Terminal):
    def __init__(self, calling, ident, tx=None, rx=None):
        self.state = SP.fax_init(None, 1 if calling else 0)
        self.t30 = SP.fax_get_t30_state(self.state)
        SP.fax_set_transmit_on_idle(self.state, 1)
        self.setup(ident, tx, rx)
        self.out = (C.c_int16 * FRAME)()

    def idle(self):
        self.frame([0] * FRAME)

    def free(self):
        SP.fax_free(self.state)

    def frame(self, heard):
        buf = (C.c_int16 * FRAME)(*heard)
        SP.fax_rx(self.state, buf, FRAME)
        for i in range(FRAME):
            self.out[i] = 0
        SP.fax_tx(self.state, self.out, FRAME)
        return list(self.out)

class T38(Terminal):
    """spandsp's T.38 terminal: IFP packets out through a callback, in
    with their sequence numbers; time passes 20 ms per tick."""

    def __init__(self, calling, ident, tx=None, rx=None):
        self.queue = []

        def send(_core, _user, buf, length, count):
            self.queue.append((C.string_at(buf, length), max(1, min(count, 3))))
            return 0
        self.sender = T38_TX(send)
        self.state = SP.t38_terminal_init(None, 1 if calling else 0, self.sender, None)
        self.t30 = SP.t38_terminal_get_t30_state(self.state)
        self.core = SP.t38_terminal_get_t38_core_state(self.state)
        SP.t38_set_t38_version(self.core, 0)
        SP.t38_set_data_rate_management_method(self.core, 2)
        SP.t38_set_fastest_image_data_rate(self.core, 14400)
        self.setup(ident, tx, rx)

    def tick(self):
        SP.t38_terminal_send_timeout(self.state, FRAME)
        out, self.queue = self.queue, []
        return out

    def rx(self, ifp, seq):
        SP.t38_core_rx_ifp_packet(self.core, ifp, len(ifp), seq)

    def idle(self):
        self.tick()

    def free(self):
        SP.t38_terminal_free(self.state)


def per_length(n):
    """An ASN.1 PER length determinant (T.38's UDPTL needs < 16384)."""
    return bytes([n]) if n < 0x80 else bytes([0x80 | (n >> 8), n & 0xFF])


def read_length(buf, pos):
    b = buf[pos]
    if b & 0x80 == 0:
        return b, pos + 1
    if b & 0x40 == 0:
        return ((b & 0x3F) << 8) | buf[pos + 1], pos + 2
    raise ValueError("fragmented UDPTL")


class Udptl:
    """UDPTL (T.38 section 9.1) with redundancy: each datagram carries its
    IFP and the two sent before it; a gap is filled from the next one's."""

    def __init__(self):
        self.seq = 0
        self.recent = []
        self.expected = None

    def send(self, ifp):
        out = struct.pack("!H", self.seq) + per_length(len(ifp)) + ifp
        out += b"\x00" + per_length(len(self.recent))
        for old in self.recent:
            out += per_length(len(old)) + old
        self.seq = (self.seq + 1) & 0xFFFF
        self.recent = ([ifp] + self.recent)[:2]
        return out

    def receive(self, data):
        seq = struct.unpack("!H", data[:2])[0]
        n, pos = read_length(data, 2)
        primary = data[pos:pos + n]
        pos += n
        secondary = []
        if data[pos] & 0x80 == 0:
            count, pos = read_length(data, pos + 1)
            for _ in range(count):
                n, pos = read_length(data, pos)
                secondary.append(data[pos:pos + n])
                pos += n
        if self.expected is not None and (seq - self.expected) & 0xFFFF >= 0x8000:
            return []
        out = []
        if self.expected is not None:
            # Newest first in the datagram: the oldest missing goes first.
            for i in range(len(secondary), 0, -1):
                s = (seq - i) & 0xFFFF
                if (s - self.expected) & 0xFFFF < 0x8000:
                    out.append((s, secondary[i - 1]))
        out.append((seq, primary))
        self.expected = (seq + 1) & 0xFFFF
        return out


def token():
    return "%016x" % random.getrandbits(64)


def parse(data):
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return lines[0], headers, body


def h(headers, name):
    return headers.get(name, [""])[0]


def sdp_remote(body):
    ip = re.search(r"c=IN IP4 (\S+)", body).group(1)
    port = int(re.search(r"m=(?:audio|image) (\d+)", body).group(1))
    return (ip, port)


def sdp(port):
    return ("v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=fax\r\nc=IN IP4 127.0.0.1\r\n"
            "t=0 0\r\nm=audio %d RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n" % port)


def sdp_t38(port):
    return ("v=0\r\no=peer 1 2 IN IP4 127.0.0.1\r\ns=fax\r\nc=IN IP4 127.0.0.1\r\n"
            "t=0 0\r\nm=image %d udptl t38\r\na=T38FaxVersion:0\r\na=T38MaxBitRate:14400\r\n"
            "a=T38FaxRateManagement:transferredTCF\r\na=T38FaxMaxDatagram:400\r\n"
            "a=T38FaxUdpEC:t38UDPRedundancy\r\n" % port)


def msg(first, headers, body=""):
    out = first + "\r\n"
    for k, v in headers:
        out += "%s: %s\r\n" % (k, v)
    out += "Content-Length: %d\r\n\r\n%s" % (len(body.encode()), body)
    return out.encode()


class Call:
    """One dialog's state, enough to send BYE and re-INVITE and answer
    requests."""

    def __init__(self, sip, peer):
        self.sip = sip
        self.peer = peer
        self.cseq = 1

    def request(self, method, headers=(), body=""):
        self.cseq += 1
        self.sip.sendto(msg("%s %s SIP/2.0" % (method, self.remote_target), [
            ("Via", "SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s" % (self.sip.getsockname()[1], token())),
            ("Max-Forwards", "70"),
            ("From", self.local),
            ("To", self.remote),
            ("Call-ID", self.call_id),
            ("CSeq", "%d %s" % (self.cseq, method)),
        ] + list(headers), body), self.peer)

    def bye(self):
        self.request("BYE")

    def ack(self):
        # The ACK of a 2xx carries its INVITE's CSeq number.
        self.cseq -= 1
        self.request("ACK")

    def answer(self, headers, status="200 OK", extra=(), body=""):
        """Sends the response; its bytes."""
        data = msg("SIP/2.0 " + status, [
            ("Via", v) for v in headers.get("via", [])] + [
            ("From", h(headers, "from")),
            ("To", h(headers, "to")),
            ("Call-ID", h(headers, "call-id")),
            ("CSeq", h(headers, "cseq")),
        ] + list(extra), body)
        self.sip.sendto(data, self.peer)
        return data


def run_media(call, make, rtp, remote_rtp, cut_after=None, t38=None):
    """Runs the fax on the 20 ms clock until T.30 ends or the far end
    hangs up; the terminal and who ended it. `make(t38)` makes the
    terminal; with `t38` "accept" or "offer" the call may go over to T.38
    by re-INVITE, and `make(True)` then starts T.30 again over it."""
    fax = make(False)
    udptl = None
    t0 = time.monotonic()
    n = 0
    queue = []
    seq = random.getrandbits(16)
    ts = random.getrandbits(32)
    ssrc = random.getrandbits(32)
    cut_at = None
    by = None
    offered = False
    # Our 200 to a re-INVITE, sent again once; the ACKs for it; whether
    # the first 200 to our own re-INVITE was "lost".
    again, acks, lost, reinvite_cseq = None, 0, False, None
    # Playout starts once 4 frames are queued, and again after an underrun.
    playing = False
    while by is None:
        now = time.monotonic()
        due = int((now - t0) / 0.02) + 1
        ran = 0
        while n < due and ran < 50:
            if udptl is not None:
                for ifp, count in fax.tick():
                    datagram = udptl.send(ifp)
                    for _ in range(count):
                        rtp.sendto(datagram, remote_rtp)
            else:
                heard = [0] * FRAME
                playing = bool(queue) and (playing or len(queue) >= 4)
                if playing:
                    pcm = audioop.ulaw2lin(queue.pop(0), 2)
                    heard = list(struct.unpack("<%dh" % (len(pcm) // 2), pcm))[:FRAME]
                    heard += [0] * (FRAME - len(heard))
                out = fax.frame(heard)
                payload = audioop.lin2ulaw(struct.pack("<%dh" % FRAME, *out), 2)
                header = struct.pack("!BBHII", 0x80, 0, (seq + n) & 0xFFFF, (ts + n * FRAME) & 0xFFFFFFFF, ssrc)
                rtp.sendto(header + payload, remote_rtp)
            n += 1
            ran += 1
        n = max(n, due)
        if fax.code is not None:
            call.bye()
            by = "us"
            break
        if again is not None and now >= again[0]:
            call.sip.sendto(again[1], call.peer)
            again = None
        if t38 == "offer" and not offered and now - t0 > 0.5:
            offered = True
            call.request("INVITE", [
                ("Contact", "<sip:fax@127.0.0.1:%d>" % call.sip.getsockname()[1]),
                ("Content-Type", "application/sdp"),
            ], sdp_t38(rtp.getsockname()[1]))
        if cut_after is not None and cut_at is None and fax.stats().pages_tx >= cut_after:
            cut_at = now + 2.0
        if cut_at is not None and now >= cut_at:
            call.bye()
            by = "cut"
            break
        if now - t0 > 600:
            call.bye()
            by = "timeout"
            break
        wait = max(0.0, t0 + n * 0.02 - time.monotonic())
        ready, _, _ = select.select([rtp, call.sip], [], [], wait)
        for sock in ready:
            data, src = sock.recvfrom(4096)
            if sock is rtp:
                if udptl is not None:
                    try:
                        for s, ifp in udptl.receive(data):
                            fax.rx(ifp, s)
                    except (ValueError, IndexError, struct.error):
                        pass
                elif len(data) > 12 and data[1] & 0x7F == 0:
                    cc = data[0] & 0x0F
                    queue.append(data[12 + 4 * cc:])
                continue
            first, headers, body = parse(data)
            if first.startswith("BYE"):
                call.answer(headers)
                by = "far end"
            elif first.startswith("INVITE") and ";tag=" in h(headers, "to"):
                if "m=image" in body and t38 == "accept" and udptl is None:
                    ok = call.answer(headers, extra=[
                        ("Contact", "<sip:fax@127.0.0.1:%d>" % call.sip.getsockname()[1]),
                        ("Content-Type", "application/sdp"),
                    ], body=sdp_t38(rtp.getsockname()[1]))
                    again = (time.monotonic() + 0.3, ok)
                    reinvite_cseq = h(headers, "cseq").split()[0]
                    fax.free()
                    fax, udptl, remote_rtp = make(True), Udptl(), sdp_remote(body)
                elif udptl is None:
                    call.answer(headers, "488 Not Acceptable Here")
            elif first.startswith("ACK") and t38 == "accept" and udptl is not None:
                if h(headers, "cseq").split()[0] == reinvite_cseq:
                    acks += 1
            elif first.startswith("SIP/2.0") and h(headers, "cseq").endswith("INVITE") and offered:
                status = int(first.split()[1])
                if 200 <= status < 300 and udptl is None and not lost:
                    lost = True
                    continue
                if status >= 200 and int(h(headers, "cseq").split()[0]) == call.cseq:
                    call.ack()
                    if status < 300 and udptl is None and "m=image" in body:
                        fax.free()
                        fax, udptl, remote_rtp = make(True), Udptl(), sdp_remote(body)
            # Anything else (a retransmitted INVITE, an ACK) needs nothing.
    fax.reinvite_acks = acks
    return fax, by


def receive(args):
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind(("127.0.0.1", args.port))
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    print(json.dumps({"ready": True}), flush=True)
    sip.settimeout(120)
    while True:
        data, peer = sip.recvfrom(65535)
        first, headers, body = parse(data)
        if first.startswith("INVITE"):
            break
    call = Call(sip, peer)
    tag = token()[:8]
    call.call_id = h(headers, "call-id")
    call.local = h(headers, "to") + ";tag=" + tag
    call.remote = h(headers, "from")
    contact = re.search(r"<([^>]+)>", h(headers, "contact"))
    call.remote_target = contact.group(1) if contact else first.split()[1]
    remote_rtp = sdp_remote(body)
    ok = msg("SIP/2.0 200 OK", [("Via", v) for v in headers.get("via", [])] + [
        ("From", h(headers, "from")),
        ("To", call.local),
        ("Call-ID", call.call_id),
        ("CSeq", h(headers, "cseq")),
        ("Contact", "<sip:fax@127.0.0.1:%d>" % args.port),
        ("Content-Type", "application/sdp"),
    ], sdp(rtp.getsockname()[1]))
    sip.sendto(ok, peer)
    sip.settimeout(0.5)
    for _ in range(16):
        try:
            data, _ = sip.recvfrom(65535)
        except socket.timeout:
            sip.sendto(ok, peer)
            continue
        if data.startswith(b"ACK"):
            break
    sip.setblocking(False)

    def make(t38):
        return (T38 if t38 else Fax)(False, args.ident, rx=args.out)
    fax, by = run_media(call, make, rtp, remote_rtp, t38=args.t38)
    result = fax.finish()
    result["by"] = by
    print(json.dumps(result), flush=True)
    return result["code"] == 0


def send(args):
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind(("127.0.0.1", 0))
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    me = sip.getsockname()[1]
    call = Call(sip, server)
    call.call_id = token() + "@fax-peer"
    call.local = "<sip:%s@127.0.0.1>;tag=%s" % (args.ident.lstrip("+").replace(" ", ""), token()[:8])
    uri = "sip:%s@%s" % (args.to, args.server)
    branch = token()
    invite = msg("INVITE %s SIP/2.0" % uri, [
        ("Via", "SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s" % (me, branch)),
        ("Max-Forwards", "70"),
        ("From", call.local),
        ("To", "<%s>" % uri),
        ("Call-ID", call.call_id),
        ("CSeq", "1 INVITE"),
        ("Contact", "<sip:fax@127.0.0.1:%d>" % me),
        ("Content-Type", "application/sdp"),
    ], sdp(rtp.getsockname()[1]))
    sip.sendto(invite, server)
    sip.settimeout(0.5)
    deadline = time.monotonic() + 30
    while True:
        if time.monotonic() > deadline:
            print(json.dumps({"code": -1, "text": "no answer", "pages": 0}), flush=True)
            return False
        try:
            data, _ = sip.recvfrom(65535)
        except socket.timeout:
            continue
        first, headers, body = parse(data)
        status = int(first.split()[1]) if first.startswith("SIP/2.0") else 0
        if 100 <= status < 200:
            continue
        if status >= 300:
            print(json.dumps({"code": -1, "text": first, "pages": 0}), flush=True)
            return False
        if status == 200:
            break
    call.remote = h(headers, "to")
    contact = re.search(r"<([^>]+)>", h(headers, "contact"))
    call.remote_target = contact.group(1) if contact else uri
    remote_rtp = sdp_remote(body)
    call.ack()
    sip.setblocking(False)

    def make(t38):
        return (T38 if t38 else Fax)(True, args.ident, tx=args.file)
    fax, by = run_media(call, make, rtp, remote_rtp, args.cut_after_pages, t38=args.t38)
    result = fax.finish()
    result["by"] = by
    print(json.dumps(result), flush=True)
    return result["code"] == 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receive")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--ident", default="+1 555 0999")
    r.add_argument("--t38", choices=["accept", "offer"])
    s = sub.add_parser("send")
    s.add_argument("--server", required=True)
    s.add_argument("--to", required=True)
    s.add_argument("--file", required=True)
    s.add_argument("--ident", default="+1 555 0999")
    s.add_argument("--cut-after-pages", type=int)
    s.add_argument("--t38", choices=["accept", "offer"])
    args = p.parse_args()
    ok = receive(args) if args.cmd == "receive" else send(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
