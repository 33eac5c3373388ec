//! The API-key rule, shared by REST and gRPC: `Authorization: Bearer <key>`,
//! the scheme matched case-insensitively (RFC 7235), the key compared in
//! constant time (its length is not secret).

use subtle::ConstantTimeEq;

/// The credentials of an `Authorization` value with the `Bearer` scheme.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim_start_matches(' '))
}

/// Whether an `Authorization` value (absent: `None`) carries `key`.
pub fn authorized(value: Option<&str>, key: &str) -> bool {
    let given = value.and_then(bearer_token).unwrap_or("");
    bool::from(given.as_bytes().ct_eq(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_key_exact() {
        for ok in ["Bearer k1", "bearer k1", "BEARER k1", "bEaReR  k1"] {
            assert!(authorized(Some(ok), "k1"), "{ok}");
        }
        for bad in ["Bearer k2", "Basic k1", "Bearerk1", "k1", "Bearer k1 ", "Bearer K1"] {
            assert!(!authorized(Some(bad), "k1"), "{bad}");
        }
        assert!(!authorized(None, "k1"));
    }
}
