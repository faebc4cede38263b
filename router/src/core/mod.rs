//! The router's protocol core: decisions without I/O. Each module takes parsed input
//! and the current time and returns what to do; the session and link tasks carry it
//! out. Tested without sockets, with simulated time.

pub mod archive;
pub mod avatar;
pub mod caps;
pub mod csi;
pub mod delivery;
pub mod envelope;
pub mod extdisco;
pub mod muc;
pub mod negotiate;
pub mod pubsub;
pub mod push;
pub mod route;
pub mod sasl2;
pub mod sm;
pub mod subscription;
pub mod upload;
