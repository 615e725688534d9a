"""The order-hotline scenario in Python (see ../README.md).

Business hours? Menu: 1 sales, 2 track an order (HTTP lookup, speak the
status), else voicemail. Same behaviour as flow.json and the Rust and
JavaScript versions; the state between events is one word: "menu",
"order", "voicemail" or "done".

Build: sdk/python/build.sh --world flow examples/order-hotline/python order_hotline_py.wasm
"""

import json

from wit_world import exports
from wit_world.imports import clock, config, http
from wit_world.imports.plugboard_flow_types import (
    Action_Enqueue,
    Action_Gather,
    Action_Hangup,
    Action_Record,
    Action_Say,
    Enqueue,
    Event_Digits,
    Event_Recorded,
    Event_Started,
    Event_Timeout,
    Gather,
    RecordOptions,
    Response,
    Say,
)

VOICEMAIL = "Please leave a message after the tone."
DAY_MS = 86_400_000


def civil_from_days(z):
    """(year, month, day) of a day count since 1970-01-01 (Howard Hinnant)."""
    z += 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if m <= 2 else 0), m, d


def open_now():
    """Monday-Friday 09:00-18:00 local time, except 1 January and 25 December."""
    local_ms = clock.now_ms() + clock.utc_offset_minutes() * 60_000
    days = local_ms // DAY_MS
    minute = (local_ms % DAY_MS) // 60_000
    weekday = (days + 3) % 7  # 0 = Monday; 1970-01-01 was a Thursday
    _, month, day = civil_from_days(days)
    holiday = (month, day) in ((1, 1), (12, 25))
    return weekday < 5 and 9 * 60 <= minute < 18 * 60 and not holiday


def say(text):
    return Action_Say(Say(text=text, voice=None, language=None))


def gather(prompt, max_digits, terminator, timeout_ms):
    return Action_Gather(
        Gather(
            prompt=Say(text=prompt, voice=None, language=None),
            max_digits=max_digits,
            terminator=terminator,
            timeout_ms=timeout_ms,
            inter_digit_timeout_ms=3000,
            speech=False,
        )
    )


def voicemail(prompt):
    record = Action_Record(RecordOptions(max_secs=60, beep=True, terminator=None))
    return Response(actions=[say(prompt), record], state="voicemail")


def lookup(order):
    """The order's status from the order system, or None."""
    base = config.get("mis_url")
    if base is None:
        return None
    try:
        resp = http.fetch(
            http.Request(
                method=http.Method.GET,
                url=f"{base}/orders/{order}",
                headers=[],
                body=b"",
                timeout_ms=None,
            )
        )
    except Exception:  # componentize_py_types.Err: not granted, timeout, failed...
        return None
    if resp.status != 200:
        return None
    try:
        status = json.loads(resp.body).get("status")
    except (ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def done(actions):
    return Response(actions=actions, state="done")


class Handler(exports.Handler):
    def handle(self, interaction, state, event):
        if isinstance(event, Event_Started):
            if open_now():
                return Response(
                    actions=[gather("Welcome. Press 1 for sales, 2 to track an order.", 1, None, 5000)],
                    state="menu",
                )
            return voicemail("We are closed. Please leave a message after the tone.")
        if state == "menu":
            if isinstance(event, Event_Digits) and event.value.digits == "1":
                return done([say("Connecting you to sales."), Action_Enqueue(Enqueue(queue="sales", priority=0, skills=[]))])
            if isinstance(event, Event_Digits) and event.value.digits == "2":
                return Response(
                    actions=[gather("Please enter your order number, then press hash.", 10, "#", 8000)],
                    state="order",
                )
            if isinstance(event, (Event_Digits, Event_Timeout)):
                return voicemail(VOICEMAIL)
        if state == "order":
            if isinstance(event, Event_Digits) and event.value.digits:
                order = event.value.digits
                status = lookup(order)
                if status is not None:
                    text = f"Order {order} is {status}."
                else:
                    text = f"Sorry, we could not find order {order}."
                return done([say(text), Action_Hangup()])
            if isinstance(event, (Event_Digits, Event_Timeout)):
                return voicemail(VOICEMAIL)
        if state == "voicemail" and isinstance(event, Event_Recorded):
            return done([say("Thank you for your message. Goodbye."), Action_Hangup()])
        return Response(actions=[], state=None)
