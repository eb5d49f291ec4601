//! `pcgate demo`: the sandbox and the gateway in one process, wired together, so a newcomer can
//! `curl` the gateway a minute after cloning.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

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

/// How the demo's gateway authenticates at the sandbox's token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoCredential {
    /// The sandbox's client secret, inline.
    #[default]
    Secret,
    /// A throwaway certificate made at start: signed client assertions, no secret sent.
    Certificate,
}

/// A throwaway certificate and key written to a fresh directory (key mode 0600), removed when
/// dropped.
pub struct CertificateFiles {
    /// The directory holding both.
    pub dir: PathBuf,
    /// `certificate.pem`.
    pub certificate_file: PathBuf,
    /// `private-key.pem`.
    pub private_key_file: PathBuf,
    /// The certificate, for the sandbox to trust.
    pub certificate_pem: String,
}

impl CertificateFiles {
    /// Makes a certificate and key and writes them under `parent`.
    pub fn create(parent: &Path) -> Result<CertificateFiles, DemoError> {
        let fail = |what: String| DemoError::Certificate(what);
        let pair = sandbox::throwaway_certificate("pcgate-demo").map_err(fail)?;
        let dir = parent.join(format!("pcgate-demo-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let files = CertificateFiles {
            certificate_file: dir.join("certificate.pem"),
            private_key_file: dir.join("private-key.pem"),
            certificate_pem: pair.certificate_pem,
            dir,
        };
        std::fs::write(&files.certificate_file, &files.certificate_pem)
            .map_err(|e| fail(format!("{}: {e}", files.certificate_file.display())))?;
        write_private(
            &files.private_key_file,
            pair.private_key_pem.expose_secret(),
        )
        .map_err(|e| fail(format!("{}: {e}", files.private_key_file.display())))?;
        Ok(files)
    }

    /// Points every credential of `config` that has an app registration at these files.
    pub fn configure(&self, config: &mut Config) {
        for credential in config.credentials.values_mut() {
            let app = match credential {
                CredentialConfig::ClientCredentials(app) => app,
                CredentialConfig::RefreshToken(user) => &mut user.app,
                CredentialConfig::Static(_) => continue,
            };
            app.secret = ClientSecret::Certificate {
                certificate_file: self.certificate_file.clone(),
                private_key_file: self.private_key_file.clone(),
            };
        }
    }
}

impl Drop for CertificateFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `text` to a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The throwaway certificate could not be made or written.
    #[error("throwaway certificate: {0}")]
    Certificate(String),
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
pub async fn run(
    credential: DemoCredential,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let files = match credential {
        DemoCredential::Secret => None,
        DemoCredential::Certificate => Some(CertificateFiles::create(&std::env::temp_dir())?),
    };
    let options = SandboxOptions {
        listen: free_or(sandbox::DEFAULT_LISTEN).await,
        client_certificates: files.iter().map(|f| f.certificate_pem.clone()).collect(),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::bind(options).await.map_err(DemoError::Sandbox)?;
    let mut config = config_for(&sandbox)?;
    let how = match &files {
        Some(files) => {
            files.configure(&mut config);
            format!(
                "a throwaway certificate in {} (signed client assertions; no secret is sent)",
                files.dir.display()
            )
        }
        None => "the sandbox's client secret".to_owned(),
    };
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
         \n\nThe gateway authenticates with {how}.\
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
    drop(files);
    Ok(())
}
