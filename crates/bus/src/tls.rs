//! TLS to the servers Switchyard connects to (NATS, and brokers a source reads from):
//! rustls with ring, the CAs of a file or the system's, an optional client
//! certificate, and an optional name to check the server's certificate against.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio_rustls::rustls;

/// A source's `tls` table: TLS to the broker it reads from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CAs that issued the server's certificate (PEM); the system's when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), with `key_file`: for servers that verify
    /// clients.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate is checked against, when it is not the
    /// host of the URL (a server reached by IP address or through a proxy).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Mistakes in the settings, for `validate`.
    pub fn problems(&self) -> Vec<String> {
        problems(
            self.ca_file.as_deref(),
            self.cert_file.as_deref(),
            self.key_file.as_deref(),
            self.server_name.as_deref(),
        )
    }

    /// Makes relative paths relative to `base` (the configuration's directory).
    pub fn files_relative_to(&mut self, base: &Path) {
        for path in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            *path = base.join(&*path);
        }
    }

    /// The rustls client configuration of these settings, or why not (naming the
    /// file at fault).
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        client_config(
            self.ca_file.as_deref(),
            self.cert_file.as_deref(),
            self.key_file.as_deref(),
            self.server_name.as_deref(),
        )
    }
}

pub(crate) fn problems(
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    server_name: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if cert_file.is_some() != key_file.is_some() {
        problems.push("`cert_file` and `key_file` go together".to_owned());
    }
    for path in [ca_file, cert_file, key_file].into_iter().flatten() {
        if let Err(error) = std::fs::metadata(path) {
            problems.push(format!("`{}`: {error}", path.display()));
        }
    }
    if let Some(name) = server_name
        && ServerName::try_from(name).is_err()
    {
        problems.push(format!(
            "server_name `{name}` is not a DNS name or IP address"
        ));
    }
    problems
}

/// Checks the server's certificate against a configured name rather than the host
/// the client connected to.
#[derive(Debug)]
struct NamedServer {
    name: ServerName<'static>,
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls client configuration (ring): the CAs of `ca_file`, else the system's; a
/// client certificate when `cert_file` and `key_file` are given; the server's
/// certificate checked against `server_name` when given, else against the host
/// connected to.
pub fn client_config(
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    server_name: Option<&str>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("ca_file `{}`: {error}", path.display()))?
            {
                let certificate = certificate
                    .map_err(|error| format!("ca_file `{}`: {error}", path.display()))?;
                roots
                    .add(certificate)
                    .map_err(|error| format!("ca_file `{}`: {error}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file `{}` holds no certificate", path.display()));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let roots = Arc::new(roots);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?;
    let builder = match server_name {
        Some(server_name) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|error| error.to_string())?;
            let name = ServerName::try_from(server_name.to_owned())
                .map_err(|error| format!("server_name `{server_name}`: {error}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedServer { name, inner }))
        }
        None => builder.with_root_certificates(roots),
    };
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|error| format!("cert_file `{}`: {error}", cert_file.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|error| format!("key_file `{}`: {error}", key_file.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| error.to_string())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
