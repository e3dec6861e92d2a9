//! Users named by their client certificate (mTLS): a `[[users]]` table with
//! `certificate = "CN=orders-svc"` (or `DNS=`, `email=`, `URI=` for a
//! subject alternative name) is the user of every verified client
//! certificate that carries that name. The certificate was verified by
//! rustls against `--tls-client-ca` before any of this runs; here it is
//! only read for its names.

use std::fmt;

use anyhow::bail;
use x509_cert::der::oid::db::{rfc4519, rfc5280};
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

/// Longest name compared; a longer one in a certificate is ignored.
const MAX_NAME: usize = 1024;
/// Names read from one certificate at most.
const MAX_NAMES: usize = 64;

/// Which field of a certificate a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// The subject's common name.
    Cn,
    /// A DNS subject alternative name (compared without case).
    Dns,
    /// An email (rfc822) subject alternative name.
    Email,
    /// A URI subject alternative name (a SPIFFE id, for one).
    Uri,
}

impl Field {
    fn label(self) -> &'static str {
        match self {
            Field::Cn => "CN",
            Field::Dns => "DNS",
            Field::Email => "email",
            Field::Uri => "URI",
        }
    }
}

/// One name: how a `[[users]]` table writes it, and what a certificate
/// carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertName {
    pub field: Field,
    /// Lower case for [`Field::Dns`], as written otherwise.
    pub value: String,
}

impl CertName {
    fn new(field: Field, value: &str) -> CertName {
        let value = match field {
            Field::Dns => value.to_ascii_lowercase(),
            _ => value.to_string(),
        };
        CertName { field, value }
    }

    /// Parses `CN=...`, `DNS=...`, `email=...` or `URI=...` (the prefix in
    /// any case).
    pub fn parse(user: &str, s: &str) -> anyhow::Result<CertName> {
        let Some((field, value)) = s.split_once('=') else {
            bail!("user {user:?}: certificate {s:?} must be CN=NAME, DNS=NAME, email=ADDRESS or URI=URI");
        };
        let field = match field.trim().to_ascii_lowercase().as_str() {
            "cn" => Field::Cn,
            "dns" => Field::Dns,
            "email" => Field::Email,
            "uri" => Field::Uri,
            other => bail!(
                "user {user:?}: certificate field {other:?} is not one of CN, DNS, email, URI"
            ),
        };
        if value.is_empty() || value.len() > MAX_NAME || value.chars().any(char::is_control) {
            bail!("user {user:?}: certificate {s:?} needs a name after '=' (at most {MAX_NAME} bytes, no control characters)");
        }
        Ok(CertName::new(field, value))
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.field.label(), self.value)
    }
}

/// The names of a client certificate: its subject CNs, then its DNS, email
/// and URI subject alternative names. Empty when the certificate does not
/// parse (it then names no user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames(pub Vec<CertName>);

impl CertNames {
    pub fn from_der(der: &[u8]) -> CertNames {
        let Ok(cert) = Certificate::from_der(der) else {
            return CertNames::default();
        };
        let tbs = &cert.tbs_certificate;
        let mut names = Vec::new();
        let mut push = |field, value: &str| {
            if names.len() < MAX_NAMES && !value.is_empty() && value.len() <= MAX_NAME {
                names.push(CertName::new(field, value));
            }
        };
        for rdn in tbs.subject.0.iter() {
            for atv in rdn.0.iter() {
                if atv.oid != rfc4519::CN {
                    continue;
                }
                // UTF8String, PrintableString, IA5String: text as it is.
                if matches!(
                    atv.value.tag(),
                    Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
                ) {
                    if let Ok(s) = std::str::from_utf8(atv.value.value()) {
                        push(Field::Cn, s);
                    }
                }
            }
        }
        for ext in tbs.extensions.iter().flatten() {
            if ext.extn_id != rfc5280::ID_CE_SUBJECT_ALT_NAME {
                continue;
            }
            let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) else {
                continue;
            };
            for g in &san.0 {
                match g {
                    GeneralName::DnsName(s) => push(Field::Dns, s.as_str()),
                    GeneralName::Rfc822Name(s) => push(Field::Email, s.as_str()),
                    GeneralName::UniformResourceIdentifier(s) => push(Field::Uri, s.as_str()),
                    _ => {}
                }
            }
        }
        CertNames(names)
    }

    /// For the log and the refusal: the names, comma separated (at most a few).
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "no CN or DNS/email/URI name".into();
        }
        let mut s: Vec<String> = self.0.iter().take(4).map(|n| n.to_string()).collect();
        if self.0.len() > 4 {
            s.push(format!("and {} more", self.0.len() - 4));
        }
        s.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_names_parse_and_bad_ones_say_why() {
        let n = CertName::parse("u", "CN=orders-svc").unwrap();
        assert_eq!((n.field, n.value.as_str()), (Field::Cn, "orders-svc"));
        let n = CertName::parse("u", "dns=Orders.Shop.svc").unwrap();
        assert_eq!((n.field, n.value.as_str()), (Field::Dns, "orders.shop.svc"));
        let n = CertName::parse("u", "URI=spiffe://shop/orders").unwrap();
        assert_eq!(n.to_string(), "URI=spiffe://shop/orders");
        for (bad, says) in [
            ("orders-svc", "must be CN=NAME"),
            ("OU=x", "is not one of"),
            ("CN=", "needs a name"),
        ] {
            let e = CertName::parse("u", bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn garbage_is_a_certificate_with_no_names() {
        assert!(CertNames::from_der(b"not a certificate").0.is_empty());
        assert!(CertNames::from_der(&[]).0.is_empty());
        assert!(CertNames::from_der(&[0x30, 0x82, 0xff, 0xff, 0x01])
            .0
            .is_empty());
    }
}
