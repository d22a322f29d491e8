//! One HTTP client per network path.

use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use crate::config::{LivenessConfig, PathConfig};

/// TLS settings shared by a stream's paths.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// An extra CA certificate (PEM) to trust besides the system roots.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Allow `http://` URLs. Only for test peers on loopback, and only when the
    /// configuration says so explicitly.
    pub allow_plain_http: bool,
}

/// The HTTP client could not be built from the path's settings.
#[derive(Debug, thiserror::Error)]
#[error("path {path}: {message}")]
pub struct ClientError {
    pub path: String,
    pub message: String,
}

static CRYPTO: Once = Once::new();

/// Installs the ring crypto provider as the process default (rustls needs exactly one).
pub fn install_crypto_provider() {
    CRYPTO.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The clients of a stream's paths, in order: each leaves through its own path to the
/// host and port of `url`.
pub fn path_clients(
    url: &str,
    paths: &[&PathConfig],
    tls: &TlsSettings,
    liveness: &LivenessConfig,
) -> Result<Vec<reqwest::Client>, ClientError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ClientError {
        path: "(every)".to_owned(),
        message: format!("the stream url does not parse: {e}"),
    })?;
    let host = parsed.host_str().unwrap_or_default().to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    paths
        .iter()
        .map(|p| build_client(p, tls, liveness, &host, port))
        .collect()
}

/// Builds the client of one path: its own source address, interface, proxy or pinned IP,
/// and its own connection pool and resolver.
pub fn build_client(
    path: &PathConfig,
    tls: &TlsSettings,
    liveness: &LivenessConfig,
    host: &str,
    port: u16,
) -> Result<reqwest::Client, ClientError> {
    install_crypto_provider();
    let err = |message: String| ClientError {
        path: path.name.clone(),
        message,
    };
    let mut b = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(30))
        .connect_timeout(Duration::from_millis(liveness.connect_timeout_ms))
        .read_timeout(Duration::from_millis(liveness.read_timeout_ms))
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(!tls.allow_plain_http)
        .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")));
    if let Some(ip) = path.source_address {
        b = b.local_address(ip);
    }
    if let Some(iface) = &path.interface {
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        {
            b = b.interface(iface);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
        {
            return Err(err(format!("binding to interface {iface} needs Linux")));
        }
    }
    match &path.proxy {
        Some(url) => {
            let proxy = reqwest::Proxy::all(url).map_err(|e| {
                // The error text may quote the URL too: neither is printed with credentials.
                let shown = tandem_core::redact_url(url);
                let e = tandem_core::redact_url(&e.to_string());
                err(format!("proxy {shown}: {e}"))
            })?;
            b = b.proxy(proxy);
        }
        None => b = b.no_proxy(),
    }
    if let Some(ip) = path.resolve_ip {
        b = b.resolve(host, SocketAddr::new(ip, port));
    }
    if let Some(pem) = &tls.extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| err(format!("extra CA: {e}")))?;
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| err(e.to_string()))
}
