//! The start-up check: what settings must satisfy beyond their own rules, found by building the
//! parts that need them (the authenticator parses its keys). `check-config` and the app both
//! run it, so a config that passes the check cannot fail to start for the same reason.

use crate::{
    auth::Authenticator,
    config::{ConfigError, Settings},
    tls::ServerTls,
};

/// What the check built, for the app to use instead of building it again.
pub struct Checked {
    pub authenticator: Authenticator,
    /// The gRPC port's TLS, when `server.tls` names a certificate.
    pub tls: Option<ServerTls>,
}

/// Validates `settings` as a whole and builds the authenticator (and the TLS configuration,
/// which reads the certificate files) from them.
pub fn check(settings: &Settings) -> Result<Checked, ConfigError> {
    settings.validate()?;
    let authenticator = Authenticator::from_settings(&settings.auth)?;
    let tls = ServerTls::load(&settings.server.tls)?;
    Ok(Checked { authenticator, tls })
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::config::{AuthMode, JwtAlgorithm};

    fn jwt_settings() -> Settings {
        let mut settings = Settings::default();
        settings.auth.mode = AuthMode::Jwt;
        settings
    }

    #[test]
    fn defaults_pass() {
        assert!(check(&Settings::default()).is_ok());
    }

    #[test]
    fn jwt_mode_without_a_secret_names_the_secret() {
        let error = check(&jwt_settings()).err().expect("refused");
        assert_eq!(error.key, "auth.jwt_secret", "{error}");
    }

    #[test]
    fn a_short_secret_is_refused_even_while_unused() {
        let mut settings = Settings::default();
        settings.auth.jwt_secret = Some(SecretString::from("short"));
        let error = check(&settings).err().expect("refused");
        assert_eq!(error.key, "auth.jwt_secret", "{error}");
    }

    #[test]
    fn an_unparsable_public_key_names_the_key() {
        let mut settings = jwt_settings();
        settings.auth.jwt_algorithm = JwtAlgorithm::RS256;
        settings.auth.jwt_public_key = Some("not a pem".to_owned());
        let error = check(&settings).err().expect("refused");
        assert_eq!(error.key, "auth.jwt_public_key", "{error}");
    }
}
