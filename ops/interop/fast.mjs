// Interop: xmpp.js (@xmpp/client, stock) against a real impmesh process, speaking
// SASL2 (XEP-0388), Bind 2 (XEP-0386) and FAST (XEP-0484):
//   1. alice logs in with her password over SASL2, binds inline (Bind 2, with stream
//      management enabled inline) and is given a FAST token;
//   2. bob does the same; alice's message reaches him;
//   3. alice's connection breaks; xmpp.js reconnects with the token and resumes the
//      XEP-0198 session inline, in one round trip; what bob sent meanwhile arrives;
//      a resumption of a session that does not exist is refused inside the success
//      and a new session bound instead;
//   4. a new alice client logs in with the token alone (no password);
//   5. `impmesh user tokens alice --json` lists the token under alice's client id;
//   6. after `impmesh user tokens alice --revoke ID`, the token is refused
//      (xmpp.js drops it), and the password still works.
// Usage: node fast.mjs HOST PORT DOMAIN PASSWORD IMPMESH_BIN CONFIG
// NODE_EXTRA_CA_CERTS must name the node's certificate. Exits non-zero on failure.

import { execFileSync } from "node:child_process";
import { client, xml } from "@xmpp/client";

const [host, port, domain, password, bin, config] = process.argv.slice(2);
const service = `xmpp://${host}:${port}`;
const CLIENT_ID = "impmesh-interop-phone";
const TIMEOUT_MS = 15_000;

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
  console.log(`ok: ${message}`);
}

function within(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function userAgent(id) {
  return xml("user-agent", { id }, [
    xml("software", {}, "impmesh interop"),
    xml("device", {}, "CI phone"),
  ]);
}

/// A client that records the FAST token it is given and whether it dropped one.
function make({ username, password, token, agentId }) {
  const credentials = { username, password, token };
  const c = client({
    service,
    domain,
    resource: "interop",
    credentials,
    userAgent: userAgent(agentId),
  });
  c.saved = null;
  c.dropped = false;
  c.fast.saveToken = async (t) => {
    c.saved = t;
  };
  c.fast.fetchToken = async () => c.saved;
  c.fast.deleteToken = async () => {
    c.dropped = true;
    c.saved = null;
  };
  c.errors = [];
  c.on("error", (e) => c.errors.push(e));
  // What <bound/> says of the archive (XEP-0386 §3).
  c.metadata = null;
  c.bind2.use(
    "urn:xmpp:mam:2",
    () => {},
    (element) => {
      c.metadata = element;
    },
  );
  return c;
}

function nextMessage(c, body) {
  return new Promise((resolve) => {
    const onStanza = (stanza) => {
      if (stanza.is("message") && stanza.getChildText("body") === body) {
        c.removeListener("stanza", onStanza);
        resolve(stanza);
      }
    };
    c.on("stanza", onStanza);
  });
}

function impmesh(...args) {
  return execFileSync(bin, ["--config", config, ...args], { encoding: "utf8" });
}

// 1. Password login over SASL2 with Bind 2, asking for a token.
const alice = make({ username: "alice", password, agentId: CLIENT_ID });
const aliceJid = await within(alice.start(), "alice's password login");
const resource = aliceJid.getResource();
check(
  resource.startsWith("interop/") && resource.length > "interop/".length,
  `Bind 2 gave alice a resource of her tag and an id (${resource})`,
);
check(alice.streamManagement.enabled, "stream management was enabled inline");
// alice has history from the slixmpp scenario run before this one.
check(
  alice.metadata?.getChild("end")?.attrs.id,
  "the bind said where alice's archive ends (XEP-0313 metadata)",
);
check(alice.saved?.token && alice.saved.mechanism === "HT-SHA-256-NONE", "alice was given a FAST token");
const token = alice.saved;
// xmpp.js "drops" the token it did not have before asking for one: count from here.
alice.dropped = false;

// 2. A message between two SASL2 sessions.
const bob = make({ username: "bob", password, agentId: "impmesh-interop-bob" });
await within(bob.start(), "bob's password login");
await bob.send(xml("presence"));
await alice.send(xml("presence"));
let arrived = nextMessage(bob, "hello over SASL2");
await alice.send(xml("message", { to: `bob@${domain}`, type: "chat" }, xml("body", {}, "hello over SASL2")));
await within(arrived, "alice's message to bob");
check(true, "a message crossed between two Bind 2 sessions");

// 3. The connection breaks: xmpp.js reconnects with the token and resumes inline.
const resumed = new Promise((resolve) => alice.streamManagement.once("resumed", resolve));
const before = alice.jid.toString();
alice.socket.socket.destroy();
const whileAway = nextMessage(alice, "sent while alice was away");
await bob.send(
  xml("message", { to: before, type: "chat" }, xml("body", {}, "sent while alice was away")),
);
await within(resumed, "alice's inline resumption");
check(
  alice.jid.toString() === before && !alice.dropped,
  "the session was resumed inline under the same JID, logging in with the token",
);
await within(whileAway, "the message sent during the break");
check(true, "the message sent during the break arrived after the resumption");

// 3b. A resumption that cannot happen (no such session) is answered inside the
// success, and the Bind 2 request beside it starts a new session on the same resource
// (the installation's hibernated session is replaced).
let resumedAgain = false;
alice.streamManagement.once("resumed", () => {
  resumedAgain = true;
});
alice.streamManagement.id = "no-such-session";
const online = new Promise((resolve) => alice.once("online", resolve));
alice.socket.socket.destroy();
const rebound = await within(online, "alice's new session after a failed resumption");
check(
  rebound.toString() === before && !resumedAgain && !alice.dropped,
  "a failed inline resumption is answered in the success, and Bind 2 binds a new session",
);
await alice.stop();

// 4. A new client of the same installation logs in with the token alone.
const fast = make({ username: "alice", token, agentId: CLIENT_ID });
const fastJid = await within(fast.start(), "alice's token login");
check(!fast.dropped && fastJid.getResource() === resource, "the token alone logged alice in (FAST), on the same resource");
await fast.stop();

// 5. The admin sees the client's token.
const listed = JSON.parse(impmesh("user", "tokens", "alice", "--json"));
const mine = listed.tokens.filter((t) => t.client === CLIENT_ID);
check(mine.length >= 1 && mine.every((t) => t.software === "impmesh interop" && t.device === "CI phone"),
  "impmesh user tokens lists the client's token with its software and device");

// 6. Revoked: the token is refused and dropped; the password still works.
impmesh("user", "tokens", "alice", "--revoke", CLIENT_ID);
const revoked = make({ username: "alice", token, agentId: CLIENT_ID });
let refused = false;
try {
  await within(revoked.start(), "a login with a revoked token");
} catch {
  refused = true;
}
check(refused && revoked.dropped, "a revoked token is refused, and the client drops it");
await revoked.stop().catch(() => {});
const again = make({ username: "alice", password, agentId: CLIENT_ID });
await within(again.start(), "alice's password login after the revocation");
check(again.saved?.token && again.saved.token !== token.token, "the password logs in again and brings a new token");
await again.stop();
await bob.stop();
console.log("xmpp.js SASL2 / Bind 2 / FAST scenario passed");
process.exit(0);
