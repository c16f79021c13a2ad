//! Client side of SCRAM-SHA-256 (RFC 5802/7677) without channel binding: the
//! proxy logging in to a server. The salted password (4096 or more rounds of
//! PBKDF2, about 0.5 ms at 4096) depends only on the password and the role's
//! salt and iteration count, which the server sends at every login; a pool
//! keeps it in a [`SaltedPasswordCache`], so only its first connection derives
//! it (on tokio's blocking pool, see `server_conn`).

use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use subtle::ConstantTimeEq;

use super::scram::{Keys, ScramError, attr, hmac, normalize, salted_password};

/// The GS2 header "n,," (no channel binding, no authorization identity), base64.
const GS2_HEADER_B64: &str = "biws";

/// A salted password with the salt and iteration count it was derived for.
struct Salted {
    params: SaltParams,
    key: [u8; 32],
}

/// The salted password of a pool's last login, shared by its connections. It
/// belongs to one password (a pool's: a changed `server_password` makes new
/// pools). `Debug` shows nothing of it.
#[derive(Clone, Default)]
pub struct SaltedPasswordCache(Arc<Mutex<Option<Salted>>>);

impl std::fmt::Debug for SaltedPasswordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaltedPasswordCache(..)")
    }
}

impl SaltedPasswordCache {
    /// The salted password kept for these parameters, if any (a role whose
    /// password was set again has a new salt).
    fn lookup(&self, params: &SaltParams) -> Option<[u8; 32]> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|s| s.params == *params)
            .map(|s| s.key)
    }

    /// Keeps `key`, the salted password for `params`, for later logins.
    fn store(&self, params: SaltParams, key: [u8; 32]) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Salted { params, key });
    }
}

/// The highest iteration count a server may ask for. PostgreSQL's default is
/// 4096 (`scram_iterations`, up to `INT_MAX` since version 16); ten million
/// rounds take about 1.3 s of one blocking-pool thread, which no login
/// timeout interrupts, and more would let a server (or whoever impersonates it
/// on a plain-TCP path) keep a thread busy for minutes per login attempt.
pub const MAX_SERVER_ITERATIONS: u32 = 10_000_000;

/// The salt and iteration count a server sent in its server-first message.
#[derive(Clone, PartialEq, Eq)]
struct SaltParams {
    salt: Vec<u8>,
    iterations: u32,
}

/// One login's exchange, from the client-first message to the server's
/// signature.
pub struct ScramClient {
    password: Arc<[u8]>,
    client_first_bare: String,
    nonce: String,
    /// The server-first message and its nonce, once received.
    server_first: Option<(String, String)>,
    /// The server signature expected in server-final, once client-final is made.
    expected: Option<[u8; 32]>,
}

impl ScramClient {
    /// Starts a login with a fresh nonce. PostgreSQL ignores SCRAM's user name
    /// (the startup packet has it), so it is sent empty, as libpq does.
    pub fn new(password: &str) -> Self {
        let mut raw = [0u8; 18];
        rand::fill(&mut raw[..]);
        Self::with_nonce(password, "", &B64.encode(raw))
    }

