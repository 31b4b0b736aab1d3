//! Who may connect, and what a connected client may publish and subscribe to.
//!
//! No I/O. Password verification is deliberately slow CPU work (argon2, tens of milliseconds),
//! so [`Authenticator::authenticate`] runs it on tokio's blocking pool, never on an async
//! worker, and at most [`MAX_CONCURRENT_VERIFICATIONS`] at once so a flood of CONNECTs cannot
//! take the machine. The ACL ([`acl`]) is compiled once and specialised per connection.
//!
//! - `passwd.rs`: argon2 PHC hashes (`mqgate passwd`, config validation, verification).
//! - `acl.rs`: the `acl:` list and its per-connection form.

pub mod acl;
pub mod backoff;
pub mod passwd;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use argon2::PasswordHash;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Config;
use acl::Acl;

/// Password verifications running at once; further CONNECTs wait (within their CONNECT
/// timeout) for a turn.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;

/// A config whose users cannot be compiled (the config validation normally catches it first).
#[derive(Debug, Error)]
pub enum AuthError {
    /// An unusable `password_hash`.
    #[error("users: {user:?}: password_hash: {source}")]
    BadHash {
        /// The user name.
        user: String,
        /// What is wrong.
        source: passwd::HashError,
    },
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user, wrong or missing password, or a password without a user name
    /// (CONNACK 0x86 / 3.1.1 return code 4).
    BadCredentials,
    /// No user name while `mqtt.allow_anonymous` is false (0x87 / 5).
    NotAuthorized,
    /// No verification slot within the CONNECT timeout (0x89 / 3).
    Busy,
}

impl Refusal {
    /// A short fixed label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::Busy => "busy",
        }
    }
}

/// Users, the anonymous policy and the ACL: everything needed to admit and police clients.
#[derive(Debug)]
pub struct Authenticator {
    /// Configured users and their parsed hashes.
    users: HashMap<String, Arc<PasswordHash>>,
    /// Users limited to client id patterns (`users[].client_ids`).
    client_ids: HashMap<String, Vec<String>>,
    /// `mqtt.allow_anonymous`.
    allow_anonymous: bool,
    /// Bounds concurrent verifications.
    verifying: Arc<Semaphore>,
    /// The compiled ACL.
    pub acl: Acl,
}

impl Authenticator {
    /// Compiles `users:`, `mqtt.allow_anonymous` and `acl:`.
    pub fn from_config(config: &Config) -> Result<Authenticator, AuthError> {
        let mut users = HashMap::new();
        let mut client_ids = HashMap::new();
        for u in &config.users {
            if !u.client_ids.is_empty() {
                let patterns = u.client_ids.iter().map(|p| p.value.clone()).collect();
                client_ids.insert(u.username.value.clone(), patterns);
            }
            let hash = passwd::parse_hash(&u.password_hash.value)
                .map_err(|source| AuthError::BadHash { user: u.username.value.clone(), source })?;
            users.insert(u.username.value.clone(), Arc::new(hash));
        }
        Ok(Authenticator {
            users,
            client_ids,
            allow_anonymous: config.mqtt.allow_anonymous,
            verifying: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
            acl: Acl::compile(&config.acl, config.acl_default),
        })
    }

    /// Whether clients without a user name may connect (`mqtt.allow_anonymous`).
    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Whether `user` is a configured user (for counting failed logins by reason).
    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether `user` may use `client_id` (its `client_ids` patterns; any without).
    pub fn client_id_allowed(&self, user: Option<&str>, client_id: &str) -> bool {
        match user.and_then(|u| Some((u, self.client_ids.get(u)?))) {
            Some((u, patterns)) => acl::client_id_allowed(patterns, u, client_id),
            None => true,
        }
    }

    /// Checks CONNECT credentials. A user name is accepted only as a configured user with the
    /// right password; without one, only when anonymous clients are allowed. Waits for a
    /// verification slot until `deadline`.
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let Some(username) = username else {
            return match (password, self.allow_anonymous) {
                (Some(_), _) => Err(Refusal::BadCredentials),
                (None, true) => Ok(()),
                (None, false) => Err(Refusal::NotAuthorized),
            };
        };
        // An unknown user costs a verification too, so timing does not tell which names exist.
        let hash = self.users.get(username).cloned();
        let given = password.is_some();
        let password = password.map(<[u8]>::to_vec);
        let permit = tokio::time::timeout_at(deadline, Arc::clone(&self.verifying).acquire_owned())
            .await
            .map_err(|_| Refusal::Busy)?
            .map_err(|_| Refusal::Busy)?;
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let password = password.unwrap_or_default();
            match hash {
                Some(hash) => passwd::verify(&password, &hash) && given,
                None => {
                    passwd::verify(&password, decoy_hash());
                    false
                }
            }
        })
        .await
        .unwrap_or(false);
        if verified {
            Ok(())
        } else {
            Err(Refusal::BadCredentials)
        }
    }
}

/// A hash checked against for unknown users (made once, on the blocking pool).
fn decoy_hash() -> &'static PasswordHash {
    static DECOY: OnceLock<PasswordHash> = OnceLock::new();
    DECOY.get_or_init(|| {
        passwd::hash_password(b"mqgate decoy")
            .ok()
            .and_then(|phc| passwd::parse_hash(&phc).ok())
            .unwrap_or_else(|| PasswordHash {
                algorithm: argon2::ARGON2ID_IDENT,
                version: None,
                params: Default::default(),
                salt: None,
                hash: None,
            })
    })
}
