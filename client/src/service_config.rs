//! The gRPC service config (`proto/service_config.json`, the format of
//! [gRPC's service config](https://github.com/grpc/grpc/blob/master/doc/service_config.md)):
//! per-method timeouts and retry policies. [`Client`](crate::Client) applies it to every unary
//! call; the same file serves other gRPC clients (Python's `grpc.service_config` channel option,
//! grpc-go's `WithDefaultServiceConfig`, ...).

use std::{collections::HashMap, time::Duration};

use serde::Deserialize;
use tonic::Code;

/// The service config shipped with the contract (`proto/service_config.json`).
pub const DEFAULT_SERVICE_CONFIG_JSON: &str = include_str!("../../proto/service_config.json");

/// A parsed service config: the policy of each method.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    methods: HashMap<(String, String), MethodPolicy>,
    services: HashMap<String, MethodPolicy>,
    fallback: MethodPolicy,
}

/// What a service config says about one method.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodPolicy {
    /// Upper bound of the call, retries included; a shorter per-call deadline wins.
    pub timeout: Option<Duration>,
    /// How failed attempts are retried; `None`: never.
    pub retry: Option<RetryPolicy>,
}

/// A `retryPolicy`: which codes are retried, how often, and the backoff between attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2..=5, as gRPC clamps it).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
    pub retryable_codes: Vec<Code>,
}

impl RetryPolicy {
    /// Whether a failure with `code` is retried by this policy.
    pub fn retries(&self, code: Code) -> bool {
        self.retryable_codes.contains(&code)
    }

    /// The upper bound of the pause before retry number `retry` (1 for the first retry): the
    /// actual pause is drawn uniformly below it, as gRPC clients do, so that callers failing
    /// together do not come back together.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let ceiling =
            self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exponent.min(64));
        Duration::from_secs_f64(ceiling.min(self.max_backoff.as_secs_f64()))
    }

    /// A pause before retry number `retry`, with full jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        jittered(self.backoff_ceiling(retry))
    }
}

/// A random duration in `[0, ceiling]`.
pub(crate) fn jittered(ceiling: Duration) -> Duration {
    let fraction = getrandom::u64().unwrap_or(u64::MAX / 2) as f64 / u64::MAX as f64;
    ceiling.mul_f64(fraction)
}

/// Why a service config was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid service config: {0}")]
pub struct ServiceConfigError(String);

impl ServiceConfig {
    /// Parses a service config JSON document. Unknown fields (load balancing, health checking)
    /// are ignored, as gRPC clients do; a malformed timeout, backoff or status code is refused.
    ///
    /// ```
    /// use svcmsg_client::ServiceConfig;
    ///
    /// let config = ServiceConfig::from_json(svcmsg_client::DEFAULT_SERVICE_CONFIG_JSON).unwrap();
    /// let list = config.policy("messaging.v1.MessagingService", "ListMessages");
    /// assert!(list.retry.unwrap().retries(tonic::Code::Unavailable));
    /// ```
    pub fn from_json(json: &str) -> Result<Self, ServiceConfigError> {
        let raw: RawServiceConfig =
            serde_json::from_str(json).map_err(|error| ServiceConfigError(error.to_string()))?;
        let mut config = ServiceConfig {
            methods: HashMap::new(),
            services: HashMap::new(),
            fallback: MethodPolicy::default(),
        };
        for entry in raw.method_config {
            let policy = MethodPolicy {
                timeout: entry.timeout.as_deref().map(parse_duration).transpose()?,
                retry: entry.retry_policy.map(RetryPolicy::try_from).transpose()?,
            };
            for name in entry.name {
                match (name.service.filter(|s| !s.is_empty()), name.method) {
                    (Some(service), Some(method)) if !method.is_empty() => {
                        config.methods.insert((service, method), policy.clone());
                    }
                    (Some(service), _) => {
                        config.services.insert(service, policy.clone());
                    }
                    (None, None) => config.fallback = policy.clone(),
                    (None, Some(_)) => {
                        return Err(ServiceConfigError(
                            "a name with a method must name its service".to_owned(),
                        ));
                    }
                }
            }
        }
        Ok(config)
    }

