//! One extractor per section of `gateway.toml` other than upstreams
//! ([`super::extract_upstreams`]), routes ([`super::extract_routes`]) and WebSockets
//! ([`super::extract_websocket`]): each reads its section and returns the validated value,
//! or the first fault, located.

use super::context::Ctx;
use super::file::{
    AdminSection, CertificateSection, CorsSection, LimitsSection, LogSection, SecretSection,
    ServerSection, SpannedString, TlsSection,
};
use super::{
    ConfigError, LogSettings, Route, SecretSource, TlsListener, DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN, DEFAULT_THREADS, DEFAULT_UPGRADE_SOCK,
};
use crate::edge::client_address::Cidr;
use crate::edge::cors::{CorsPolicy, CorsSpec, CorsSpecError};
use crate::edge::limits::LimitSettings;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use toml::Spanned;

impl Ctx<'_> {
    /// The public and the admin listener, `(listen, admin_listen)`.
    pub(crate) fn extract_listeners(
        &self,
        server: &ServerSection,
        admin: &AdminSection,
    ) -> Result<(String, String), ConfigError> {
        let listen = self.socket_address_or(server.listen.as_ref(), DEFAULT_LISTEN)?;
        let admin_listen = self.socket_address_or(admin.listen.as_ref(), DEFAULT_ADMIN_LISTEN)?;
        if admin_listen == listen {
            return Err(self.error_at(
                admin.listen.as_ref().map(Spanned::span),
                "the admin listener must not be the public listener: metrics and drain stay off the public port",
            ));
        }
        Ok((listen, admin_listen))
    }

    pub(crate) fn extract_threads(
        &self,
        threads: Option<&Spanned<i64>>,
    ) -> Result<usize, ConfigError> {
        match threads {
            Some(t) => usize::try_from(*t.get_ref())
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| self.error(t, "`threads` must be a whole number from 1 to 256")),
            None => Ok(DEFAULT_THREADS),
        }
    }

    pub(crate) fn upgrade_sock(&self, value: Option<&SpannedString>) -> PathBuf {
        value.map_or_else(
            || PathBuf::from(DEFAULT_UPGRADE_SOCK),
            |p| self.relative(p.get_ref()),
        )
    }

    pub(crate) fn extract_trusted_proxies(
        &self,
        list: &[SpannedString],
    ) -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .map(|c| {
                c.get_ref().parse::<Cidr>().map_err(|_| {
                    self.error(
                        c,
                        "a trusted proxy is an address or network such as \"10.0.0.0/8\"",
                    )
                })
            })
            .collect()
    }

    /// `[secrets]`: where each declared secret comes from. Values are not read here.
    pub(crate) fn extract_secrets(
        &self,
        sections: &BTreeMap<String, SecretSection>,
    ) -> Result<BTreeMap<String, SecretSource>, ConfigError> {
        sections
            .iter()
            .map(|(name, section)| Ok((name.clone(), self.extract_secret(name, section)?)))
            .collect()
    }

    fn extract_secret(
        &self,
        name: &str,
        section: &SecretSection,
    ) -> Result<SecretSource, ConfigError> {
        match (&section.env, &section.file) {
            (Some(_), Some(file)) => Err(self.error(
                file,
                format!("secret {name} has both `env` and `file`; give one source"),
            )),
            (Some(env), None) => Ok(SecretSource::Env(env.get_ref().clone())),
            (None, Some(file)) => {
                // systemd's LoadCredential= puts credentials under $CREDENTIALS_DIRECTORY.
                let expanded = match std::env::var("CREDENTIALS_DIRECTORY") {
                    Ok(dir) => file.get_ref().replace("${CREDENTIALS_DIRECTORY}", &dir),
                    Err(_) => file.get_ref().clone(),
                };
                Ok(SecretSource::File(self.relative(&expanded)))
            }
            (None, None) => Ok(SecretSource::Env(name.to_owned())),
        }
    }

    pub(crate) fn extract_cors(
        &self,
        section: &CorsSection,
    ) -> Result<Arc<CorsPolicy>, ConfigError> {
        let strings = |list: &[SpannedString]| -> Vec<String> {
            list.iter().map(|s| s.get_ref().clone()).collect()
        };
        let tokens = |list: &Option<Spanned<Vec<String>>>| -> Vec<String> {
            list.as_ref()
                .map(|l| l.get_ref().clone())
                .unwrap_or_default()
        };
        let spec = CorsSpec {
            allowed_origins: strings(&section.allowed_origins),
            allowed_origin_patterns: strings(&section.allowed_origin_patterns),
            allowed_methods: tokens(&section.allowed_methods),
            allowed_headers: tokens(&section.allowed_headers),
            exposed_headers: tokens(&section.exposed_headers),
            allow_credentials: section
                .allow_credentials
                .as_ref()
                .is_some_and(|c| *c.get_ref()),
            max_age: section
                .max_age
                .as_ref()
                .map(|m| self.duration(m))
                .transpose()?,
            allow_missing_origin: section.allow_missing_origin.unwrap_or(true),
        };
        CorsPolicy::new(&spec)
            .map(Arc::new)
            .map_err(|e| self.cors_error(section, e))
    }

    /// Points a refusal of [`CorsPolicy::new`] back at the entry it is about.
    fn cors_error(&self, section: &CorsSection, e: CorsSpecError) -> ConfigError {
        match e {
            CorsSpecError::Origin { index, why } => {
                let entry = &section.allowed_origins[index];
                self.error(entry, format!("allowed origin {:?}: {why}", entry.get_ref()))
            }
            CorsSpecError::Pattern { index, why } => {
                let entry = &section.allowed_origin_patterns[index];
                self.error(entry, format!("allowed origin pattern is not a valid regular expression: {why}"))
            }
            CorsSpecError::Token { field, index } => {
                let list = match field {
                    "allowed_methods" => &section.allowed_methods,
                    "allowed_headers" => &section.allowed_headers,
                    _ => &section.exposed_headers,
                };
                self.error_at(
                    list.as_ref().map(Spanned::span),
                    format!("entry {} of `{field}` is not a valid HTTP token", index + 1),
                )
            }
            CorsSpecError::AnyWithCredentials => self.error_at(
                section.allow_credentials.as_ref().map(Spanned::span),
                "allowed origin \"*\" with allow_credentials = true is refused: browsers forbid it, list the origins instead",
            ),
        }
    }

    /// `[tls]`: its own listener, and the certificate files (read by `GatewayConfig::load`).
    pub(crate) fn extract_tls(
        &self,
        section: &TlsSection,
        listen: &str,
        admin: &str,
    ) -> Result<TlsListener, ConfigError> {
        let address = self.socket_address(&section.listen)?;
        if address == listen || address == admin {
            return Err(self.error(
                &section.listen,
                "the TLS listener needs an address of its own",
            ));
        }
        let certificates: &[CertificateSection] = section.certificates.get_ref();
        if certificates.is_empty() {
            return Err(self.error(
                &section.certificates,
                "list at least one [[tls.certificates]] with `cert` and `key`",
            ));
        }
        Ok(TlsListener {
            listen: address,
            certificate_files: certificates
                .iter()
                .map(|c| (self.named_file(&c.cert), self.named_file(&c.key)))
                .collect(),
            named_at: self.line_column(section.certificates.span().start),
            certificates: None,
        })
    }

    pub(crate) fn extract_limits(
        &self,
        section: &LimitsSection,
    ) -> Result<LimitSettings, ConfigError> {
        let defaults = LimitSettings::default();
        let count = |value: &Option<Spanned<i64>>, default: Option<u64>| {
            self.count_or_off(
                value.as_ref(),
                default,
                "a limit is a positive whole number, or 0 for none",
            )
        };
        // Saturate: a cap beyond what the counter holds is no cap in practice.
        let as_usize = |v: Option<u64>| v.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Ok(LimitSettings {
            upgrades_per_ip_per_second: count(
                &section.upgrades_per_ip_per_second,
                defaults.upgrades_per_ip_per_second.map(u64::from),
            )?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            websockets_per_ip: as_usize(count(
                &section.websockets_per_ip,
                defaults.websockets_per_ip.map(|n| n as u64),
            )?),
            websockets_total: as_usize(count(
                &section.websockets_total,
                defaults.websockets_total.map(|n| n as u64),
            )?),
            max_request_header_bytes: as_usize(count(
                &section.max_request_header_bytes,
                Some(defaults.max_request_header_bytes as u64),
            )?)
            .unwrap_or(usize::MAX),
            max_request_body_bytes: count(
                &section.max_request_body_bytes,
                defaults.max_request_body_bytes,
            )?,
            header_timeout: self
                .duration_or_off(section.header_timeout.as_ref(), defaults.header_timeout)?,
        })
    }

    pub(crate) fn extract_log(&self, section: &LogSection) -> Result<LogSettings, ConfigError> {
        let json = match &section.format {
            None => false,
            Some(f) => match f.get_ref().as_str() {
                "plain" => false,
                "json" => true,
                _ => return Err(self.error(f, "`format` is \"plain\" or \"json\"")),
            },
        };
        Ok(LogSettings {
            json,
            level: section
                .level
                .as_ref()
                .map_or_else(|| "info".to_owned(), |l| l.get_ref().clone()),
            access_log: section.access_log.unwrap_or(true),
        })
    }
}

