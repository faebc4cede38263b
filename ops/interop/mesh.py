"""Interop across the mesh: slixmpp accounts homed on two different clusters (two real
impmesh processes peered with `impmesh peer add`).

alice (homed on A, logs in at A) and bob (homed on B) subscribe to each other with
explicit approval, see each other's presence, chat both ways, and bob gets alice's
avatar and OMEMO device list over PEP from her home cluster, and a second device of
bob reads their history from his archive on B; bob then connects to A,
is sent to B with see-other-host, follows it and comes online there; his logout
reaches alice on the other cluster. Then group chat across the mesh (slixmpp's
XEP-0045, XEP-0313, XEP-0359 and XEP-0425 plugins): alice makes a persistent room on
A, bob on B enters it, they talk and whisper, alice moderates bob's message, bob reads
the room's archive from B, and leaves. Any failure or timeout exits non-zero.

Usage: mesh.py HOST PORT_A PORT_B CA_BUNDLE PASSWORD
"""

import asyncio
import logging
import sys

import slixmpp
from slixmpp.exceptions import IqError

from scenario import expect, fail, login, mam_step, pep_step, push_step, upload_step

ROOM = slixmpp.JID("lobby@conference.localhost")
MUC_PLUGINS = ("xep_0045", "xep_0359", "xep_0421", "xep_0424", "xep_0425")


def with_muc(account):
    """The group chat plugins, and queues of what a room sends."""
    for plugin in MUC_PLUGINS:
        account.register_plugin(plugin)
    account.groupchat = asyncio.Queue()
    account.room_presences = asyncio.Queue()
    account.moderated = asyncio.Queue()
    account.add_event_handler("groupchat_message", account.groupchat.put_nowait)
    account.add_event_handler(f"muc::{ROOM}::presence", account.room_presences.put_nowait)
    account.add_event_handler("moderated_message", account.moderated.put_nowait)


async def muc_step(alice, bob):
    """A room on A with an occupant on B: entering, talking both ways, a private
    message, moderation, the room's archive read from B, leaving."""
    muc_a, muc_b = alice.plugin["xep_0045"], bob.plugin["xep_0045"]
    await muc_a.join_muc_wait(ROOM, "Alice", maxstanzas=0, timeout=20)
    form = alice.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden",
                   value="http://jabber.org/protocol/muc#roomconfig")
    form.add_field(var="muc#roomconfig_persistentroom", value="1")
    await muc_a.set_room_config(ROOM, form)
    print("ok: alice made a persistent room on A", flush=True)
    # B learns of the room with the next directory sync (a nudge): until then its
    # node has no such room.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            info = await bob.plugin["xep_0030"].get_info(jid=ROOM, timeout=5)
            if "urn:xmpp:mam:2" not in info["disco_info"]["features"]:
                fail(f"the room does not advertise its archive: {info}")
            break
        except IqError:
            if asyncio.get_running_loop().time() > deadline:
                fail("B never learnt of the room on A")
            await asyncio.sleep(0.2)
    print("ok: bob on B sees the room on A", flush=True)
    await muc_b.join_muc_wait(ROOM, "Bob", maxstanzas=10, timeout=20)
    await alice.room_presences.get()  # alice's own
    await expect(alice.room_presences, "alice sees bob enter from B",
                 lambda p: p["from"].resource == "Bob" and p["type"] == "available")

    alice.send_message(mto=ROOM, mbody="welcome, B", mtype="groupchat")
    hello = await expect(bob.groupchat, "bob gets alice's message in the room",
                         lambda m: m["body"] == "welcome, B" and m["from"].resource == "Alice")
    if hello["stanza_id"]["by"] != ROOM:
        fail(f"no stanza id from the room on {hello}")
    bob.send_message(mto=ROOM, mbody="buy cheap potions", mtype="groupchat")
    spam = await expect(alice.groupchat, "alice gets bob's message from B",
                        lambda m: m["body"] == "buy cheap potions")
    bob.send_message(mto=f"{ROOM}/Alice", mbody="psst", mtype="chat")
    await expect(alice.messages, "alice gets bob's private message",
                 lambda m: m["body"] == "psst" and m["from"] == f"{ROOM}/Bob")

    await alice.plugin["xep_0425"].moderate(ROOM, spam["stanza_id"]["id"], "no ads")
    await expect(bob.moderated, "bob sees alice retract his message",
                 lambda m: m["retract"]["id"] == spam["stanza_id"]["id"])

    bodies = []
    async for m in bob.plugin["xep_0313"].iterate(jid=ROOM, rsm={"max": 10}):
        bodies.append(m["mam_result"]["forwarded"]["stanza"]["body"])
    if bodies != ["welcome, B", "", ""]:
        fail(f"bob read {bodies} from the room's archive")
    print("ok: bob reads the room's archive from B, the retracted message a tombstone",
          flush=True)

    muc_b.leave_muc(ROOM, "Bob")
    await expect(alice.room_presences, "alice sees bob leave",
                 lambda p: p["from"].resource == "Bob" and p["type"] == "unavailable")


