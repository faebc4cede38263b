#!/usr/bin/env python3
"""What SQLite itself costs to store the archive's batches, without impmesh: the
floor under the archive's CPU per message (docs/benchmarks.md, "Message archives").

Batches as the bench's fixed-rate run makes them: 5,000 messages over 1,000 accounts
(each writes to one partner), two rows per message, sorted by account, one
transaction per batch, with impmesh's pragmas. Prints the CPU per row, Python's
binding included (about 1 us), over batches 11 to 40.

    taskset -c 1 python3 ops/bench/archive-floor.py none|one|two

none: the table alone; one: the (owner, id) index; two: also (owner, peer, id).
"""
import os
import random
import sqlite3
import sys
import tempfile
import time

indexes = sys.argv[1] if len(sys.argv) > 1 else "one"
assert indexes in ("none", "one", "two"), __doc__
path = os.path.join(tempfile.mkdtemp(), "floor.db")
db = sqlite3.connect(path, isolation_level=None)
for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-1024",
               "mmap_size=1073741824", "wal_autocheckpoint=8192", "cache_spill=8192"):
    db.execute("PRAGMA " + pragma)
db.execute("""CREATE TABLE archive (seq INTEGER PRIMARY KEY, owner TEXT NOT NULL,
    id TEXT NOT NULL, peer TEXT NOT NULL, resource TEXT NOT NULL, ts BIGINT NOT NULL,
    outgoing BIGINT NOT NULL, stanza TEXT NOT NULL)""")
if indexes in ("one", "two"):
    db.execute("CREATE UNIQUE INDEX archive_owner_id ON archive(owner, id)")
if indexes == "two":
    db.execute("CREATE INDEX archive_owner_peer ON archive(owner, peer, id)")
stanza = ("<message xmlns='jabber:client' from='user1@bench.local/bench' "
          "to='user501@bench.local' type='chat'><body>0.9548741.lorem ipsum dolor sit "
          "amet, consectetur adipiscing elit, sed do eiusm</body></message>")
t = 1_700_000_000_000_000
cpu, rows_timed = 0.0, 0
for batch in range(40):
    rows = []
    for i in range(5000):
        t += 1000
        s, r = i % 1000, (i + 500) % 1000
        for owner, peer, out in ((s, r, 1), (r, s, 0)):
            rows.append((f"user{owner}", f"{t + out:014x}{random.getrandbits(64):016x}",
                         f"user{peer}@bench.local", "bench", t, out, stanza))
    rows.sort(key=lambda x: (x[0], x[1]))
    c0 = time.process_time()
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT OR IGNORE INTO archive (owner, id, peer, resource, ts, "
                   "outgoing, stanza) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    if batch >= 10:
        cpu += time.process_time() - c0
        rows_timed += len(rows)
print(f"{indexes}: {cpu / rows_timed * 1e6:.2f} us CPU per row (Python's binding included)")
