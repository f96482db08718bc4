//! Who is calling. Every RPC of the public services passes through [`Authenticator`]; health and
//! reflection do not. In `jwt` mode the caller proves identity with a signed token; in
//! `trusted-header` mode an authenticating gateway in front of the service vouches for it.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind as JwtErrorKind};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::{
    config::{AuthMode, AuthSettings, ConfigError, JwtAlgorithm, check_hs256_secret},
    error::{Error, ErrorKind, Reason},
    ids::UserId,
};

/// Metadata key carrying the user id in `trusted-header` mode.
pub const USER_ID_HEADER: &str = "x-user-id";
/// Metadata key carrying `Bearer <JWT>` in `jwt` mode.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The authenticated caller of one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: UserId,
}

/// Verifies credentials according to `auth.mode`.
#[derive(Clone)]
pub struct Authenticator {
    mode: Arc<Mode>,
}

enum Mode {
    TrustedHeader,
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Authenticator {
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, ConfigError> {
        let mode = match settings.mode {
            AuthMode::TrustedHeader => Mode::TrustedHeader,
            AuthMode::Jwt => jwt_mode(settings)?,
        };
        Ok(Self {
            mode: Arc::new(mode),
        })
    }

    pub fn is_trusted_header(&self) -> bool {
        matches!(*self.mode, Mode::TrustedHeader)
    }

    /// Authenticates from the request's `authorization` and `x-user-id` metadata values.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        user_id_header: Option<&str>,
    ) -> Result<Caller, Error> {
        match &*self.mode {
            Mode::TrustedHeader => {
                let raw = user_id_header.ok_or_else(|| {
                    unauthenticated(Reason::CredentialsMissing, "missing x-user-id metadata")
                })?;
                let user_id = UserId::parse(raw).map_err(|why| {
                    unauthenticated(Reason::CredentialsMalformed, format!("x-user-id: {why}"))
                })?;
                Ok(Caller { user_id })
            }
            Mode::Jwt { key, validation } => {
                let header = authorization.ok_or_else(|| {
                    unauthenticated(
                        Reason::CredentialsMissing,
                        "missing authorization metadata (expected \"Bearer <JWT>\")",
                    )
                })?;
                let token = bearer_token(header).ok_or_else(|| {
                    unauthenticated(
                        Reason::CredentialsMalformed,
                        "authorization metadata must be \"Bearer <JWT>\"",
                    )
                })?;
                let data = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|error| token_error(error.kind()))?;
                let user_id = UserId::parse(&data.claims.sub).map_err(|why| {
                    unauthenticated(Reason::TokenInvalid, format!("token sub claim: {why}"))
                })?;
                Ok(Caller { user_id })
            }
        }
    }
}

fn jwt_mode(settings: &AuthSettings) -> Result<Mode, ConfigError> {
    let (algorithm, key) = match settings.jwt_algorithm {
        JwtAlgorithm::HS256 => {
            let secret = settings.jwt_secret.as_ref().ok_or_else(|| ConfigError {
                key: "auth.jwt_secret".to_owned(),
                message: "required when auth.mode = \"jwt\" and auth.jwt_algorithm = \"HS256\""
                    .to_owned(),
            })?;
            check_hs256_secret(secret)?;
            (
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            )
        }
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
            let pem = settings.public_key_pem()?;
            let key_name = if settings.jwt_public_key.is_some() {
                "auth.jwt_public_key"
            } else {
                "auth.jwt_public_key_file"
            };
            let (algorithm, parsed) = if settings.jwt_algorithm == JwtAlgorithm::RS256 {
                (Algorithm::RS256, DecodingKey::from_rsa_pem(pem.as_bytes()))
            } else {
                (Algorithm::ES256, DecodingKey::from_ec_pem(pem.as_bytes()))
            };
            let key = parsed.map_err(|error| ConfigError {
                key: key_name.to_owned(),
                message: format!(
                    "not a valid {:?} public key in PEM form: {error}",
                    settings.jwt_algorithm
                ),
            })?;
            (algorithm, key)
        }
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
    }
    match &settings.audience {
        Some(audience) => validation.set_audience(&[audience]),
        // Without a configured audience any `aud` is accepted rather than every token refused.
        None => validation.validate_aud = false,
    }
    Ok(Mode::Jwt {
        key,
        validation: Box::new(validation),
    })
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn token_error(kind: &JwtErrorKind) -> Error {
    match kind {
        JwtErrorKind::ExpiredSignature => unauthenticated(Reason::TokenExpired, "token expired"),
        JwtErrorKind::InvalidSignature => {
            unauthenticated(Reason::TokenInvalid, "token signature is invalid")
        }
        JwtErrorKind::InvalidIssuer => {
            unauthenticated(Reason::TokenInvalid, "token issuer is not accepted")
        }
        JwtErrorKind::InvalidAudience => {
            unauthenticated(Reason::TokenInvalid, "token audience is not accepted")
        }
        JwtErrorKind::ImmatureSignature => {
            unauthenticated(Reason::TokenInvalid, "token is not valid yet")
        }
        JwtErrorKind::InvalidAlgorithm => {
            unauthenticated(Reason::TokenInvalid, "token algorithm is not accepted")
        }
        JwtErrorKind::MissingRequiredClaim(claim) => unauthenticated(
            Reason::TokenInvalid,
            format!("token lacks the {claim} claim"),
        ),
        _ => unauthenticated(Reason::CredentialsMalformed, "token is malformed"),
    }
}

