"""Interop: the relay's credentials from XEP-0215, as a stock slixmpp client asks.

alice logs in over STARTTLS, asks the server for its external services
(`urn:xmpp:extdisco:2`; slixmpp has no plugin for it, so the request is written out)
and prints the UDP TURN relay's host, port, username and password, and the TLS
relay's port, on one line for run.sh, which hands them to coturn's turnutils_uclient. Exits non-zero on failure.

Usage: turn.py HOST PORT CA_FILE PASSWORD
"""

import asyncio
import sys

from slixmpp.xmlstream import ET

from scenario import STEP_TIMEOUT, fail, login

EXTDISCO = "urn:xmpp:extdisco:2"


async def main(host, port, ca_file, password):
    alice = await login("alice@localhost", password, host, port, ca_file)
    iq = alice.make_iq_get(ito="localhost")
    iq.append(ET.Element(f"{{{EXTDISCO}}}services"))
    try:
        reply = await iq.send(timeout=STEP_TIMEOUT)
    except Exception as e:  # an error reply or a timeout
        fail(f"no external services: {e}")
    services = reply.xml.find(f"{{{EXTDISCO}}}services")
    turn = [s for s in services if s.get("type") == "turn" and s.get("transport") == "udp"]
    if not turn or not turn[0].get("username") or not turn[0].get("password"):
        fail(f"no TURN relay with credentials in {ET.tostring(services)}")
    turns = [s for s in services if s.get("type") == "turns" and s.get("transport") == "tcp"]
    if not turns or turns[0].get("username") != turn[0].get("username"):
        fail(f"no TURN-over-TLS relay with credentials in {ET.tostring(services)}")
    s = turn[0]
    print(f"ok: XEP-0215 gives the relay {s.get('host')}:{s.get('port')} (TLS {turns[0].get('host')}:{turns[0].get('port')}) with credentials", file=sys.stderr)
    print(s.get("host"), s.get("port"), s.get("username"), s.get("password"), turns[0].get("port"), flush=True)
    alice.disconnect()


if __name__ == "__main__":
    host, port, ca_file, password = sys.argv[1:5]
    asyncio.run(main(host, port, ca_file, password))
