-- Push notifications (XEP-0357): each account's app servers (a JID and a node), with
-- the publish-options form to send them (XML, '' without) and whether the client let
-- message bodies through. Registrations outlive sessions; a client disables its own.
-- Keep sqlite/ and postgres/ in step.
CREATE TABLE push_registrations (
    owner         TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    jid           TEXT NOT NULL,
    node          TEXT NOT NULL,
    options       TEXT NOT NULL,
    include_body  BIGINT NOT NULL,
    created       BIGINT NOT NULL,
    PRIMARY KEY (owner, jid, node)
);
