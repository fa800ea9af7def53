//! TLS termination on the public listener: several certificates chosen by SNI, swapped
//! whole on reload so that renewed certificates apply without a restart.
//!
//! Each certificate serves the DNS names in its subjectAltName (exact names and `*.`
//! wildcards); the first configured one also answers clients that send no or an unknown
//! server name.

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Certificates by the names they serve.
pub(crate) struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (".example.com", key) for `*.example.com`.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
    names: Vec<String>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("names", &self.names)
            .finish()
    }
}

impl CertStore {
    /// Loads each (certificate chain, private key) pair of PEM files; the first is the default.
    pub(crate) fn load(pairs: &[(&Path, &Path)]) -> Result<Self, String> {
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider")?;
        let mut store: Option<CertStore> = None;
        for (cert_path, key_path) in pairs {
            let chain = CertificateDer::pem_file_iter(cert_path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let leaf = chain
                .first()
                .ok_or_else(|| format!("{}: no certificate in the file", cert_path.display()))?;
            let names = dns_names(leaf).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            let signing = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            let certified = Arc::new(CertifiedKey::new(chain, signing));
            certified.keys_match().map_err(|e| {
                format!(
                    "{} does not belong to {}: {e}",
                    key_path.display(),
                    cert_path.display()
                )
            })?;
            let store = store.get_or_insert_with(|| CertStore {
                exact: HashMap::new(),
                wildcards: Vec::new(),
                default: certified.clone(),
                names: Vec::new(),
            });
            for name in names {
                match name.strip_prefix('*') {
                    Some(suffix) => store.wildcards.push((suffix.to_owned(), certified.clone())),
                    None => {
                        store
                            .exact
                            .entry(name.clone())
                            .or_insert_with(|| certified.clone());
                    }
                }
                store.names.push(name);
            }
        }
        store.ok_or_else(|| "no certificate configured".to_owned())
    }

    fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        // `*.example.com` covers exactly one label more than `example.com`.
        if let Some((_, parent)) = name.split_once('.') {
            let suffix = format!(".{parent}");
            if let Some((_, key)) = self.wildcards.iter().find(|(s, _)| *s == suffix) {
                return key.clone();
            }
        }
        self.default.clone()
    }
}

/// The DNS names a certificate serves: its subjectAltName entries, lowercased.
fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(names)
}

/// The listener's certificate resolver; [`Self::replace`] swaps the store on reload.
#[derive(Debug)]
pub(crate) struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub(crate) fn new(store: Arc<CertStore>) -> Self {
        SniResolver {
            store: ArcSwap::new(store),
        }
    }

    pub(crate) fn replace(&self, store: Arc<CertStore>) {
        self.store.store(store);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().for_name(hello.server_name()))
    }
}
