//! A certificate authority and a server certificate generated at start, so that clients
//! exercise real TLS verification (including SNI with a pinned IP) against the simulator.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::SimError;

pub(crate) struct TlsMaterial {
    pub acceptor: TlsAcceptor,
    pub ca_pem: String,
}

pub(crate) fn generate(names: &[String]) -> Result<TlsMaterial, SimError> {
    let err = |e: &dyn std::fmt::Display| SimError::Tls(e.to_string());
    let ca_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tandem simulator CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut leaf_params = CertificateParams::new(names.to_vec()).map_err(|e| err(&e))?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "tandem simulator");
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| err(&e))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![
                CertificateDer::from(leaf.der().to_vec()),
                CertificateDer::from(ca_cert.der().to_vec()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_pem: ca_cert.pem(),
    })
}
