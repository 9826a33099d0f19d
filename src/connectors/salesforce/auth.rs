//! OAuth 2.0 against Salesforce's token endpoint (§1.1 of the API notes): client credentials,
//! refresh token and JWT bearer (RS256). The token endpoint answers with the `instance_url`
//! every data call must use. Errors name the flow and Salesforce's error code, never a secret.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{Flow, SalesforceConfig};
use crate::delivery::driver::{MAX_ANSWER_BYTES, send};
use crate::error::{Error, Result};
use crate::options::Secret;

/// A session: the access token and the instance it is valid on.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: Secret,
    /// `https://acme.my.salesforce.com` (no trailing slash).
    pub instance_url: String,
    /// Which login of the connection issued it (1 for the first).
    pub generation: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

/// Asks the token endpoint for a session with the connection's flow.
///
/// Long because each OAuth flow (refresh token, client credentials, JWT bearer) builds its request
/// here and shares the handling of the answer.
pub async fn login(
    name: &str,
    config: &SalesforceConfig,
    client: &reqwest::Client,
) -> Result<Session> {
    let flow = &config.flow;
    let fail = |message: String| Error::Write {
        message: format!(
            "salesforce {name}: the OAuth {} flow failed: {message}",
            flow.name()
        ),
    };
    let mut form: Vec<(&str, String)> = vec![];
    let mut request = client.post(config.token_url());
    match flow {
        Flow::ClientCredentials {
            client_id,
            client_secret,
        } => {
            form.push(("grant_type", "client_credentials".into()));
            request = request.basic_auth(client_id.expose(), Some(client_secret.expose()));
        }
        Flow::RefreshToken {
            client_id,
            client_secret,
            refresh_token,
        } => {
            form.push(("grant_type", "refresh_token".into()));
            form.push(("refresh_token", refresh_token.expose().into()));
            form.push(("client_id", client_id.expose().into()));
            if let Some(secret) = client_secret {
                form.push(("client_secret", secret.expose().into()));
            }
        }
        Flow::JwtBearer {
            client_id,
            username,
            private_key,
            audience,
        } => {
            form.push((
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
            ));
            form.push((
                "assertion",
                jwt(client_id, username, private_key, audience).map_err(fail)?,
            ));
        }
    }
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let request = request
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .body(body);
    let response = send(request, MAX_ANSWER_BYTES).await.map_err(|e| {
        fail(format!(
            "cannot reach {} ({})",
            config.token_url(),
            e.reason()
        ))
    })?;
    if !response.status.is_success() {
        let e: TokenError = serde_json::from_slice(&response.body).unwrap_or_default();
        let hint = match (flow, e.error.as_str()) {
            (_, "invalid_client_id" | "invalid_client") => {
                "check client_id and client_secret (the connected app's consumer key and secret)"
            }
            (Flow::RefreshToken { .. }, "invalid_grant") => {
                "the refresh token is expired or revoked; authorize the connected app again and update refresh_token"
            }
            (Flow::JwtBearer { .. }, "invalid_grant") => {
                "check username, that the connected app holds the certificate of private_key, and that the user is pre-authorized"
            }
            (Flow::ClientCredentials { .. }, "invalid_grant") => {
                "check that the connected app enables the client credentials flow and names a run-as user"
            }
            _ => "check the connection's OAuth options",
        };
        return Err(fail(format!(
            "{} {}{} ({hint})",
            response.status.as_u16(),
            if e.error.is_empty() {
                "error"
            } else {
                &e.error
            },
            if e.error_description.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    crate::delivery::retry::excerpt(
                        &e.error_description,
                        super::retry::MESSAGE_EXCERPT
                    )
                )
            }
        )));
    }
    let token: TokenResponse = serde_json::from_slice(&response.body).map_err(|e| {
        fail(format!(
            "the token endpoint answered without access_token and instance_url ({e})"
        ))
    })?;
    let instance_url = url::Url::parse(&token.instance_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| fail("the token endpoint's instance_url is not an http(s) URL".into()))?;
    Ok(Session {
        token: Secret::new(token.access_token),
        instance_url: instance_url.as_str().trim_end_matches('/').to_string(),
        generation: 0,
    })
}

/// The RS256 assertion of the JWT bearer flow: `iss` the consumer key, `sub` the user, `aud`
/// the login host, valid for 3 minutes.
fn jwt(
    client_id: &Secret,
    username: &str,
    private_key: &Secret,
    audience: &str,
) -> std::result::Result<String, String> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key.expose().as_bytes())
        .map_err(|e| format!("private_key is not an RSA private key in PEM form ({e})"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        iss: client_id.expose(),
        sub: username,
        aud: audience,
        exp: now + 180,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .map_err(|e| format!("cannot sign the JWT with private_key ({e})"))
}
