//! The bridged media plane: every node runs a TURN relay (RFC 8656) for the users
//! homed on its cluster, who learn it and get short-lived credentials through
//! XEP-0215. A call between two clusters is bridged relay to relay: each party
//! allocates on its own cluster's relay and the two relayed addresses talk.
//!
//! - [`stun`]: the STUN/TURN wire format and ChannelData frames;
//! - [`auth`]: credentials in the TURN REST API form (coturn's `use-auth-secret`);
//! - [`policy`]: which peer addresses may be relayed to;
//! - [`core`]: the relay's protocol logic, without I/O;
//! - [`relay`]: its sockets.

#![forbid(unsafe_code)]

pub mod auth;
pub mod core;
pub mod policy;
pub mod relay;
pub mod stun;
