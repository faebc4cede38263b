"""Interop scenario: two slixmpp accounts against a running impmesh.

alice and bob log in over STARTTLS (trusting the node's certificate), subscribe to
each other with explicit approval, see each other's presence, chat, get only the
latest presence while inactive (XEP-0352), get an offline message at the next login,
and remove each other from their rosters. Any failure or timeout exits non-zero.

Usage: scenario.py HOST PORT CA_FILE PASSWORD
"""

import asyncio
import sys

import slixmpp

STEP_TIMEOUT = 15


class Account(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file):
        super().__init__(jid, password)
        self.ca_certs = ca_file
        self.roster.auto_authorize = None  # None: the app decides; False would deny
        self.roster.auto_subscribe = False
        self.messages = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.online = asyncio.Event()
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("presence", self.on_presence)
        self.add_event_handler("failed_auth", lambda _: fail(f"{jid}: authentication failed"))

    async def on_start(self, _event):
        await self.get_roster()
        self.send_presence()
        self.online.set()

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            self.messages.put_nowait(msg)

    def on_presence(self, pres):
        self.presences.put_nowait(pres)

    async def expect_presence(self, what, pred):
        return await expect(self.presences, what, pred)


def fail(reason):
    print(f"FAIL: {reason}", flush=True)
    sys.exit(1)


async def expect(queue, what, pred):
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            fail(f"timed out waiting for {what}")
        try:
            item = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            fail(f"timed out waiting for {what}")
        if pred(item):
            print(f"ok: {what}", flush=True)
            return item
        print(f"  (skipped while waiting for {what}: {item})", flush=True)


async def login(jid, password, host, port, ca_file, setup=None):
    account = Account(jid, password, ca_file)
    if setup:
        setup(account)
    account.connect(host, port)
    try:
        await asyncio.wait_for(account.online.wait(), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        fail(f"{jid} did not come online")
    print(f"ok: {jid} online", flush=True)
    return account


async def main(host, port, ca_file, password):
    alice = await login("alice@localhost", password, host, port, ca_file)
    bob = await login("bob@localhost", password, host, port, ca_file,
                      setup=lambda a: a.register_plugin("xep_0352"))

    # Subscription handshake with explicit approval, both ways.
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await bob.expect_presence("bob sees alice's request",
                              lambda p: p["type"] == "subscribe" and p["from"].bare == "alice@localhost")
    bob.send_presence(pto="alice@localhost", ptype="subscribed")
    await alice.expect_presence("alice sees bob online",
                                lambda p: p["from"].bare == "bob@localhost" and p["type"] == "available")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await alice.expect_presence("alice sees bob's request",
                                lambda p: p["type"] == "subscribe" and p["from"].bare == "bob@localhost")
    alice.send_presence(pto="bob@localhost", ptype="subscribed")
    await bob.expect_presence("bob sees alice online",
                              lambda p: p["from"].bare == "alice@localhost" and p["type"] == "available")

    # Chat.
    alice.send_message(mto="bob@localhost", mbody="hello from slixmpp", mtype="chat")
    await expect(bob.messages, "bob gets the chat message",
                 lambda m: m["body"] == "hello from slixmpp")

    # Client state indication: while bob is inactive, alice's presence changes wait and
    # only the latest reaches him, just before her next message.
    if not bob.plugin["xep_0352"].enabled:
        fail("the server did not offer client state indication")
    bob.plugin["xep_0352"].send_inactive()
    # In-order processing: once this is answered, the session is inactive.
    await bob.make_iq_get(queryxmlns="jabber:iq:version", ito="localhost").send(timeout=STEP_TIMEOUT)
    while not bob.presences.empty():
        bob.presences.get_nowait()
    alice.send_presence(pshow="away")
    alice.send_presence(pshow="xa")
    alice.send_message(mto="bob@localhost", mbody="are you there?", mtype="chat")
    await expect(bob.messages, "inactive bob gets the chat message at once",
                 lambda m: m["body"] == "are you there?")
    seen = []
    while not bob.presences.empty():
        p = bob.presences.get_nowait()
        if p["from"].bare == "alice@localhost":
            seen.append(p["show"])
    if seen != ["xa"]:
        fail(f"inactive bob should see alice's latest presence only, saw {seen}")
    print("ok: inactive bob got alice's latest presence only", flush=True)
    bob.plugin["xep_0352"].send_active()
    alice.send_presence()
    await bob.expect_presence("active bob sees alice available again",
                              lambda p: p["from"].bare == "alice@localhost" and p["show"] == "")

    # Bob leaves: alice sees it, and a message waits for him offline.
    bob.disconnect()
    await alice.expect_presence("alice sees bob go offline",
                                lambda p: p["from"].bare == "bob@localhost" and p["type"] == "unavailable")
    alice.send_message(mto="bob@localhost", mbody="while you were away", mtype="chat")
    await asyncio.sleep(0.5)
    bob = await login("bob@localhost", password, host, port, ca_file)
    msg = await expect(bob.messages, "bob gets the offline message at login",
                       lambda m: m["body"] == "while you were away")
    if not msg.xml.find("{urn:xmpp:delay}delay") is not None:
        fail("the offline message has no delay stamp")

    # Roster removal cancels both subscriptions.
    await alice.del_roster_item("bob@localhost")
    await bob.expect_presence("bob sees alice unsubscribe",
                              lambda p: p["type"] == "unsubscribe" and p["from"].bare == "alice@localhost")
    await bob.expect_presence("bob's subscription to alice is cancelled",
                              lambda p: p["type"] == "unsubscribed" and p["from"].bare == "alice@localhost")
    iq = alice.make_iq_get(queryxmlns="jabber:iq:roster")
    result = await iq.send(timeout=STEP_TIMEOUT)
    items = [i.get("jid") for i in result.xml.iter("{jabber:iq:roster}item")]
    if "bob@localhost" in items:
        fail(f"bob is still in alice's roster on the server: {items}")
    print("ok: alice's roster on the server no longer has bob", flush=True)

    alice.disconnect()
    bob.disconnect()
    print("PASS: slixmpp interop scenario", flush=True)


if __name__ == "__main__":
    host, port, ca_file, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    asyncio.run(main(host, port, ca_file, password))
