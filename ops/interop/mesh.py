"""Interop across the mesh: slixmpp accounts homed on two different clusters (two real
impmesh processes peered with `impmesh peer add`).

alice (homed on A, logs in at A) and bob (homed on B) subscribe to each other with
explicit approval, see each other's presence, chat both ways, and bob gets alice's
avatar and OMEMO device list over PEP from her home cluster, and a second device of
bob reads their history from his archive on B; bob then connects to A,
is sent to B with see-other-host, follows it and comes online there; his logout
reaches alice on the other cluster. Any failure or timeout exits non-zero.

Usage: mesh.py HOST PORT_A PORT_B CA_BUNDLE PASSWORD
"""

import asyncio
import logging
import sys

from scenario import expect, fail, login, mam_step, pep_step, push_step, upload_step


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
    alice = await login("alice@localhost", password, host, port_a, ca_file)
    bob = await login("bob@localhost", password, host, port_b, ca_file)

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