    /// The config shipped with the contract ([`DEFAULT_SERVICE_CONFIG_JSON`]).
    pub fn shipped() -> Self {
        Self::from_json(DEFAULT_SERVICE_CONFIG_JSON).expect("the shipped service config is valid")
    }

    /// The policy of `service`/`method`: its own entry, else its service's, else the default.
    pub fn policy(&self, service: &str, method: &str) -> MethodPolicy {
        self.methods
            .get(&(service.to_owned(), method.to_owned()))
            .or_else(|| self.services.get(service))
            .unwrap_or(&self.fallback)
            .clone()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceConfig {
    #[serde(default)]
    method_config: Vec<RawMethodConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMethodConfig {
    #[serde(default)]
    name: Vec<RawName>,
    timeout: Option<String>,
    retry_policy: Option<RawRetryPolicy>,
}

#[derive(Deserialize)]
struct RawName {
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRetryPolicy {
    max_attempts: u32,
    initial_backoff: String,
    max_backoff: String,
    backoff_multiplier: f64,
    retryable_status_codes: Vec<RawCode>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCode {
    Name(String),
    Number(i32),
}

impl TryFrom<RawRetryPolicy> for RetryPolicy {
    type Error = ServiceConfigError;

    fn try_from(raw: RawRetryPolicy) -> Result<Self, Self::Error> {
        if raw.max_attempts < 2 {
            return Err(ServiceConfigError(
                "retryPolicy.maxAttempts must be at least 2".to_owned(),
            ));
        }
        if !(raw.backoff_multiplier > 0.0 && raw.backoff_multiplier.is_finite()) {
            return Err(ServiceConfigError(
                "retryPolicy.backoffMultiplier must be above 0".to_owned(),
            ));
        }
        if raw.retryable_status_codes.is_empty() {
            return Err(ServiceConfigError(
                "retryPolicy.retryableStatusCodes must not be empty".to_owned(),
            ));
        }
        let retryable_codes = raw
            .retryable_status_codes
            .into_iter()
            .map(|code| match code {
                RawCode::Number(number) => Ok(Code::from_i32(number)),
                RawCode::Name(name) => code_named(&name)
                    .ok_or_else(|| ServiceConfigError(format!("unknown status code {name:?}"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(RetryPolicy {
            // gRPC clients treat values above 5 as 5.
            max_attempts: raw.max_attempts.min(5),
            initial_backoff: parse_duration(&raw.initial_backoff)?,
            max_backoff: parse_duration(&raw.max_backoff)?,
            backoff_multiplier: raw.backoff_multiplier,
            retryable_codes,
        })
    }
}

/// A proto3 JSON duration: decimal seconds with an `s` suffix (`"0.2s"`, `"10s"`).
fn parse_duration(text: &str) -> Result<Duration, ServiceConfigError> {
    text.strip_suffix('s')
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| ServiceConfigError(format!("{text:?} is not a duration like \"0.5s\"")))
}

fn code_named(name: &str) -> Option<Code> {
    Some(match name {
        "OK" => Code::Ok,
        "CANCELLED" => Code::Cancelled,
        "UNKNOWN" => Code::Unknown,
        "INVALID_ARGUMENT" => Code::InvalidArgument,
        "DEADLINE_EXCEEDED" => Code::DeadlineExceeded,
        "NOT_FOUND" => Code::NotFound,
        "ALREADY_EXISTS" => Code::AlreadyExists,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "FAILED_PRECONDITION" => Code::FailedPrecondition,
        "ABORTED" => Code::Aborted,
        "OUT_OF_RANGE" => Code::OutOfRange,
        "UNIMPLEMENTED" => Code::Unimplemented,
        "INTERNAL" => Code::Internal,
        "UNAVAILABLE" => Code::Unavailable,
        "DATA_LOSS" => Code::DataLoss,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        _ => return None,
    })
}