/// The one value of credential metadata `name`, given all of its values (`None` for a value
/// that is not printable ASCII). A credential sent twice is refused rather than taking the first:
/// a proxy that appends its own `x-user-id` to the caller's must not leave the caller's in
/// charge, and which copy wins differs between proxies.
pub fn single_credential<'a>(
    name: &str,
    values: impl IntoIterator<Item = Option<&'a str>>,
) -> Result<Option<&'a str>, Error> {
    let mut values = values.into_iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(unauthenticated(
            Reason::CredentialsMalformed,
            format!("{name} metadata was sent more than once"),
        ));
    }
    first.map(Some).ok_or_else(|| {
        unauthenticated(
            Reason::CredentialsMalformed,
            format!("{name} metadata is not printable ASCII"),
        )
    })
}

fn unauthenticated(reason: Reason, message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthenticated, reason, message)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use secrecy::SecretString;
    use serde_json::json;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn jwt_settings() -> AuthSettings {
        AuthSettings {
            mode: AuthMode::Jwt,
            jwt_secret: Some(SecretString::from(SECRET)),
            issuer: Some("https://id.example".to_owned()),
            audience: Some("svc-messaging".to_owned()),
            leeway: Duration::ZERO,
            ..AuthSettings::default()
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn valid_claims() -> serde_json::Value {
        json!({"sub": "alice", "exp": now() + 60, "iss": "https://id.example", "aud": "svc-messaging"})
    }

    #[test]
    fn jwt_accepts_a_valid_token() {
        let auth = Authenticator::from_settings(&jwt_settings()).unwrap();
        let header = format!("Bearer {}", token(valid_claims(), SECRET));
        let caller = auth.authenticate(Some(&header), None).unwrap();
        assert_eq!(caller.user_id.as_str(), "alice");
    }

    #[test]
    fn jwt_refusals_carry_precise_reasons() {
        let auth = Authenticator::from_settings(&jwt_settings()).unwrap();
        let mut expired = valid_claims();
        expired["exp"] = json!(now() - 10);
        let mut wrong_issuer = valid_claims();
        wrong_issuer["iss"] = json!("https://evil.example");
        let mut wrong_audience = valid_claims();
        wrong_audience["aud"] = json!("other");
        let cases = [
            (None, Reason::CredentialsMissing),
            (Some("Basic abc".to_owned()), Reason::CredentialsMalformed),
            (
                Some("Bearer not.a.jwt".to_owned()),
                Reason::CredentialsMalformed,
            ),
            (
                Some(format!("Bearer {}", token(expired, SECRET))),
                Reason::TokenExpired,
            ),
            (
                Some(format!(
                    "Bearer {}",
                    token(valid_claims(), "another-secret-of-enough-length-000")
                )),
                Reason::TokenInvalid,
            ),
            (
                Some(format!("Bearer {}", token(wrong_issuer, SECRET))),
                Reason::TokenInvalid,
            ),
            (
                Some(format!("Bearer {}", token(wrong_audience, SECRET))),
                Reason::TokenInvalid,
            ),
        ];
        for (header, reason) in cases {
            let error = auth
                .authenticate(header.as_deref(), Some("mallory"))
                .unwrap_err();
            assert_eq!(error.kind, ErrorKind::Unauthenticated, "{header:?}");
            assert_eq!(error.reason, reason, "{header:?}: {error}");
        }
    }

    #[test]
    fn jwt_mode_ignores_the_trusted_header() {
        let auth = Authenticator::from_settings(&jwt_settings()).unwrap();
        assert!(auth.authenticate(None, Some("alice")).is_err());
    }

    #[test]
    fn a_credential_must_be_sent_once_and_as_text() {
        assert_eq!(single_credential("x-user-id", []).unwrap(), None);
        assert_eq!(
            single_credential("x-user-id", [Some("alice")]).unwrap(),
            Some("alice")
        );
        for values in [
            vec![Some("alice"), Some("mallory")],
            vec![Some("alice"), Some("alice")],
            vec![None],
            vec![Some("alice"), None],
        ] {
            let error = single_credential("x-user-id", values.clone()).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Unauthenticated, "{values:?}");
            assert_eq!(error.reason, Reason::CredentialsMalformed, "{values:?}");
            assert!(error.message.contains("x-user-id"), "{error}");
        }
    }

    #[test]
    fn trusted_header_mode_takes_the_user_id() {
        let auth = Authenticator::from_settings(&AuthSettings::default()).unwrap();
        assert_eq!(
            auth.authenticate(None, Some("bob"))
                .unwrap()
                .user_id
                .as_str(),
            "bob"
        );
        assert_eq!(
            auth.authenticate(None, None).unwrap_err().reason,
            Reason::CredentialsMissing
        );
        assert_eq!(
            auth.authenticate(None, Some("has space"))
                .unwrap_err()
                .reason,
            Reason::CredentialsMalformed
        );
    }

    #[test]
    fn bad_key_settings_name_the_key() {
        let short = AuthSettings {
            jwt_secret: Some(SecretString::from("short")),
            ..jwt_settings()
        };
        assert_eq!(
            Authenticator::from_settings(&short).err().unwrap().key,
            "auth.jwt_secret"
        );
        let rsa = AuthSettings {
            jwt_algorithm: JwtAlgorithm::RS256,
            jwt_public_key: Some("not a pem".to_owned()),
            ..jwt_settings()
        };
        assert_eq!(
            Authenticator::from_settings(&rsa).err().unwrap().key,
            "auth.jwt_public_key"
        );
    }
}
