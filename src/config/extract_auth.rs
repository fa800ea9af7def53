//! `[auth.NAME]`: one extractor per policy, and one per method for the keys only that method
//! reads. A key given to a method that does not read it is an error that names the method
//! that does, so a typo'd policy never silently runs without a check the operator wrote.

use super::context::Ctx;
use super::file::{AuthSection, SpannedString};
use super::values::is_label_safe;
use super::{ConfigError, SecretSource};
use crate::auth::credential::CredentialSource;
use crate::auth::scope::InstanceScope;
use crate::auth::{
    ApiKeySettings, AuthMethod, AuthPolicy, ForwardSettings, JwtSettings, KeySource,
    DEFAULT_EXPIRY_CLOSE_CODE, DEFAULT_EXPIRY_CLOSE_REASON,
};
use http::header::HeaderName;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// The policy name that means "no authentication", for routes and agents.
pub(crate) const PUBLIC: &str = "none";
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// How often an unknown `kid` may make the gateway fetch a JWKS again: a client sending
/// made-up key ids cannot turn the gateway into a load generator against the issuer.
pub(crate) const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_SUBJECT_HEADER: &str = "x-auth-subject";

/// Headers no identity mapping may name: the gateway sets them itself, or they frame the
/// request or the upgrade.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "authorization",
    "cookie",
    "connection",
    "upgrade",
    "te",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

type Policies = BTreeMap<String, Arc<AuthPolicy>>;

