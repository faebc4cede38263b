//! Name resolution for peers: hickory-resolver with the system configuration (and the
//! hosts file), and a memory of the last good answer of every name, kept in the store,
//! so that a DNS outage does not cut a peer that is already known.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use impmesh_store::Store;

/// Something that turns a name into addresses (hickory in production; tests use a map).
pub trait NameResolver: Send + Sync + 'static {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, String>> + Send + 'a>>;
}

/// hickory-resolver with /etc/resolv.conf and /etc/hosts.
pub struct SystemDns(hickory_resolver::TokioResolver);

impl SystemDns {
    pub fn new() -> Result<SystemDns, String> {
        let mut builder =
            hickory_resolver::TokioResolver::builder_tokio().map_err(|e| e.to_string())?;
        let options = builder.options_mut();
        options.timeout = Duration::from_secs(3);
        options.attempts = 2;
        options.use_hosts_file = hickory_resolver::config::ResolveHosts::Always;
        Ok(SystemDns(builder.build().map_err(|e| e.to_string())?))
    }
}

impl NameResolver for SystemDns {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, String>> + Send + 'a>> {
        Box::pin(async move {
            let answer = self.0.lookup_ip(name).await.map_err(|e| e.to_string())?;
            Ok(answer.iter().collect())
        })
    }
}

pub use impmesh_axl::api::NameStatus;

/// Resolution with the last good answers.
pub struct Dns {
    resolver: RwLock<Arc<dyn NameResolver>>,
    store: Store,
}

impl Dns {
    pub fn new(store: Store, resolver: Arc<dyn NameResolver>) -> Dns {
        Dns {
            resolver: RwLock::new(resolver),
            store,
        }
    }

    /// Uses another resolver from now on.
    pub fn set_resolver(&self, resolver: Arc<dyn NameResolver>) {
        *self.resolver.write().unwrap_or_else(|e| e.into_inner()) = resolver;
    }

    /// Resolves `name` (an IP address stands for itself); on failure, falls back to the
    /// last good answer. `addresses` is empty only when there never was one.
    pub async fn resolve(&self, name: &str) -> NameStatus {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return NameStatus {
                name: name.to_owned(),
                ok: true,
                addresses: vec![ip.to_string()],
                error: None,
                resolved_at: None,
            };
        }
        let resolver = self
            .resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match resolver.lookup(name).await {
            Ok(ips) if !ips.is_empty() => {
                let addresses: Vec<String> = ips.iter().map(ToString::to_string).collect();
                if let Err(e) = self.store.remember_addresses(name, &addresses).await {
                    tracing::warn!(name, error = %e, "cannot remember a DNS answer");
                }
                NameStatus {
                    name: name.to_owned(),
                    ok: true,
                    addresses,
                    error: None,
                    resolved_at: None,
                }
            }
            other => {
                let error = match other {
                    Err(e) => e,
                    Ok(_) => "no address".to_owned(),
                };
                let last = self.store.last_addresses(name).await.ok().flatten();
                NameStatus {
                    name: name.to_owned(),
                    ok: false,
                    addresses: last.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
                    resolved_at: last.map(|l| l.1),
                    error: Some(error),
                }
            }
        }
    }
}
