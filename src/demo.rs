//! `pcgate demo`: the sandbox and the gateway in one process, wired together, so a newcomer can
//! `curl` the gateway a minute after cloning.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use secrecy::SecretString;

use crate::config::{
    AppCredential, Audience, BaseUrl, ClientSecret, Config, ConfigError, CredentialConfig,
    TokenUrl, UserCredential, DEFAULT_REFRESH_BEFORE,
};
use crate::sandbox::{self, Sandbox, SandboxOptions};
use crate::{Gateway, StartError};

/// The shipped config: the demo uses its route table and settings.
pub const SHIPPED_CONFIG: &str = include_str!("../config/pcgate.toml");

/// The shipped config pointed at `sandbox`, with both credentials (`app`: client credentials,
/// `user`: App+User by refresh token) set to the sandbox's token endpoint.
pub fn config_for(sandbox: &Sandbox) -> Result<Config, ConfigError> {
    let mut config = Config::from_toml(SHIPPED_CONFIG)?;
    config.upstream.base_url = BaseUrl::parse(&sandbox.base_url())
        .map_err(|e| ConfigError::Invalid(format!("upstream.base_url: {e}")))?;
    let token_url = TokenUrl::parse(&sandbox.token_url())
        .map_err(|e| ConfigError::Invalid(format!("credentials.app.token_url: {e}")))?;
    let app = AppCredential {
        token_url,
        client_id: sandbox::SANDBOX_CLIENT_ID.to_owned(),
        secret: ClientSecret::Inline(SecretString::from(sandbox::SANDBOX_CLIENT_SECRET)),
        audience: Audience::Resource(crate::config::DEFAULT_RESOURCE.to_owned()),
        refresh_before: DEFAULT_REFRESH_BEFORE,
    };
    let user = UserCredential {
        app: app.clone(),
        refresh_token: Some(SecretString::from(sandbox::SANDBOX_REFRESH_TOKEN)),
        refresh_token_file: None,
    };
    config.credentials = BTreeMap::from([
        ("app".to_owned(), CredentialConfig::ClientCredentials(app)),
        ("user".to_owned(), CredentialConfig::RefreshToken(user)),
    ]);
    config.validate()?;
    Ok(config)
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The sandbox could not bind.
    #[error("sandbox: {0}")]
    Sandbox(std::io::Error),
    /// The config could not be built.
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] StartError),
}

/// Binds `addr`, or any free port on the same host when it is taken.
async fn free_or(addr: SocketAddr) -> SocketAddr {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

/// Runs the sandbox and the gateway until `shutdown`, printing where they are and what to try.
pub async fn run(shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), DemoError> {
    let options = SandboxOptions {
        listen: free_or(sandbox::DEFAULT_LISTEN).await,
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::bind(options).await.map_err(DemoError::Sandbox)?;
    let mut config = config_for(&sandbox)?;
    config.server.listen = free_or(config.server.listen).await;
    config.server.admin_listen = free_or(config.server.admin_listen).await;
    let gateway = Gateway::bind(config).await?;
    let (gw, admin, sb) = (
        gateway.local_addr(),
        gateway.admin_addr(),
        sandbox.local_addr(),
    );
    println!(
        "pcgate demo: a local Partner Center (the sandbox) and the gateway in front of it.\n\
         \n  gateway  http://{gw}    billing apps call this\
         \n  admin    http://{admin}    /healthz /readyz /metrics\
         \n  sandbox  http://{sb}    the upstream; /__sandbox/requests shows what reached it\
         \n\nTry:\
         \n  curl -s http://{gw}/v1/invoices/summary\
         \n  curl -s 'http://{gw}/v1/invoices?size=2&offset=0'\
         \n  curl -s http://{gw}/v1/invoices/summaries\
         \n  curl -si http://{gw}/v1/customers            # 403: not in the route table\
         \n  curl -s http://{sb}/__sandbox/requests         # what the upstream saw\
         \n\nCtrl-C stops both."
    );
    let shutdown = crate::shutdown::Shutdown::on(shutdown);
    let (served, ()) = tokio::join!(
        gateway.serve(shutdown.wait()),
        sandbox.serve(shutdown.wait())
    );
    served?;
    Ok(())
}
