#!/usr/bin/env bash
# Installs what Plugboard needs to build on a fresh Debian machine with rustup:
# the Wasm targets (wasm32-wasip2 for components that use WASI,
# wasm32-unknown-unknown for lean Rust plugins) and the components for
# formatting and linting.
set -euo pipefail
rustup target add wasm32-wasip2 wasm32-unknown-unknown
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The JavaScript and Python plugin SDKs need Node.js (npm) and Python's venv.
need=()
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
# Voice: espeak-ng is the built-in TTS (run as a separate process; GPL,
# never linked); SIPp and baresip are the SIP peers of the voice tests.
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
# The PostgreSQL store's tests start a server of their own (no service).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# Nodes on one store share events and plugin deploys through NATS; its
# tests and notice_bench start a nats-server of their own (no service).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
# Email: swaks and Python's smtplib send test mail; Postfix's smtp-source
# sends in parallel (no Postfix service is started).
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v smtp-source >/dev/null 2>&1 || [ -x /usr/sbin/smtp-source ] || need+=(postfix)
# dnsmasq answers the SPF, DKIM and DMARC lookups of the email tests
# (the binary alone, no service).
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
# The softphone's Opus codec links Debian's libopus (found by pkg-config).
pkg-config --exists opus 2>/dev/null || need+=(libopus-dev pkg-config)
# Fax: spandsp's T.30 (LGPL, linked dynamically), Ghostscript (AGPL, run
# as a separate program) renders documents to fax pages, libtiff's
# tiff2pdf wraps received pages; the tests rasterise pages with poppler.
pkg-config --exists spandsp 2>/dev/null || need+=(libspandsp-dev pkg-config)
command -v tiff2pdf >/dev/null 2>&1 || need+=(libtiff-tools)
command -v gs >/dev/null 2>&1 || need+=(ghostscript)
command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)
# Web chat: the tests drive Debian's headless Chromium.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    echo "installing ${need[*]} (apt-get)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python test peers, in a venv of their own under target/, pinned:
# aiosmtpd (the smart host email replies go to) and dkimpy (checks the
# DKIM signatures of our replies).
PEERS=target/sdk-tools/peers-venv
if ! "$PEERS/bin/python" -c 'import aiosmtpd, dkim' >/dev/null 2>&1; then
    [ -x "$PEERS/bin/python" ] || python3 -m venv "$PEERS"
    "$PEERS/bin/pip" install --quiet --disable-pip-version-check aiosmtpd==1.4.6 dkimpy==1.1.8
fi

# The browser driver of the chat tests: playwright-core (pinned in
# tests/peers/browser/package-lock.json), pointed at Debian's chromium;
# it never downloads a browser.
BROWSER=target/sdk-tools/peers-node
if ! cmp -s tests/peers/browser/package-lock.json "$BROWSER/package-lock.json" \
    || [ ! -d "$BROWSER/node_modules/playwright-core" ]; then
    mkdir -p "$BROWSER"
    cp tests/peers/browser/package.json tests/peers/browser/package-lock.json "$BROWSER/"
    (cd "$BROWSER" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
cp tests/peers/browser/browser.mjs "$BROWSER/"

# The SMSC of the SMS tests: node-smpp's server (pinned in
# tests/peers/smsc/package-lock.json) scripted by tests/peers/smsc/smsc.js.
SMSC=target/sdk-tools/peers-smsc
if ! cmp -s tests/peers/smsc/package-lock.json "$SMSC/package-lock.json" \
    || [ ! -d "$SMSC/node_modules/smpp" ]; then
    mkdir -p "$SMSC"
    cp tests/peers/smsc/package.json tests/peers/smsc/package-lock.json "$SMSC/"
    (cd "$SMSC" && npm ci --no-audit --no-fund --silent)
fi
cp tests/peers/smsc/smsc.js tests/peers/smsc/client.js "$SMSC/"

# The web chat widget (TypeScript → target/web/widget.js).
scripts/build-web.sh >/dev/null
