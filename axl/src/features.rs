//! The intercluster protocol's version and optional features. Thirty clusters with
//! their own admins never upgrade together: each announces its protocol version and
//! the features it speaks in `getClusterInfo` (and on the router link's stream
//! header), and what a newer release adds to the protocol is used only with peers that
//! announce it. A peer missing a feature shows in `impmesh peer status` (and in the
//! log) instead of failing.

/// The intercluster protocol version this release speaks. 1: the protocol before
/// features were announced (a peer that announces nothing is taken as 1).
pub const PROTOCOL: u32 = 2;

/// `removePeer`: a cluster that removes a peer tells it, and the peer shows it as
/// removed (instead of only failing to authenticate at its next sync).
pub const PEER_REMOVAL: &str = "peer-removal";

/// Chat rooms in the directory: `listUsers` and `getDirectoryDigest` list the rooms
/// homed in the cluster when asked (`<rooms>true</rooms>`), and router links carry
/// the rooms' traffic (docs/muc.md).
pub const ROOMS: &str = "rooms";

/// Every optional feature this release can speak, in the order they came.
pub const ALL: &[&str] = &[PEER_REMOVAL, ROOMS];

/// Whether `name` is a feature this release knows (for the configuration check).
pub fn is_known(name: &str) -> bool {
    ALL.contains(&name)
}

/// The features of `ALL` not in `disabled`.
pub fn announced(disabled: &[String]) -> Vec<String> {
    ALL.iter()
        .filter(|f| !disabled.iter().any(|d| d == *f))
        .map(|f| (*f).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_feature_is_not_announced() {
        assert_eq!(announced(&[]), ALL);
        assert_eq!(announced(&[PEER_REMOVAL.to_owned()]), [ROOMS]);
        assert!(is_known(PEER_REMOVAL) && !is_known("telepathy"));
    }
}
