//! The node's files: the data directory (0700), secrets in it (0600; a node refuses
//! to start on one that others can read), the admin token, the store's SQLite file,
//! and the node's certificate files with their expiry alarms.

use anyhow::Context as _;
use impmesh_certs::NodeIdentity;
use impmesh_store::Store;
use impmesh_store::alarms::{self, AlarmDef};

use crate::config::Config;

/// The admin token file in the data directory (like ejabberdctl's cookie): whoever can
/// read it administers the node through the admin API.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Reads the admin token, creating it (mode 0600) at first use.
pub fn admin_token(config: &Config) -> anyhow::Result<String> {
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    refuse_readable_secret(&path)?;
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    create_data_dir(&config.data_dir)?;
    let token = impmesh_axl::auth::random_token();
    let tmp = path.with_extension("token.tmp");
    // A leftover temporary file keeps its mode when reopened: start afresh.
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// Creates the data directory (0700), checks that no secret in it can be read by
/// others, and opens (and migrates) the store, an SQLite file created 0600 (security
/// review M13, L9: it holds peer tokens, the OPAQUE server key and verifiers).
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    create_data_dir(&config.data_dir)?;
    refuse_readable_secret(&config.data_dir.join(ADMIN_TOKEN_FILE))?;
    refuse_readable_secret(&config.data_dir.join("certs").join(impmesh_certs::KEY_FILE))?;
    if let Some(path) = sqlite_file(config) {
        make_private(&path)?;
    }
    let store = Store::open(&config.store.url, &config.data_dir)
        .await
        .with_context(|| format!("cannot open the store {}", config.store.url))?;
    store.set_scram_iterations(config.limits.scram_iterations);
    Ok(store)
}

/// Creates the data directory readable by its owner only (an existing one is left as
/// the admin made it).
pub fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

/// Fails when a secret file exists and others than its owner may read or write it.
fn refuse_readable_secret(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is a secret but has mode {mode:03o}: other users can read it. Run `chmod 600 {}` (and consider it leaked: regenerate it if others had access)",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// The SQLite database file of the configuration, if the store is one.
fn sqlite_file(config: &Config) -> Option<std::path::PathBuf> {
    let url = &config.store.url;
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (path != ":memory:" && !path.is_empty()).then(|| config.data_dir.join(path))
}

/// Creates the database file 0600 before SQLite does (SQLite then gives its `-wal`
/// and `-shm` files the same mode), and tightens one an older version made readable.
fn make_private(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(meta) = std::fs::metadata(&file)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict {}", file.display()))?;
                tracing::warn!(file = %file.display(), "the store was readable by other users; now 0600");
            }
        }
    }
    Ok(())
}

/// The expiry alarm a certificate deserves `secs_left` seconds before it expires.
pub fn expiry_alarm(secs_left: i64) -> Option<&'static AlarmDef> {
    const DAY: i64 = 86_400;
    match secs_left {
        s if s <= 0 => Some(alarms::CERT_EXPIRED),
        s if s <= 7 * DAY => Some(alarms::CERT_EXPIRING),
        s if s <= 30 * DAY => Some(alarms::CERT_EXPIRING_SOON),
        _ => None,
    }
}

/// Raises the expiry alarm each certificate in use deserves now and clears the
/// others, including those of certificates no longer in use.
pub async fn check_certificates(store: &Store, in_use: &[&NodeIdentity]) -> anyhow::Result<()> {
    let family = [
        alarms::CERT_EXPIRING_SOON,
        alarms::CERT_EXPIRING,
        alarms::CERT_EXPIRED,
    ];
    let mut wanted = vec![];
    for identity in in_use {
        let info = impmesh_certs::describe(&identity.chain[0])?;
        let secs_left = info.not_after_unix - impmesh_store::now_unix();
        if let Some(def) = expiry_alarm(secs_left) {
            wanted.push((def, info));
        }
    }
    let fingerprints: Vec<String> = in_use.iter().map(|i| i.fingerprint()).collect();
    for active in store.active_alarms().await? {
        let Some(def) = family.iter().find(|d| d.name == active.name) else {
            continue;
        };
        let still = wanted
            .iter()
            .any(|(w, info)| w.name == def.name && info.sha256 == active.subject);
        if !still {
            let why = if fingerprints.contains(&active.subject) {
                "no longer applies"
            } else {
                "the certificate was replaced"
            };
            store.clear_alarm(def, &active.subject, why).await?;
        }
    }
    for (def, info) in wanted {
        let message = format!(
            "certificate {} valid until {}",
            info.subject, info.not_after
        );
        store.raise_alarm(def, &info.sha256, &message).await?;
    }
    Ok(())
}

