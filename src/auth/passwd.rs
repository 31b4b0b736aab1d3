//! Password hashes: argon2 PHC strings, made by `mqgate passwd` and checked at CONNECT.
//!
//! Pure CPU work, no I/O. Verifying costs tens of milliseconds of CPU by design, so callers in
//! async code run [`verify`] on the blocking pool (see [`super::Authenticator`]).

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, PasswordHash};
use thiserror::Error;

/// Why a `password_hash` from the config is not usable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HashError {
    /// Not a PHC string at all.
    #[error("not a PHC string ({0})")]
    Syntax(String),
    /// A PHC string of another algorithm (bcrypt, scrypt...).
    #[error("algorithm {0:?} is not argon2 (argon2id, argon2i or argon2d)")]
    Algorithm(String),
    /// Bad or missing argon2 parameters, salt or output.
    #[error("invalid argon2 parameters or missing salt/hash ({0})")]
    Params(String),
}

/// Parses and checks a PHC string: an argon2 variant, valid parameters, a salt and a hash.
pub fn parse_hash(phc: &str) -> Result<PasswordHash, HashError> {
    let hash = PasswordHash::new(phc).map_err(|e| HashError::Syntax(e.to_string()))?;
    Algorithm::try_from(hash.algorithm.as_str())
        .map_err(|_| HashError::Algorithm(hash.algorithm.as_str().to_owned()))?;
    Params::try_from(&hash).map_err(|e| HashError::Params(e.to_string()))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(HashError::Params("no salt or no hash".into()));
    }
    Ok(hash)
}

/// Hashes `password` with argon2id, the crate's default parameters and a random salt; returns
/// the PHC string to put under `users:`. This is what `mqgate passwd` prints.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default().hash_password(password).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// True when `password` matches `hash` (with the parameters stored in the hash). CPU-heavy.
pub fn verify(password: &[u8], hash: &PasswordHash) -> bool {
    Argon2::default().verify_password(password, hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let phc = hash_password(b"s3cret").expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        let parsed = parse_hash(&phc).expect("own output parses");
        assert!(verify(b"s3cret", &parsed));
        assert!(!verify(b"s3cret ", &parsed));
    }

    #[test]
    fn bad_hashes_are_refused() {
        assert!(matches!(parse_hash("plaintext"), Err(HashError::Syntax(_))));
        assert!(matches!(
            parse_hash("$2b$12$abcdefghijklmnopqrstuv"),
            Err(HashError::Syntax(_) | HashError::Algorithm(_))
        ));
        assert!(matches!(
            parse_hash("$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E"),
            Err(HashError::Algorithm(_))
        ));
        assert!(parse_hash("$argon2id$v=19$m=19456,t=2,p=1").is_err(), "no salt and hash");
    }
}