impl Ctx<'_> {
    /// Every `[auth.NAME]` policy, by name. Secrets they name are added to `secrets` (from
    /// the environment variable of their name unless `[secrets]` says otherwise).
    pub(crate) fn extract_auth(
        &self,
        sections: &BTreeMap<String, AuthSection>,
        secrets: &mut BTreeMap<String, SecretSource>,
    ) -> Result<Policies, ConfigError> {
        let mut policies = BTreeMap::new();
        for (name, section) in sections {
            let policy = self.extract_policy(name, section)?;
            for secret in policy_secrets(&policy) {
                secrets
                    .entry(secret.clone())
                    .or_insert_with(|| SecretSource::Env(secret.clone()));
            }
            policies.insert(name.clone(), Arc::new(policy));
        }
        Ok(policies)
    }

    /// The policy a route or agent names: `None` for `"none"` (public).
    pub(crate) fn policy_named(
        &self,
        policies: &Policies,
        name: &SpannedString,
    ) -> Result<Option<Arc<AuthPolicy>>, ConfigError> {
        if name.get_ref() == PUBLIC {
            return Ok(None);
        }
        policies
            .get(name.get_ref())
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                let known: Vec<&str> = policies.keys().map(String::as_str).collect();
                self.error(
                    name,
                    format!(
                        "no [auth.{}] policy; known: {}, or \"none\"",
                        name.get_ref(),
                        super::values::list_or_none(&known)
                    ),
                )
            })
    }

    fn extract_policy(&self, name: &str, section: &AuthSection) -> Result<AuthPolicy, ConfigError> {
        let Some(method_name) = &section.method else {
            return Err(self.error_at(
                None,
                format!("[auth.{name}] needs a `method`: \"jwt\", \"api_key\" or \"forward\""),
            ));
        };
        if !is_label_safe(name) || name == PUBLIC {
            return Err(self.error(
                method_name,
                format!(
                    "policy name {name:?} must be letters, digits, '-' and '_', and not \"none\""
                ),
            ));
        }
        let method = match method_name.get_ref().as_str() {
            "jwt" => AuthMethod::Jwt(self.extract_jwt(section, method_name)?),
            "api_key" => AuthMethod::ApiKeys(self.extract_api_keys(section, method_name)?),
            "forward" => AuthMethod::Forward(self.extract_forward(section, method_name)?),
            _ => {
                return Err(self.error(
                    method_name,
                    "`method` is \"jwt\", \"api_key\" or \"forward\" (\"none\" is written on the route)",
                ))
            }
        };
        self.only_for(section, &method)?;
        let credentials = match &section.credentials {
            None => vec![CredentialSource::Bearer],
            Some(list) if list.is_empty() => {
                return Err(self.error(method_name, "`credentials` lists no source"));
            }
            Some(list) => list
                .iter()
                .map(|c| CredentialSource::parse(c.get_ref()).map_err(|why| self.error(c, why)))
                .collect::<Result<_, _>>()?,
        };
        let (expiry_close_code, expiry_close_reason) = self.expiry_close(section)?;
        Ok(AuthPolicy {
            name: name.to_owned(),
            method,
            credentials,
            scope: InstanceScope {
                instance_claim: section.instance_claim.as_ref().map(|c| c.get_ref().clone()),
                patterns_claim: section.scope_claim.as_ref().map(|c| c.get_ref().clone()),
            },
            identity_headers: self.identity_headers(section.identity_headers.as_ref())?,
            sign_with: section
                .sign_with
                .as_ref()
                .map(|s| self.secret_name(s))
                .transpose()?,
            expiry_close_code,
            expiry_close_reason,
            max_websockets_per_subject: self
                .count_or_off(
                    section.max_websockets_per_subject.as_ref(),
                    None,
                    "`max_websockets_per_subject` is a count; 0 is no limit",
                )?
                .map(|n| n as usize),
            upgrades_per_subject_per_second: self
                .count_or_off(
                    section.upgrades_per_subject_per_second.as_ref(),
                    None,
                    "`upgrades_per_subject_per_second` is a count; 0 is no limit",
                )?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        })
    }

    fn extract_jwt(
        &self,
        section: &AuthSection,
        method: &SpannedString,
    ) -> Result<JwtSettings, ConfigError> {
        let algorithms: Vec<jsonwebtoken::Algorithm> = match &section.algorithms {
            Some(list) if !list.is_empty() => list
                .iter()
                .map(|a| match a.get_ref().parse::<jsonwebtoken::Algorithm>() {
                    Ok(algorithm) => Ok(algorithm),
                    Err(_) => Err(self.error(
                        a,
                        "an algorithm is one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(self.error(
                    method,
                    "a jwt policy lists its `algorithms` (for example [\"RS256\"]): the gateway accepts no algorithm it was not told to",
                ))
            }
        };
        let refresh = self.duration_or(section.jwks_refresh.as_ref(), DEFAULT_JWKS_REFRESH)?;
        let keys = match (&section.jwks_url, &section.jwks_file, &section.key_secret) {
            (Some(url), None, None) => {
                let text = url.get_ref();
                if !(text.starts_with("http://") || text.starts_with("https://")) {
                    return Err(self.error(url, "`jwks_url` is an http:// or https:// URL"));
                }
                KeySource::JwksUrl {
                    url: text.clone(),
                    refresh,
                    min_refetch: JWKS_MIN_REFETCH.min(refresh),
                }
            }
            (None, Some(file), None) => KeySource::JwksFile(self.relative(file.get_ref())),
            (None, None, Some(secret)) => KeySource::Secret(self.secret_name(secret)?),
            _ => {
                return Err(self.error(
                    method,
                    "a jwt policy takes its keys from exactly one of `jwks_url`, `jwks_file` and `key_secret`",
                ))
            }
        };
        let strings = |list: &Option<Vec<SpannedString>>| -> Vec<String> {
            list.iter().flatten().map(|s| s.get_ref().clone()).collect()
        };
        Ok(JwtSettings {
            algorithms,
            keys,
            issuers: strings(&section.issuers),
            audiences: strings(&section.audiences),
            leeway: self.duration_or(section.leeway.as_ref(), DEFAULT_LEEWAY)?,
        })
    }

    fn extract_api_keys(
        &self,
        section: &AuthSection,
        method: &SpannedString,
    ) -> Result<ApiKeySettings, ConfigError> {
        let Some(keys) = section.keys.as_ref().filter(|k| !k.get_ref().is_empty()) else {
            return Err(self.error(
                method,
                "an api_key policy lists its `keys`: { subject = \"SECRET_NAME\" }",
            ));
        };
        let keys = keys
            .get_ref()
            .iter()
            .map(|(subject, secret)| {
                if !is_label_safe(subject) {
                    return Err(self.error(
                        secret,
                        format!("API key subject {subject:?} must be letters, digits, '-' and '_'"),
                    ));
                }
                Ok((subject.clone(), self.secret_name(secret)?))
            })
            .collect::<Result<_, _>>()?;
        Ok(ApiKeySettings { keys })
    }

    fn extract_forward(
        &self,
        section: &AuthSection,
        method: &SpannedString,
    ) -> Result<ForwardSettings, ConfigError> {
        let Some(url) = &section.url else {
            return Err(self.error(method, "a forward policy needs the auth service's `url`"));
        };
        if !(url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://")) {
            return Err(self.error(url, "`url` is an http:// or https:// URL"));
        }
        let subject_header = match &section.subject_header {
            Some(h) => self.header_name(h)?,
            None => HeaderName::from_static(DEFAULT_SUBJECT_HEADER),
        };
        let identity_from = section
            .identity_from
            .iter()
            .flatten()
            .map(|h| self.header_name(h))
            .collect::<Result<_, _>>()?;
        Ok(ForwardSettings {
            url: url.get_ref().clone(),
            timeout: self.duration_or(section.timeout.as_ref(), DEFAULT_FORWARD_TIMEOUT)?,
            cache_ttl: self.duration_or(section.cache.as_ref(), Duration::ZERO)?,
            subject_header,
            identity_from,
        })
    }

    /// Refuses keys the method does not read.
    fn only_for(&self, section: &AuthSection, method: &AuthMethod) -> Result<(), ConfigError> {
        let given = |v: Option<std::ops::Range<usize>>, key: &str, owner: &str, kind: &str| match v
        {
            Some(span) if kind != owner => Err(self.error_at(
                Some(span),
                format!("`{key}` is for method \"{owner}\" policies, not \"{kind}\""),
            )),
            _ => Ok(()),
        };
        let kind = method.label();
        let span = |v: &Option<SpannedString>| v.as_ref().map(Spanned::span);
        let list_span =
            |v: &Option<Vec<SpannedString>>| v.as_ref().and_then(|l| l.first()).map(Spanned::span);
        given(list_span(&section.algorithms), "algorithms", "jwt", kind)?;
        given(span(&section.jwks_url), "jwks_url", "jwt", kind)?;
        given(span(&section.jwks_file), "jwks_file", "jwt", kind)?;
        given(span(&section.jwks_refresh), "jwks_refresh", "jwt", kind)?;
        given(span(&section.key_secret), "key_secret", "jwt", kind)?;
        given(list_span(&section.issuers), "issuers", "jwt", kind)?;
        given(list_span(&section.audiences), "audiences", "jwt", kind)?;
        given(span(&section.leeway), "leeway", "jwt", kind)?;
        given(
            section.keys.as_ref().map(Spanned::span),
            "keys",
            "api_key",
            kind,
        )?;
        given(span(&section.url), "url", "forward", kind)?;
        given(span(&section.timeout), "timeout", "forward", kind)?;
        given(span(&section.cache), "cache", "forward", kind)?;
        given(
            span(&section.subject_header),
            "subject_header",
            "forward",
            kind,
        )?;
        given(
            list_span(&section.identity_from),
            "identity_from",
            "forward",
            kind,
        )
    }

    fn expiry_close(&self, section: &AuthSection) -> Result<(u16, String), ConfigError> {
        let code = match &section.expiry_close_code {
            None => DEFAULT_EXPIRY_CLOSE_CODE,
            Some(c) => u16::try_from(*c.get_ref())
                .ok()
                .filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999))
                .ok_or_else(|| {
                    self.error(c, "`expiry_close_code` is a Close code a peer may send: 1000-1003, 1007-1014 or 3000-4999")
                })?,
        };
        let reason = match &section.expiry_close_reason {
            None => DEFAULT_EXPIRY_CLOSE_REASON.to_owned(),
            Some(r) if r.get_ref().len() > 123 => {
                return Err(self.error(r, "a Close reason is at most 123 bytes"));
            }
            Some(r) => r.get_ref().clone(),
        };
        Ok((code, reason))
    }

    fn identity_headers(
        &self,
        mapping: Option<&Spanned<BTreeMap<String, SpannedString>>>,
    ) -> Result<Vec<(String, HeaderName)>, ConfigError> {
        let Some(mapping) = mapping else {
            return Ok(Vec::new());
        };
        mapping
            .get_ref()
            .iter()
            .map(|(claim, header)| {
                let name = self.header_name(header)?;
                let folded = name.as_str().replace('_', "-");
                let reserved = RESERVED_HEADERS.contains(&folded.as_str())
                    || ["x-partykit-", "x-gateway-", "sec-websocket-", "proxy-"]
                        .iter()
                        .any(|prefix| folded.starts_with(prefix));
                if reserved {
                    return Err(self.error(
                        header,
                        format!("{} is a header the gateway sets or reads itself; name the identity header otherwise (for example x-user-id)", name.as_str()),
                    ));
                }
                Ok((claim.clone(), name))
            })
            .collect()
    }

    fn header_name(&self, value: &SpannedString) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(value.get_ref().to_ascii_lowercase().as_bytes())
            .map_err(|_| self.error(value, "not a valid header name"))
    }
}

