//! A node's own users, for people who log in with a password: `users.toml` in the data
//! directory, each user with an argon2id hash of their password (PHC string) and what they may
//! do on this node. Fleet grants to `user:NAME` add to that on every node where the user exists.
//!
//! Checking a password costs an argon2id hash (tens of milliseconds by design), so a check that
//! succeeded is remembered for a minute, keyed by a BLAKE3 hash of the user and password: a
//! client that sends Basic credentials with every request pays the hash once a minute, and no
//! password is kept in memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use shoal_protocol::RepoName;
use shoal_protocol::fleet::{Actions, Name, RepoPattern};

use super::AuthError;

/// File in the data directory holding the node's users.
pub const USERS_FILE: &str = "users.toml";
/// How long a successful password check is remembered.
const REMEMBER: Duration = Duration::from_secs(60);
/// Most remembered checks.
const MAX_REMEMBERED: usize = 1024;

/// One user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The login name.
    pub name: Name,
    /// argon2id PHC string of the password.
    pub hash: String,
    /// Which repositories the user may act on, on this node.
    #[serde(default = "RepoPattern::all")]
    pub repos: RepoPattern,
    /// What the user may do there (`"pull,push"`).
    #[serde(default, with = "actions_text")]
    pub actions: Actions,
}

/// Actions as their text form in `users.toml`.
mod actions_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use shoal_protocol::fleet::Actions;

    pub fn serialize<S: Serializer>(a: &Actions, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Actions, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Actions::NONE);
        }
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UsersFile {
    #[serde(default)]
    user: Vec<User>,
}

/// The node's users (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Arc<Vec<User>>,
    remembered: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
}

impl Users {
    /// The users in `data_dir`'s users file (none if there is no file). Blocking.
    pub fn read(data_dir: &Path) -> Result<Users, AuthError> {
        let path = data_dir.join(USERS_FILE);
        let users = match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str::<UsersFile>(&text)
                    .map_err(|e| AuthError::File(path.clone(), Box::new(e)))?
                    .user
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AuthError::File(path, Box::new(e))),
        };
        Ok(Users::from_list(users))
    }

    /// Users from a list.
    pub fn from_list(users: Vec<User>) -> Users {
        Users {
            users: Arc::new(users),
            remembered: Arc::default(),
        }
    }

    /// Writes the users file (atomically, mode 0600: it holds password hashes). Blocking.
    pub fn write(&self, data_dir: &Path) -> Result<(), AuthError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = data_dir.join(USERS_FILE);
        let err = |e: Box<dyn std::error::Error + Send + Sync>| AuthError::File(path.clone(), e);
        let text = toml::to_string(&UsersFile {
            user: self.users.as_ref().clone(),
        })
        .map_err(|e| err(e.into()))?;
        let tmp = data_dir.join(format!("{USERS_FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(e.into()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(e.into()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.into()))
    }

    /// The users.
    pub fn list(&self) -> &[User] {
        &self.users
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The same users with `user` added or replaced.
    pub fn with(&self, user: User) -> Users {
        let mut list: Vec<User> = self
            .users
            .iter()
            .filter(|u| u.name != user.name)
            .cloned()
            .collect();
        list.push(user);
        Users::from_list(list)
    }

    /// The same users without `name`.
    pub fn without(&self, name: &Name) -> Users {
        Users::from_list(
            self.users
                .iter()
                .filter(|u| &u.name != name)
                .cloned()
                .collect(),
        )
    }

    /// Whether `password` is `name`'s. Blocking (argon2id) unless remembered.
    pub fn verify(&self, name: &Name, password: &str) -> bool {
        let Some(user) = self.users.iter().find(|u| &u.name == name) else {
            return false;
        };
        let mut hasher = blake3::Hasher::new_derive_key("shoal remembered login v1");
        hasher.update(user.hash.as_bytes());
        hasher.update(&[0]);
        hasher.update(password.as_bytes());
        let fingerprint = *hasher.finalize().as_bytes();
        {
            let mut remembered = self
                .remembered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if remembered
                .get(&fingerprint)
                .is_some_and(|t| t.elapsed() < REMEMBER)
            {
                return true;
            }
            remembered.retain(|_, t| t.elapsed() < REMEMBER);
        }
        let ok = PasswordHash::new(&user.hash).is_ok_and(|hash| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        });
        if ok {
            let mut remembered = self
                .remembered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if remembered.len() < MAX_REMEMBERED {
                remembered.insert(fingerprint, Instant::now());
            }
        }
        ok
    }

    /// What `name` may do to `repo` on this node.
    pub fn allowed(&self, name: &Name, repo: &RepoName) -> Actions {
        self.users
            .iter()
            .filter(|u| &u.name == name && u.repos.matches(repo))
            .fold(Actions::NONE, |acc, u| acc.union(u.actions))
    }
}

/// The argon2id PHC string of `password`, with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_logs_in_with_the_right_password_only() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let users = Users::from_list(vec![User {
            name: "ana".parse().unwrap(),
            hash,
            repos: "team/*".parse().unwrap(),
            actions: "pull,push".parse().unwrap(),
        }]);
        let ana: Name = "ana".parse().unwrap();
        assert!(users.verify(&ana, "correct horse"));
        // Remembered now; still only for the right password.
        assert!(users.verify(&ana, "correct horse"));
        assert!(!users.verify(&ana, "wrong"));
        assert!(!users.verify(&"bob".parse().unwrap(), "correct horse"));
        assert_eq!(
            users.allowed(&ana, &"team/app".parse().unwrap()),
            "pull,push".parse().unwrap()
        );
        assert!(users.allowed(&ana, &"other".parse().unwrap()).is_empty());
    }

    #[test]
    fn the_file_round_trips_and_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let users = Users::from_list(Vec::new()).with(User {
            name: "ana".parse().unwrap(),
            hash: hash_password("pw").unwrap(),
            repos: RepoPattern::all(),
            actions: Actions::ALL,
        });
        users.write(dir.path()).unwrap();
        let back = Users::read(dir.path()).unwrap();
        assert_eq!(back.list(), users.list());
        let mode = std::fs::metadata(dir.path().join(USERS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
