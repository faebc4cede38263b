//! The names of the mesh as types of their own: an account's user name, a cluster, a
//! node. They are all strings on the wire and in SQL, and code that took a cluster
//! where a node was meant compiled; with these it does not.
//!
//! A name is checked where it enters (a peer's directory entry in the sync agent, an
//! announced node, the configuration, an admin's or a client's input); what the store
//! hands back was checked on its way in, so [`UserName::new`] and its siblings only
//! wrap.

use std::fmt;

macro_rules! name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[derive(serde::Serialize, serde::Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a name that was checked where it entered (see the module doc).
            pub fn new(name: impl Into<String>) -> $name {
                $name(name.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> $name {
                $name(name.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(name: String) -> $name {
                $name(name)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

name!(
    /// An account's user name: an RFC 7622 localpart, nodeprepped, unique in the mesh.
    UserName
);
name!(
    /// A cluster's name: a DNS name, the same in every peer's view of the mesh.
    ClusterName
);
name!(
    /// A node's name: a DNS name, unique in the mesh (the name its certificate and its
    /// router links carry).
    NodeName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_with_text_and_not_with_each_other() {
        let cluster = ClusterName::new("a.example");
        let node = NodeName::new("n1.a.example");
        assert_eq!(cluster, "a.example");
        assert_eq!("n1.a.example", node);
        assert_eq!(cluster.to_string(), "a.example");
        assert_eq!(serde_json::to_string(&node).unwrap(), "\"n1.a.example\"");
        let back: UserName = serde_json::from_str("\"bob\"").unwrap();
        assert_eq!(back.as_str(), "bob");
        // `cluster == node` does not compile: that is the point.
    }
}