/// The secrets a policy reads.
pub(crate) fn policy_secrets(policy: &AuthPolicy) -> Vec<&String> {
    let mut names: Vec<&String> = policy.sign_with.iter().collect();
    match &policy.method {
        AuthMethod::Jwt(JwtSettings {
            keys: KeySource::Secret(secret),
            ..
        }) => names.push(secret),
        AuthMethod::ApiKeys(settings) => names.extend(settings.keys.iter().map(|(_, s)| s)),
        _ => {}
    }
    names
}

#[cfg(test)]
mod tests {
    use crate::auth::{AuthMethod, KeySource};
    use crate::config::tests::{error_of, parse, GOOD};

    fn with_auth(auth: &str) -> String {
        format!("{GOOD}\n{auth}")
    }

    #[test]
    fn a_jwt_policy_with_its_defaults() {
        let config = parse(&with_auth(
            "[auth.users]\nmethod = \"jwt\"\nalgorithms = [\"RS256\", \"ES256\"]\njwks_url = \"https://id.example.com/jwks.json\"\n",
        ))
        .unwrap();
        let policy = &config.auth_policies["users"];
        assert_eq!(policy.credentials.len(), 1);
        assert_eq!(policy.expiry_close_code, 1008);
        let AuthMethod::Jwt(jwt) = &policy.method else {
            panic!("not jwt")
        };
        assert_eq!(jwt.algorithms.len(), 2);
        assert!(matches!(&jwt.keys, KeySource::JwksUrl { url, .. } if url.ends_with("jwks.json")));
    }