def follow_redirects_of_explicit_addresses(account):
    """slixmpp follows see-other-host by setting its address and reconnecting, but a
    reconnect goes back to the address given to connect() when there was one (these
    scenarios have no SRV records, so they give one). Point that address where the
    server sent us, as slixmpp does for addresses it found itself."""
    def on_error(error):
        other = error["see_other_host"] if error["condition"] == "see-other-host" else ""
        if other:
            host, _, port = other.rpartition(":")
            account.custom_address = (host.strip("[]"), int(port))
    account.add_event_handler("stream_error", on_error)


async def main(host, port_a, port_b, ca_file, password):
    alice = await login("alice@localhost", password, host, port_a, ca_file, setup=with_muc)
    bob = await login("bob@localhost", password, host, port_b, ca_file, setup=with_muc)

    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await bob.expect_presence("bob (on B) sees the request of alice (on A)",
                              lambda p: p["type"] == "subscribe" and p["from"].bare == "alice@localhost")
    bob.send_presence(pto="alice@localhost", ptype="subscribed")
    await alice.expect_presence("alice sees bob online across clusters",
                                lambda p: p["from"].bare == "bob@localhost" and p["type"] == "available")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await alice.expect_presence("alice sees bob's request",
                                lambda p: p["type"] == "subscribe" and p["from"].bare == "bob@localhost")
    alice.send_presence(pto="bob@localhost", ptype="subscribed")
    await bob.expect_presence("bob sees alice online across clusters",
                              lambda p: p["from"].bare == "alice@localhost" and p["type"] == "available")

    alice.send_message(mto="bob@localhost", mbody="hello from cluster A", mtype="chat")
    await expect(bob.messages, "bob gets alice's message",
                 lambda m: m["body"] == "hello from cluster A")
    bob.send_message(mto=alice.boundjid.full, mbody="hello from cluster B", mtype="chat")
    await expect(alice.messages, "alice gets bob's reply",
                 lambda m: m["body"] == "hello from cluster B" and m["from"].bare == "bob@localhost")

    await pep_step(alice, bob, "across clusters")
    await upload_step(alice, bob, "across clusters")
    await mam_step(alice, bob, lambda: login("bob@localhost", password, host, port_b, ca_file),
                   "across clusters")
    await muc_step(alice, bob)
    alice = await push_step(alice, bob, lambda: login("alice@localhost", password, host, port_a, ca_file),
                            "across clusters")

    # bob leaves B; alice on A sees it.
    bob.disconnect()
    await alice.expect_presence("alice sees bob go offline",
                                lambda p: p["from"].bare == "bob@localhost" and p["type"] == "unavailable")

    # bob connects to A, the wrong cluster: see-other-host sends him to B.
    bob = await login("bob@localhost", password, host, port_a, ca_file,
                      setup=follow_redirects_of_explicit_addresses)
    if bob.address[1] != port_b:
        fail(f"bob is online at {bob.address}, not at B's port {port_b}")
    print("ok: bob followed see-other-host from A to B", flush=True)
    await alice.expect_presence("alice sees bob back online",
                                lambda p: p["from"].bare == "bob@localhost" and p["type"] == "available")

    alice.disconnect()
    bob.disconnect()
    print("PASS: slixmpp across two clusters", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.DEBUG if "-v" in sys.argv else logging.WARNING)
    sys.argv = [a for a in sys.argv if a != "-v"]
    host, port_a, port_b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ca_file, password = sys.argv[4], sys.argv[5]
    asyncio.run(main(host, port_a, port_b, ca_file, password))
