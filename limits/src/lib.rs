//! Limits on what one source may do, shared by the router and the HTTPS service:
//! attempt counters per key (an address prefix, an account) in fixed windows, in a
//! table with a hard size bound (logins, registrations, password changes), and caps
//! on the connections one address holds open.
//!
//! An attempt is counted when it starts, not when it fails (security review M6:
//! parallel connections that all passed a "not blocked yet" check before any failure
//! was recorded each got a free guess).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Marks a socket's packets with a DSCP class (RFC 2474: the top six bits of the
/// IPv4 TOS byte or IPv6 traffic class); 0 leaves them unmarked. Set on a listening
/// socket, the connections it accepts inherit it (Linux copies it at accept). The
/// seeds' classes: EF (46) for relayed media, AF31 (26) for signalling.
pub fn set_dscp<S: std::os::fd::AsFd>(socket: &S, dscp: u8) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    let class = u32::from(dscp) << 2;
    let v6 = sock.local_addr()?.as_socket().is_some_and(|a| a.is_ipv6());
    if v6 {
        sock.set_tclass_v6(class)
    } else {
        sock.set_tos_v4(class)
    }
}

/// Locks a mutex, recovering from a poisoned lock (the tables hold plain counters that
/// every writer leaves consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts attempts per key: at most `limit` in each `window`.
#[derive(Debug)]
pub struct Throttle<K> {
    table: Mutex<HashMap<K, (u32, Instant)>>,
    limit: u32,
    window: Duration,
    /// Keys kept at most; when full, expired windows go first, then the oldest.
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Throttle<K> {
        Throttle {
            table: Mutex::new(HashMap::new()),
            limit: limit.max(1),
            window,
            capacity: capacity.max(1),
        }
    }

    /// Counts an attempt by `key`; false (and not counted) when it already made
    /// `limit` in the current window.
    pub fn attempt(&self, key: &K) -> bool {
        let now = Instant::now();
        let mut table = lock(&self.table);
        if let Some((count, start)) = table.get_mut(key) {
            if now.duration_since(*start) >= self.window {
                *count = 0;
                *start = now;
            }
            if *count >= self.limit {
                return false;
            }
            *count += 1;
            return true;
        }
        if table.len() >= self.capacity {
            let window = self.window;
            table.retain(|_, (_, start)| now.duration_since(*start) < window);
            if table.len() >= self.capacity
                && let Some(oldest) = table
                    .iter()
                    .min_by_key(|(_, (_, start))| *start)
                    .map(|(k, _)| k.clone())
            {
                table.remove(&oldest);
            }
        }
        table.insert(key.clone(), (1, now));
        true
    }

    /// Whether `key` has used up its attempts for now (without counting one).
    pub fn is_blocked(&self, key: &K) -> bool {
        let now = Instant::now();
        lock(&self.table).get(key).is_some_and(|(count, start)| {
            *count >= self.limit && now.duration_since(*start) < self.window
        })
    }

    /// Gives an attempt back (it succeeded, and successes are not to count). A key
    /// left with no attempts leaves the table: a login storm of good logins leaves
    /// nothing behind (each entry it kept would pin an allocator page long after the
    /// sessions ended).
    pub fn refund(&self, key: &K) {
        let mut table = lock(&self.table);
        if let Some((count, _)) = table.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.remove(key);
            }
        }
    }

    /// Keys in the table.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Connections open per address key (IPv6 per /64), capped: one source cannot take
/// the node's connection slots, file descriptors or handshake memory (security review
/// H3, M10). The table holds one entry per address with a connection open, so it is
/// bounded by the connections themselves.
#[derive(Debug)]
pub struct PerAddress {
    open: Mutex<HashMap<IpAddr, u32>>,
    max: u32,
}

/// One connection's place in a [`PerAddress`] count, given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: std::sync::Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub fn new(max: u32) -> std::sync::Arc<PerAddress> {
        std::sync::Arc::new(PerAddress {
            open: Mutex::new(HashMap::new()),
            max: max.max(1),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its address has `max` open.
    pub fn acquire(self: &std::sync::Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut open = lock(&self.open);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s address key.
    pub fn open(&self, ip: IpAddr) -> u32 {
        lock(&self.open).get(&address_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.table.open);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The key a client address is throttled by: the address for IPv4, its /64 for IPv6
/// (one subscriber usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class set on a listener is carried by the connections it accepts.
    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_dscp_class() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        set_dscp(&listener, 26).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(socket2::SockRef::from(&accepted).tos_v4().unwrap(), 26 << 2);
        let v6 = tokio::net::UdpSocket::bind("[::1]:0").await;
        if let Ok(v6) = v6 {
            set_dscp(&v6, 46).unwrap();
            assert_eq!(socket2::SockRef::from(&v6).tclass_v6().unwrap(), 46 << 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_counted_per_window_and_the_table_is_bounded() {
        let t: Throttle<&str> = Throttle::new(2, Duration::from_secs(60), 3);
        assert!(t.attempt(&"a"));
        assert!(t.attempt(&"a"));
        assert!(!t.attempt(&"a"));
        assert!(t.is_blocked(&"a"));
        t.refund(&"a");
        assert!(t.attempt(&"a"), "a refunded attempt may be made again");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!t.is_blocked(&"a"));
        assert!(t.attempt(&"a"));
        // Three keys fit; a fourth pushes out the oldest.
        for key in ["b", "c", "d"] {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(t.attempt(&key));
        }
        assert_eq!(lock(&t.table).len(), 3);
        assert!(!lock(&t.table).contains_key("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn good_attempts_leave_nothing_behind() {
        let t: Throttle<String> = Throttle::new(3, Duration::from_secs(60), 100_000);
        for i in 0..1000 {
            let key = format!("user{i}");
            assert!(t.attempt(&key));
            t.refund(&key);
        }
        assert!(t.is_empty(), "{} keys kept for refunded attempts", t.len());
        // A failure stays counted.
        assert!(t.attempt(&"mallory".to_owned()));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let table = PerAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        let first = table.acquire(a).unwrap();
        let _second = table.acquire(a).unwrap();
        assert!(table.acquire(a).is_none());
        let _v6 = table.acquire(b).unwrap();
        let _v6b = table.acquire(b2).unwrap();
        assert!(table.acquire(b).is_none(), "one /64, one count");
        drop(first);
        assert_eq!(table.open(a), 1);
        assert!(table.acquire(a).is_some());
    }

    #[test]
    fn ipv6_addresses_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