    fn with_nonce(password: &str, user: &str, nonce: &str) -> Self {
        ScramClient {
            password: normalize(password).into(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_owned(),
            server_first: None,
            expected: None,
        }
    }

    /// The client-first message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers the server-first message with the client-final one. The salted
    /// password comes from `cache` when it holds the one for this salt;
    /// otherwise it is derived on tokio's blocking pool (PBKDF2 at the
    /// server's iteration count, about 0.5 ms at 4096) and kept there.
    pub async fn answer(&mut self, server_first: &[u8], cache: &SaltedPasswordCache) -> Result<String, ScramError> {
        let params = self.server_first(server_first)?;
        let salted = match cache.lookup(&params) {
            Some(key) => key,
            None => {
                let (password, p) = (self.password.clone(), params.clone());
                let key = tokio::task::spawn_blocking(move || salted_password(&password, &p.salt, p.iterations))
                    .await
                    .map_err(|_| ScramError::Interrupted)?;
                cache.store(params, key);
                key
            }
        };
        self.client_final(&salted)
    }

    /// Reads the server-first message; returns the salt and iteration count
    /// the salted password is derived with.
    fn server_first(&mut self, server_first: &[u8]) -> Result<SaltParams, ScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut fields = msg.split(',');
        let nonce = attr(fields.next(), 'r')?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramError::Malformed("the server nonce does not extend ours"));
        }
        let salt = B64
            .decode(attr(fields.next(), 's')?)
            .map_err(|_| ScramError::Malformed("invalid salt encoding"))?;
        let iterations: u32 = attr(fields.next(), 'i')?
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed("invalid iteration count"))?;
        if iterations > MAX_SERVER_ITERATIONS {
            return Err(ScramError::TooManyIterations(iterations));
        }
        self.server_first = Some((msg.to_owned(), nonce.to_owned()));
        Ok(SaltParams { salt, iterations })
    }

    /// The client-final message, proving knowledge of `salted`, the salted
    /// password for what [`ScramClient::server_first`] returned.
    fn client_final(&mut self, salted: &[u8; 32]) -> Result<String, ScramError> {
        let (msg, nonce) = self
            .server_first
            .as_ref()
            .ok_or(ScramError::Malformed("client-final before server-first"))?;
        let without_proof = format!("c={GS2_HEADER_B64},r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let keys = Keys::of(salted);
        let mut proof = hmac(&keys.stored, &[auth_message.as_bytes()]);
        proof.iter_mut().zip(keys.client.iter()).for_each(|(p, k)| *p ^= k);
        self.expected = Some(hmac(&keys.server, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server proves it knows the password.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(error) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let expected = self
            .expected
            .ok_or(ScramError::Malformed("server-final before client-final"))?;
        let signature = B64
            .decode(attr(msg.split(',').next(), 'v')?)
            .map_err(|_| ScramError::Malformed("invalid signature encoding"))?;
        if bool::from(signature.as_slice().ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ScramError::InvalidServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ScramExchange, ScramSecret};

    /// The example exchange of RFC 7677, section 3.
    #[tokio::test]
    async fn rfc7677_example() {
        let mut client = ScramClient::with_nonce("pencil", "user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let cache = SaltedPasswordCache::default();
        let client_final = client.answer(server_first.as_bytes(), &cache).await.unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(client.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(()));
        assert_eq!(
            client.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::InvalidServerSignature)
        );
        assert_eq!(
            client.verify(b"e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".to_owned()))
        );
    }

    /// A login against the proxy's own SCRAM server, with `cache`.
    async fn login(secret: &ScramSecret, password: &str, cache: &SaltedPasswordCache) -> Result<(), ScramError> {
        let mut client = ScramClient::new(password);
        let (exchange, server_first) = ScramExchange::start(secret, client.client_first().as_bytes())?;
        let client_final = client.answer(server_first.as_bytes(), cache).await?;
        let server_final = exchange.finish(client_final.as_bytes())?;
        client.verify(server_final.as_bytes())
    }

    #[tokio::test]
    async fn the_cache_serves_later_logins_of_the_same_salt_only() {
        let secret = ScramSecret::from_password("app-secret");
        let cache = SaltedPasswordCache::default();
        assert_eq!(login(&secret, "app-secret", &cache).await, Ok(()));
        let first = cache.0.lock().unwrap().as_ref().map(|s| s.key).unwrap();
        // A later login takes the cached key: a wrong one planted there fails it.
        cache.0.lock().unwrap().as_mut().unwrap().key = [0; 32];
        assert_eq!(
            login(&secret, "app-secret", &cache).await,
            Err(ScramError::InvalidProof)
        );
        cache.0.lock().unwrap().as_mut().unwrap().key = first;
        assert_eq!(login(&secret, "app-secret", &cache).await, Ok(()));
        // Another salt (the role's password was set again) derives afresh.
        let again = ScramSecret::from_password("app-secret");
        assert_eq!(login(&again, "app-secret", &cache).await, Ok(()));
        assert_ne!(cache.0.lock().unwrap().as_ref().map(|s| s.key), Some(first));
    }

    #[tokio::test]
    async fn malformed_server_messages_are_rejected() {
        let cache = SaltedPasswordCache::default();
        let client = || ScramClient::with_nonce("pw", "", "abc");
        for bad in [
            &b""[..],
            b"r=abc,s=AAAA,i=4096",
            b"r=xyzdef,s=AAAA,i=4096",
            b"r=abcdef,s=!!,i=4096",
            b"r=abcdef,s=AAAA,i=0",
            b"r=abcdef,s=AAAA,i=many",
            b"r=abcdef,s=AAAA",
            b"m=ext,r=abcdef,s=AAAA,i=1",
            b"\xff",
        ] {
            assert!(client().answer(bad, &cache).await.is_err(), "{bad:?}");
        }
        // Refused before any hashing (2^32 - 1 rounds would take minutes).
        for i in [10_000_001, u32::MAX] {
            let server_first = format!("r=abcdef,s=AAAA,i={i}");
            assert_eq!(
                client().answer(server_first.as_bytes(), &cache).await,
                Err(ScramError::TooManyIterations(i))
            );
        }
        assert!(client().verify(b"v=AAAA").is_err(), "no client-final yet");
        assert!(client().client_final(&[0; 32]).is_err(), "no server-first yet");
    }
}
