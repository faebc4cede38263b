//! The one routing decision: where a stanza for an account of the served domain goes.
//!
//! The code review found the local-or-remote rule written at seven places with
//! different rules (some asked the directory first, some the sessions). It lives here
//! now, as a function of what the node knows, without I/O; every path that routes to
//! an account asks it (through `Server::destination`).
//!
//! The rule, in order:
//! 1. Sessions on this node win: only a local account has them, and a local account
//!    always wins over a peer's claim (`Store::home_of`).
//! 2. The directory cannot be read: refuse for now (`internal-server-error`, retry).
//! 3. A local account homed on this node: nobody can take it now (offline storage for
//!    messages, nothing for presence).
//! 4. A local account homed on another node of this cluster: that node. Multi-node
//!    clusters come later; until then the caller treats it like (3), which is right
//!    while all nodes of a cluster share its store.
//! 5. An account of a peer cluster: that cluster's node, over the router link.
//! 6. Claimed by two or more peers: refused, naming them (quarantine).
//! 7. Nobody's: no such account.

use impmesh_store::{ClusterName, Home, NodeName};

use crate::error::StanzaErrorCondition;

/// This node, as routing needs it.
#[derive(Debug, Clone, Copy)]
pub struct Me<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
}

/// Where a stanza for an account goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Destination {
    /// The account's sessions on this node.
    Sessions,
    /// The account is local and nothing here can take the stanza now.
    Offline,
    /// Another node of this cluster.
    ClusterNode { node: NodeName },
    /// A node of a peer cluster, over its router link.
    Peer {
        cluster: ClusterName,
        node: NodeName,
    },
    /// Refused now, with this error (the directory failed, or the name is quarantined).
    Refuse {
        condition: StanzaErrorCondition,
        text: String,
    },
    /// No account of that name anywhere in the mesh.
    Unknown,
}

/// What the directory said about the account, or that it could not say.
pub type Lookup<'a> = Result<&'a Home, ()>;

/// The decision (see the module doc for the rule).
pub fn destination(
    user: &str,
    domain: &str,
    has_sessions: bool,
    home: Lookup<'_>,
    me: Me<'_>,
) -> Destination {
    if has_sessions {
        return Destination::Sessions;
    }
    let Ok(home) = home else {
        return Destination::Refuse {
            condition: StanzaErrorCondition::InternalServerError,
            text: "the directory cannot be read right now; try again".into(),
        };
    };
    match home {
        Home::Local { node, .. } => within_cluster(node, me),
        // A peer's entry naming this cluster is refused by the sync agent; were one
        // there, the account is still ours.
        Home::Remote { cluster, node } if cluster == me.cluster => within_cluster(node, me),
        Home::Remote { cluster, node } => Destination::Peer {
            cluster: cluster.clone(),
            node: node.clone(),
        },
        Home::Quarantined { clusters } => Destination::Refuse {
            condition: StanzaErrorCondition::ServiceUnavailable,
            text: format!(
                "{user}@{domain} is claimed by several clusters ({}) and is unreachable until \
                 their admins remove all but one",
                clusters.join(", ")
            ),
        },
        Home::Unknown => Destination::Unknown,
        // A future kind of home: nothing routes there yet.
        _ => Destination::Unknown,
    }
}

fn within_cluster(node: &NodeName, me: Me<'_>) -> Destination {
    if *node == me.node {
        Destination::Offline
    } else {
        Destination::ClusterNode { node: node.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Me<'static> = Me {
        cluster: "a.example.com",
        node: "n1.a.example.com",
    };

    fn local(node: &str) -> Home {
        Home::Local {
            cluster: ME.cluster.into(),
            node: node.into(),
        }
    }

    fn remote(cluster: &str, node: &str) -> Home {
        Home::Remote {
            cluster: cluster.into(),
            node: node.into(),
        }
    }

    fn route(has_sessions: bool, home: Lookup<'_>) -> Destination {
        destination("bob", "example.com", has_sessions, home, ME)
    }

    #[test]
    fn sessions_here_win_over_any_directory_answer() {
        for home in [
            local("n2"),
            remote("b", "n1.b"),
            Home::Quarantined {
                clusters: vec!["b".into(), "c".into()],
            },
            Home::Unknown,
        ] {
            assert_eq!(route(true, Ok(&home)), Destination::Sessions, "{home:?}");
        }
        assert_eq!(route(true, Err(())), Destination::Sessions);
    }

    #[test]
    fn a_local_account_without_sessions_is_offline_here_or_on_its_node() {
        assert_eq!(route(false, Ok(&local(ME.node))), Destination::Offline);
        assert_eq!(
            route(false, Ok(&local("n2.a.example.com"))),
            Destination::ClusterNode {
                node: "n2.a.example.com".into()
            }
        );
        // A claim naming our own cluster is ours.
        assert_eq!(
            route(false, Ok(&remote(ME.cluster, ME.node))),
            Destination::Offline
        );
    }

    #[test]
    fn a_peers_account_goes_to_its_node_and_a_quarantined_one_nowhere() {
        assert_eq!(
            route(false, Ok(&remote("b.example.com", "n1.b.example.com"))),
            Destination::Peer {
                cluster: "b.example.com".into(),
                node: "n1.b.example.com".into()
            }
        );
        let quarantined = Home::Quarantined {
            clusters: vec!["b".into(), "c".into()],
        };
        let Destination::Refuse { condition, text } = route(false, Ok(&quarantined)) else {
            panic!("refused")
        };
        assert_eq!(condition, StanzaErrorCondition::ServiceUnavailable);
        assert!(
            text.contains("bob@example.com") && text.contains("b, c"),
            "{text}"
        );
        assert_eq!(route(false, Ok(&Home::Unknown)), Destination::Unknown);
    }

    #[test]
    fn a_directory_failure_refuses_for_now() {
        assert!(matches!(
            route(false, Err(())),
            Destination::Refuse {
                condition: StanzaErrorCondition::InternalServerError,
                ..
            }
        ));
    }
}