/// A secret named only in `require` or `forward_secrets` is read from the environment
/// variable of its name.
pub(crate) fn add_required_secrets(secrets: &mut BTreeMap<String, SecretSource>, routes: &[Route]) {
    let named = routes
        .iter()
        .flat_map(|r| r.agents.values())
        .flat_map(|a| a.required_secrets.iter());
    for name in named {
        secrets
            .entry(name.clone())
            .or_insert_with(|| SecretSource::Env(name.clone()));
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, load_error_of, parse, GOOD};
    use crate::config::SecretSource;
    use std::path::Path;
    use std::time::Duration;

    fn with_server(lines: &str) -> String {
        GOOD.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
    }

    #[test]
    fn listeners_and_threads() {
        let err = error_of(&(GOOD.to_owned() + "[admin]\nlisten = \"127.0.0.1:8080\"\n"));
        assert!(
            err.starts_with(
                "gateway.toml:25:10: the admin listener must not be the public listener"
            ),
            "{err}"
        );
        let err = error_of(&GOOD.replace("127.0.0.1:8080", "localhost:8080"));
        assert!(
            err.contains("a listener is an IP address and port"),
            "{err}"
        );
        for bad in ["0", "257", "-1"] {
            let err = error_of(&with_server(&format!("threads = {bad}")));
            assert!(
                err.contains("`threads` must be a whole number from 1 to 256"),
                "{bad}: {err}"
            );
        }
        let config = parse(&with_server(
            "threads = 8\nupgrade_sock = \"up.sock\"\ndrain_grace = \"1m\"",
        ))
        .expect("valid");
        assert_eq!(config.threads, 8);
        assert_eq!(config.upgrade_sock, Path::new("up.sock"));
        assert_eq!(config.drain_grace, Duration::from_secs(60));
    }

    #[test]
    fn trusted_proxies() {
        let config =
            parse(&with_server("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]")).expect("valid");
        assert_eq!(config.trusted_proxies.len(), 2);
        let err = error_of(&with_server("trusted_proxies = [\"10.0.0.0/99\"]"));
        assert!(
            err.contains("a trusted proxy is an address or network"),
            "{err}"
        );
    }

    #[test]
    fn secrets_come_from_env_or_file() {
        let text = GOOD.to_owned()
            + "[secrets]\nOPENROUTER_API_KEY = { file = \"keys/or.txt\" }\nOTHER = { env = \"OTHER_VAR\" }\nPLAIN = {}\n";
        let secrets = parse(&text).expect("valid").secrets;
        assert_eq!(
            secrets["OPENROUTER_API_KEY"],
            SecretSource::File("keys/or.txt".into())
        );
        assert_eq!(secrets["OTHER"], SecretSource::Env("OTHER_VAR".to_owned()));
        assert_eq!(secrets["PLAIN"], SecretSource::Env("PLAIN".to_owned()));
        let err = error_of(&(GOOD.to_owned() + "[secrets]\nX = { env = \"X\", file = \"x\" }\n"));
        assert!(
            err.contains("secret X has both `env` and `file`; give one source"),
            "{err}"
        );
    }

    #[test]
    fn limits_zero_turns_off() {
        let text = GOOD.to_owned()
            + "[limits]\nwebsockets_total = 0\nmax_request_header_bytes = 0\nupgrades_per_ip_per_second = 5000000000\nheader_timeout = \"0s\"\n";
        let limits = parse(&text).expect("valid").limits;
        assert_eq!(limits.websockets_total, None);
        assert_eq!(limits.max_request_header_bytes, usize::MAX);
        assert_eq!(limits.upgrades_per_ip_per_second, Some(u32::MAX));
        assert_eq!(limits.header_timeout, None);
        let err = error_of(&(GOOD.to_owned() + "[limits]\nwebsockets_per_ip = -3\n"));
        assert!(
            err.contains("a limit is a positive whole number, or 0 for none"),
            "{err}"
        );
    }

    #[test]
    fn log_settings() {
        let log = parse(
            &(GOOD.to_owned()
                + "[log]\nformat = \"json\"\nlevel = \"debug\"\naccess_log = false\n"),
        )
        .expect("valid")
        .log;
        assert!(log.json && !log.access_log);
        assert_eq!(log.level, "debug");
        let err = error_of(&(GOOD.to_owned() + "[log]\nformat = \"xml\"\n"));
        assert!(err.contains("`format` is \"plain\" or \"json\""), "{err}");
    }

    #[test]
    fn cors_errors_point_at_the_entry() {
        let cors = |body: &str| GOOD.to_owned() + "[cors]\n" + body;
        let config = parse(&cors(
            "allowed_origins = [\"https://app.example\"]\nmax_age = \"10m\"\n",
        ))
        .expect("valid");
        assert!(config.cors.is_some());
        assert!(
            config.routes[0].cors.is_some(),
            "routes inherit the global policy"
        );
        let err = error_of(&cors("allowed_origin_patterns = [\"(\"]\n"));
        assert!(
            err.contains("allowed origin pattern is not a valid regular expression"),
            "{err}"
        );
        let err = error_of(&cors("allowed_methods = [\"G T\"]\n"));
        assert!(
            err.contains("entry 1 of `allowed_methods` is not a valid HTTP token"),
            "{err}"
        );
        let err = error_of(&cors(
            "allowed_origins = [\"*\"]\nallow_credentials = true\n",
        ));
        assert!(
            err.contains("allowed origin \"*\" with allow_credentials = true is refused"),
            "{err}"
        );
        let err = error_of(&cors("max_age = \"10\"\n"));
        assert!(err.contains("a duration is a number with a unit"), "{err}");
    }

    #[test]
    fn tls_needs_its_own_listener_and_certificates() {
        let tls = |listen: &str, certs: &str| {
            GOOD.to_owned() + &format!("[tls]\nlisten = \"{listen}\"\ncertificates = {certs}\n")
        };
        let err = error_of(&tls("127.0.0.1:9091", "[]"));
        assert!(
            err.contains("the TLS listener needs an address of its own"),
            "{err}"
        );
        let err = error_of(&tls("127.0.0.1:8443", "[]"));
        assert!(
            err.contains("list at least one [[tls.certificates]]"),
            "{err}"
        );
        let named = tls(
            "127.0.0.1:8443",
            "[{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }]",
        );
        assert!(
            parse(&named).is_ok(),
            "parsing must not read the certificates"
        );
        let err = load_error_of(&named);
        assert!(err.contains("cannot use the certificates: "), "{err}");
    }
}
