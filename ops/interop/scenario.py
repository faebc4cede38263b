"""Interop scenario: two slixmpp accounts against a running impmesh.

alice and bob log in over STARTTLS (trusting the node's certificate), subscribe to
each other with explicit approval, see each other's presence, chat, publish and get
an avatar and an OMEMO device list over PEP (XEP-0163, XEP-0084), get only the latest
presence while inactive (XEP-0352), read their history from a second device
(XEP-0313), share a file over HTTP upload (XEP-0363), wake alice's phone through an
app server that bob's client plays (XEP-0357), get an offline message at the next login, and remove each other from their rosters. Any failure or timeout exits
non-zero. The upload's HTTPS (aiohttp, inside slixmpp) trusts what OpenSSL's default
paths name: run.sh and mesh.sh point SSL_CERT_FILE at the nodes' certificates.

Usage: scenario.py HOST PORT CA_FILE PASSWORD
"""

import asyncio
import base64
import hashlib
import io
import sys

import aiohttp

import slixmpp
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

STEP_TIMEOUT = 15
OMEMO_DEVICES = "eu.siacs.conversations.axolotl.devicelist"
AVATAR_METADATA = "urn:xmpp:avatar:metadata"


class Account(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file):
        super().__init__(jid, password)
        self.ca_certs = ca_file
        self.roster.auto_authorize = None  # None: the app decides; False would deny
        self.roster.auto_subscribe = False
        self.messages = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.events = asyncio.Queue()
        # PEP as stock clients do it: capabilities (XEP-0115) announce the +notify
        # interests; xep_0084 asks for avatar metadata, OMEMO for device lists.
        for plugin in ("xep_0030", "xep_0060", "xep_0115", "xep_0163", "xep_0084",
                       "xep_0059", "xep_0313", "xep_0363"):
            self.register_plugin(plugin)
        self.add_event_handler("pubsub_publish", self.events.put_nowait)
        self.online = asyncio.Event()
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("presence", self.on_presence)
        self.add_event_handler("failed_auth", lambda _: fail(f"{jid}: authentication failed"))

    async def on_start(self, _event):
        await self.get_roster()
        # As an OMEMO client does once bound (an interest added before binding is
        # lost), then its presence carries the new capabilities.
        self.plugin["xep_0163"].add_interest(OMEMO_DEVICES)
        await self.plugin["xep_0115"].update_caps(broadcast=False)
        self.send_presence()
        self.online.set()

    def on_message(self, msg):
        if msg["type"] in ("chat", "normal"):
            self.messages.put_nowait(msg)

    def on_presence(self, pres):
        self.presences.put_nowait(pres)

    async def expect_presence(self, what, pred):
        return await expect(self.presences, what, pred)


async def pep_step(alice, bob, where):
    """alice publishes an avatar and her OMEMO device list; bob gets the events his
    capabilities ask for, and reads the avatar's data from alice's PEP service."""
    data = b"\x89PNG impmesh interop avatar"
    avatar_id = hashlib.sha1(data).hexdigest()
    await alice.plugin["xep_0084"].publish_avatar(data, timeout=STEP_TIMEOUT)
    await alice.plugin["xep_0084"].publish_avatar_metadata(
        items=[{"id": avatar_id, "type": "image/png", "bytes": len(data)}], timeout=STEP_TIMEOUT)
    event = await expect(bob.events, f"bob gets alice's avatar metadata {where}",
                         lambda m: m["pubsub_event"]["items"]["node"] == AVATAR_METADATA)
    if avatar_id not in str(event):
        fail(f"the metadata event does not name the avatar: {event}")
    form = alice.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden",
                   value="http://jabber.org/protocol/pubsub#publish-options")
    form.add_field(var="pubsub#access_model", value="open")
    devices = ET.fromstring("<list xmlns='eu.siacs.conversations.axolotl'><device id='4223'/></list>")
    await alice.plugin["xep_0060"].publish(None, OMEMO_DEVICES, id="current", payload=devices,
                                           options=form, timeout=STEP_TIMEOUT)
    event = await expect(bob.events, f"bob gets alice's OMEMO device list {where}",
                         lambda m: m["pubsub_event"]["items"]["node"] == OMEMO_DEVICES)
    if "4223" not in str(event):
        fail(f"the device list event lacks the device: {event}")
    result = await bob.plugin["xep_0060"].get_items("alice@localhost", "urn:xmpp:avatar:data",
                                                   timeout=STEP_TIMEOUT)
    got = [base64.b64decode(d.text) for d in result.xml.iter("{urn:xmpp:avatar:data}data")]
    if got != [data]:
        fail(f"bob read {got} from alice's avatar node, not her avatar")
    print(f"ok: bob reads alice's avatar data {where}", flush=True)


