//! Signatures: the Standard Webhooks scheme and courier's `mr-signature`.
//!
//! Signing is the last step before sending, over the exact bytes that go on the wire, so that a
//! transform can never invalidate a signature.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a secret is not usable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("secret must start with `whsec_`")]
    Prefix,
    #[error("the part after `whsec_` is not valid base64")]
    Base64,
    #[error("the decoded secret must be between 8 and 128 bytes")]
    Length,
}

/// Decodes the key bytes of a `whsec_…` secret.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let b64 = secret.strip_prefix("whsec_").ok_or(SecretError::Prefix)?;
    let key = B64.decode(b64).map_err(|_| SecretError::Base64)?;
    if !(8..=128).contains(&key.len()) {
        return Err(SecretError::Length);
    }
    Ok(key)
}

/// A fresh random `whsec_` secret (24 random bytes).
pub fn generate_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("whsec_{}", B64.encode(bytes))
}

/// One `v1,<base64>` Standard Webhooks signature.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("hmac takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The `mr-signature` value for one secret: hex HMAC-SHA256 of the body keyed with the secret
/// text as configured.
pub fn mr_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The signature headers for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Signatures {
    /// `webhook-signature`: space-separated `v1,…` entries, one per secret.
    pub webhook_signature: String,
    /// `mr-signature`: comma-separated hex values, one per secret.
    pub mr_signature: String,
}

/// Signs `body` with every secret. Secrets were validated when the config loaded; one that
/// fails to decode here is skipped rather than sent as a wrong signature.
pub fn sign_all(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> Signatures {
    let mut std_sigs = Vec::with_capacity(secrets.len());
    let mut mr = Vec::with_capacity(secrets.len());
    for s in secrets {
        if let Ok(key) = decode_secret(s) {
            std_sigs.push(standard_signature(&key, id, timestamp, body));
            mr.push(mr_signature(s, body));
        }
    }
    Signatures {
        webhook_signature: std_sigs.join(" "),
        mr_signature: mr.join(","),
    }
}

/// Why a received webhook does not verify.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("no signature matches the secret")]
    Mismatch,
    #[error("timestamp is {0} seconds away from now (tolerance 300)")]
    Stale(i64),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Verifies a Standard Webhooks signature header, as a receiver would (used by `courier
/// verify` and the tests). Constant-time comparison; any one matching `v1,` entry passes.
pub fn verify_standard(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: Option<i64>,
) -> Result<(), VerifyError> {
    if let Some(now) = now {
        let skew = now.saturating_sub(timestamp);
        if skew.saturating_abs() > 300 {
            return Err(VerifyError::Stale(skew));
        }
    }
    let key = decode_secret(secret)?;
    let expected = standard_signature(&key, id, timestamp, body);
    header
        .split(' ')
        .any(|entry| bool::from(entry.as_bytes().ct_eq(expected.as_bytes())))
        .then_some(())
        .ok_or(VerifyError::Mismatch)
}

/// Verifies an `mr-signature` header value (one or several comma-separated hex digests).
pub fn verify_mr(secret: &str, body: &[u8], header: &str) -> Result<(), VerifyError> {
    let expected = mr_signature(secret, body);
    header
        .split(',')
        .any(|v| bool::from(v.trim().as_bytes().ct_eq(expected.as_bytes())))
        .then_some(())
        .ok_or(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_decode() {
        let s = generate_secret();
        assert_eq!(decode_secret(&s).unwrap().len(), 24);
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn a_timestamp_at_the_ends_of_the_range_is_stale_not_a_crash() {
        let s = generate_secret();
        let sigs = sign_all(std::slice::from_ref(&s), "msg_1", i64::MIN, b"{}");
        for (ts, now) in [(i64::MIN, 1_700_000_000), (i64::MAX, -5)] {
            assert!(matches!(
                verify_standard(&s, "msg_1", ts, b"{}", &sigs.webhook_signature, Some(now)),
                Err(VerifyError::Stale(_))
            ));
        }
    }

    #[test]
    fn bad_secrets() {
        assert_eq!(decode_secret("abc"), Err(SecretError::Prefix));
        assert_eq!(decode_secret("whsec_!!!"), Err(SecretError::Base64));
        assert_eq!(decode_secret("whsec_YQ=="), Err(SecretError::Length));
    }

    #[test]
    fn several_secrets_sign_together() {
        let a = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let b = generate_secret();
        let sigs = sign_all(&[a.clone(), b.clone()], "msg_1", 1000, b"{}");
        assert_eq!(sigs.webhook_signature.split(' ').count(), 2);
        assert_eq!(sigs.mr_signature.split(',').count(), 2);
        for s in [&a, &b] {
            verify_standard(s, "msg_1", 1000, b"{}", &sigs.webhook_signature, None).unwrap();
            verify_mr(s, b"{}", &sigs.mr_signature).unwrap();
        }
        let other = generate_secret();
        assert_eq!(
            verify_standard(&other, "msg_1", 1000, b"{}", &sigs.webhook_signature, None),
            Err(VerifyError::Mismatch)
        );
    }
}