    #[test]
    fn secrets_a_policy_names_are_read() {
        let config = parse(&with_auth(
            "[auth.keys]\nmethod = \"api_key\"\nkeys = { ci = \"CI_KEY\" }\nsign_with = \"SIGNING\"\n",
        ))
        .unwrap();
        assert!(config.secrets.contains_key("CI_KEY"));
        assert!(config.secrets.contains_key("SIGNING"));
    }

    #[test]
    fn faults_are_named() {
        let cases = [
            ("[auth.a]\nalgorithms = [\"HS256\"]\n", "needs a `method`"),
            ("[auth.a]\nmethod = \"basic\"\n", "`method` is"),
            ("[auth.a]\nmethod = \"jwt\"\njwks_file = \"k.json\"\n", "lists its `algorithms`"),
            ("[auth.a]\nmethod = \"jwt\"\nalgorithms = [\"none\"]\njwks_file = \"k\"\n", "an algorithm is one of"),
            ("[auth.a]\nmethod = \"jwt\"\nalgorithms = [\"RS256\"]\n", "exactly one of"),
            ("[auth.a]\nmethod = \"api_key\"\nkeys = { ci = \"K\" }\nurl = \"http://x\"\n", "`url` is for method \"forward\""),
            ("[auth.a]\nmethod = \"forward\"\nurl = \"ftp://x\"\n", "http:// or https://"),
            ("[auth.a]\nmethod = \"forward\"\nurl = \"http://x\"\nidentity_headers = { sub = \"x-partykit-room\" }\n", "the gateway sets or reads"),
            ("[auth.a]\nmethod = \"forward\"\nurl = \"http://x\"\nexpiry_close_code = 1006\n", "`expiry_close_code`"),
            ("[auth.a]\nmethod = \"forward\"\nurl = \"http://x\"\ncredentials = [\"header:x\"]\n", "not a credential source"),
            ("[auth.none]\nmethod = \"forward\"\nurl = \"http://x\"\n", "and not \"none\""),
            ("[auth.a]\nmethod = \"forward\"\nurl = \"http://x\"\nbogus = 1\n", "unknown field"),
        ];
        for (auth, expected) in cases {
            let error = error_of(&with_auth(auth));
            assert!(error.contains(expected), "{auth}: {error}");
        }
    }
}