async def upload_step(alice, bob, where):
    """alice finds the upload service in her server's disco, uploads a file (XEP-0363)
    and sends bob its URL; bob downloads it, whole and a range of it."""
    data = b"impmesh interop upload\n" * 200
    url = await alice.plugin["xep_0363"].upload_file(
        "notes.txt", size=len(data), content_type="text/plain",
        input_file=io.BytesIO(data), timeout=STEP_TIMEOUT)
    alice.send_message(mto="bob@localhost", mbody=url, mtype="chat")
    await expect(bob.messages, f"bob gets the file's URL {where}", lambda m: m["body"] == url)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            got = await response.read()
            if response.status != 200 or got != data:
                fail(f"GET {url}: {response.status}, {len(got)} bytes of {len(data)}")
            if response.headers.get("Content-Type") != "text/plain":
                fail(f"GET {url}: content type {response.headers.get('Content-Type')}")
        async with session.get(url, headers={"Range": "bytes=23-45"}) as response:
            got = await response.read()
            if response.status != 206 or got != data[23:46]:
                fail(f"GET {url} with a range: {response.status}, {got!r}")
    print(f"ok: bob downloads alice's upload {where}", flush=True)


async def push_step(alice, bob, login_alice, where):
    """bob's client plays an XEP-0357 app server at its full JID: alice's phone
    registers it and goes offline; a message stored for her reaches the app server as
    a summary with the body she allowed, which it acknowledges. Returns alice, back
    online with the message."""
    notifications = asyncio.Queue()

    def on_publish(iq):
        iq.reply().send()
        notifications.put_nowait(iq)
    bob.register_handler(Callback("push notifications", StanzaPath("iq@type=set/pubsub/publish"),
                                  on_publish))
    iq = alice.make_iq_set()
    iq.append(ET.fromstring(
        f"<enable xmlns='urn:xmpp:push:0' jid='{bob.boundjid.full}' node='alice-phone'>"
        "<x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        "<field var='secret'><value>interop-secret</value></field>"
        "<field var='include-body'><value>true</value></field>"
        "<field var='include-sender'><value>true</value></field></x></enable>"))
    await iq.send(timeout=STEP_TIMEOUT)
    alice.disconnect()
    await bob.expect_presence(f"bob sees alice's phone go offline {where}",
                              lambda p: p["from"].bare == "alice@localhost" and p["type"] == "unavailable")
    bob.send_message(mto="alice@localhost", mbody="wake up", mtype="chat")
    note = await expect(notifications, f"bob's app server is told of alice's message {where}",
                        lambda iq: iq["from"] == "alice@localhost")
    fields = {f.get("var"): "".join(f.itertext())
              for f in note.xml.iter("{jabber:x:data}field")}
    wanted = {"message-count": "1", "last-message-sender": "bob@localhost",
              "last-message-body": "wake up", "secret": "interop-secret"}
    for var, value in wanted.items():
        if fields.get(var) != value:
            fail(f"the notification's {var} is {fields.get(var)!r}, not {value!r}: {note}")
    publish = note.xml.find("{http://jabber.org/protocol/pubsub}pubsub/{http://jabber.org/protocol/pubsub}publish")
    if publish is None or publish.get("node") != "alice-phone":
        fail(f"the notification is not published to alice's node: {note}")
    alice = await login_alice()
    await expect(alice.messages, f"alice's phone gets the message at login {where}",
                 lambda m: m["body"] == "wake up")
    return alice


async def mam_step(alice, bob, login_bob, where):
    """alice writes to bob; a second device of bob reads their history from his
    archive (XEP-0313), two messages per page, and finds it in order."""
    sent = [f"history {i} {where}" for i in range(3)]
    for body in sent:
        alice.send_message(mto="bob@localhost", mbody=body, mtype="chat")
        await expect(bob.messages, f"bob gets '{body}'", lambda m, b=body: m["body"] == b)
    tablet = await login_bob()
    bodies = []
    async for msg in tablet.plugin["xep_0313"].iterate(with_jid=slixmpp.JID("alice@localhost"),
                                                        rsm={"max": 2}):
        bodies.append(msg["mam_result"]["forwarded"]["stanza"]["body"])
    if bodies[-3:] != sent:
        fail(f"bob's second device read {bodies} from the archive, not ending with {sent}")
    print(f"ok: a second device of bob reads the history from his archive {where}", flush=True)
    # Its departure is seen before the scenario goes on: a later "bob went offline"
    # must be about bob's first device, not this one.
    tablet_jid = tablet.boundjid.full
    tablet.disconnect()
    await alice.expect_presence(f"alice sees bob's second device leave {where}",
                                lambda p: p["from"].full == tablet_jid and p["type"] == "unavailable")


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

    await pep_step(alice, bob, "on one node")
    await upload_step(alice, bob, "on one node")
    await mam_step(alice, bob, lambda: login("bob@localhost", password, host, port, ca_file),
                   "on one node")
    alice = await push_step(alice, bob, lambda: login("alice@localhost", password, host, port, ca_file),
                            "on one node")

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