/// The client-facing certificate of `[tls]`, when one is configured: checked to cover
/// the domain and to be valid now.
pub fn client_identity(config: &Config) -> anyhow::Result<Option<NodeIdentity>> {
    let (Some(cert), Some(key)) = (&config.tls.client_certificate, &config.tls.client_key) else {
        return Ok(None);
    };
    let (cert, key) = (config.data_dir.join(cert), config.data_dir.join(key));
    let identity = NodeIdentity::load(&cert, &key)
        .with_context(|| format!("cannot load the client certificate {}", cert.display()))?;
    impmesh_certs::check_identity(&identity, std::slice::from_ref(&config.domain))
        .with_context(|| format!("the client certificate {} cannot serve", cert.display()))?;
    Ok(Some(identity))
}

/// The names a node certificate must cover: the XMPP domain and the node name.
pub fn required_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.domain.clone()];
    if config.node_name() != config.domain {
        names.push(config.node_name());
    }
    names
}

/// Checks and installs a CA-signed certificate (PEM) for this node; a running node
/// uses it after a reload. Returns the new fingerprint.
pub fn import_certificate(
    config: &Config,
    cert: &[u8],
    key: Option<&[u8]>,
    chain: Option<&[u8]>,
) -> anyhow::Result<String> {
    let current = identity(config)?;
    let new = current.import(
        &config.data_dir.join("certs"),
        cert,
        key,
        chain,
        &required_names(config),
    )?;
    Ok(new.fingerprint())
}

/// Checks and installs a PKCS#12 archive (key and chain) for this node; returns the new
/// fingerprint.
pub fn import_pkcs12(config: &Config, archive: &[u8], password: &str) -> anyhow::Result<String> {
    let current = identity(config)?;
    let new = current.import_pkcs12(
        &config.data_dir.join("certs"),
        archive,
        password,
        &required_names(config),
    )?;
    Ok(new.fingerprint())
}

/// Replaces the node's key and certificate with a new self-signed pair for the same
/// names; returns the new fingerprint.
pub fn regenerate_certificate(config: &Config) -> anyhow::Result<String> {
    let names = certificate_names(config);
    let dir = config.data_dir.join("certs");
    Ok(NodeIdentity::regenerate(&dir, &names)?.fingerprint())
}

/// The SANs of a generated certificate: the domain, the node name, the cluster name.
/// The node name first: it is the certificate's CN, so every node's self-signed
/// certificate has its own subject (two with the same subject confuse the clients that
/// trust both, OpenSSL's chain building among them).
fn certificate_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.node_name()];
    for name in [config.domain.clone(), config.cluster_name()] {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The node's identity: loaded from `DATA_DIR/certs`, or generated at first use with
/// the domain, the node name and the cluster name as SANs.
pub fn identity(config: &Config) -> anyhow::Result<NodeIdentity> {
    let names = certificate_names(config);
    create_data_dir(&config.data_dir)?;
    Ok(NodeIdentity::load_or_generate(
        &config.data_dir.join("certs"),
        &names,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_thresholds() {
        let day = 86_400;
        let name = |s| expiry_alarm(s).map(|a| a.name);
        assert_eq!(name(31 * day), None);
        assert_eq!(name(30 * day), Some("NodeCertificateExpiringSoon"));
        assert_eq!(name(8 * day), Some("NodeCertificateExpiringSoon"));
        assert_eq!(name(7 * day), Some("NodeCertificateExpiring"));
        assert_eq!(name(1), Some("NodeCertificateExpiring"));
        assert_eq!(name(0), Some("NodeCertificateExpired"));
        assert_eq!(name(-day), Some("NodeCertificateExpired"));
    }
}
